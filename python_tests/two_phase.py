"""SLED's two phases in one process: what the ranks of sled_ext.distributed compute (sled_ext.phases after sled.combine), with the
all-gather as a stack. Shared by the distributed tests and the fuzzing."""
import torch

import sled_ext
from sled_ext import phases


def combine_and_evolve(parts, k, iterations, rate=2.0):
    """``parts``: each shard's ``sled.partials`` outputs (``keep_final`` when iterations > 1) ->
    ``(values, tokens)`` as ``sled.evolve_topk`` orders them."""
    stacked = [torch.stack([p[i] for p in parts]) for i in range(5)]
    tokens, values, delta, softmax = sled_ext.combine(*stacked, evolution_scale=k)
    if iterations == 1:
        values = phases.evolve(values, delta, softmax, rate, 1)
    else:  # the shards' final rows side by side: one slice holding the whole vocab
        full = torch.cat([p[5] for p in parts], dim=1)
        kept = full.clone()
        values = phases.evolve(values, delta, softmax, rate, iterations, full, tokens, 0)
        assert torch.equal(full, kept)  # evolve moves a copy
    return phases.sort_topk(values, tokens)
