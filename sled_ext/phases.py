"""The op's phases that run in Python, next to the wrappers of :mod:`sled_ext.ops`: the evolution
on the k candidates (docs/algorithm.md step 5) after ``sled.combine``, and the candidates' order
(step 6). ``sled.evolve_topk`` does both inside its kernels; this is their one Python home, which
the vocab-sharded path (:mod:`sled_ext.distributed`) and the evaluation's shared projection
(:class:`sled_ext.scoring.ChoiceScorer`) both call."""
from __future__ import annotations

import torch


def local_softmax(rows: torch.Tensor) -> torch.Tensor:
    """``[N, V_r]`` -> ``[N, 2]`` (max, sum of exp(x - max)); (-inf, 0) for an empty shard."""
    if rows.shape[1] == 0:
        return torch.stack([rows.new_full((rows.shape[0],), float("-inf")),
                            rows.new_zeros(rows.shape[0])], dim=-1)
    top = rows.amax(1)
    return torch.stack([top, torch.exp(rows - top[:, None]).sum(1)], dim=-1)


def evolve(values, delta, softmax, rate, iterations, rows=None, tokens=None, vocab_offset=0,
           reduce_softmax=lambda local: local):
    """docs/algorithm.md step 5 on the k candidates, every rank alike. For iterations > 1 each
    rank also moves its own slice ``rows`` of the final row and ``reduce_softmax`` makes its
    softmax statistics global."""
    if rate == 0:
        # No step moves a finite row, so every iteration gives what the first does.
        iterations = 1
    if iterations > 1:
        # A private copy of the rows, updated in place, with one spare column where candidates
        # held by other ranks land.
        shard = rows.shape[1]
        owned = (tokens >= vocab_offset) & (tokens < vocab_offset + shard)
        column = torch.where(owned, tokens - vocab_offset, shard)
        rows = torch.cat([rows, rows[:, :1]], 1)
    for t in range(iterations):
        if t > 0:
            softmax = reduce_softmax(local_softmax(rows[:, :shard]))
        step = rate * (1 - t / iterations)
        top, total = softmax[:, :1], softmax[:, 1:]
        new_values = values - step * (torch.exp(values - top) / total + delta)
        if t + 1 < iterations:
            rows.sub_((rows - top).exp_().div_(total).mul_(step))
            rows.scatter_(1, column, new_values)
        values = new_values
    return values


def sort_topk(values, tokens):
    """Evolved value descending, ties to the lower token: the order of ``sled.evolve_topk``."""
    tokens, by_token = tokens.sort(dim=1)
    values, order = values.gather(1, by_token).sort(dim=1, descending=True, stable=True)
    return values, tokens.gather(1, order)
