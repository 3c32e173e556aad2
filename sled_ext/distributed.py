"""SLED with a vocab-sharded head: each rank of a ``torch.distributed`` group holds rows
``[vocab_offset, vocab_offset + V_r)`` of the vocab matrix (Megatron / vLLM style).

Each rank runs phase 1 (:func:`sled_ext.ops.partials`) on its shard; one all-gather exchanges the
partials, whose size depends on N, R and k but not on V; every rank then runs phase 2
(:func:`sled_ext.ops.combine`) on the same gathered bytes, so all ranks end with the same evolved
top-k. ``iterations > 1`` adds one all-gather of two floats per position for each further
iteration (the softmax over the whole vocab of the evolving final row). Works with any backend
whose all-gather takes uint8 tensors (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _C, ops
from .phases import evolve, sort_topk

# torch >= 2.14 renamed all_gather_into_tensor; the GPU machines' torch 2.11 has the old name only.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_packed(tensors, group=None) -> list[torch.Tensor]:
    """All-gathers a list of tensors as one uint8 buffer; returns them stacked ``[S, ...]``."""
    flat = torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors])
    world = dist.get_world_size(group)
    gathered = flat.new_empty(world * flat.numel())
    _all_gather_single(gathered, flat, group=group)
    gathered = gathered.view(world, flat.numel())
    out, offset = [], 0
    for t in tensors:
        size = t.numel() * t.element_size()
        part = gathered[:, offset:offset + size].contiguous().view(t.dtype)
        out.append(part.view(world, *t.shape))
        offset += size
    return out


def merge_softmax(stats: torch.Tensor) -> torch.Tensor:
    """``[S, N, 2]`` per-shard (max, sum of exp(x - max)) -> ``[N, 2]`` over all shards."""
    top = stats[..., 0].amax(0)
    empty = stats[..., 0] == float("-inf")  # a shard without tokens adds nothing
    scale = torch.where(empty, 0.0, torch.exp(stats[..., 0] - top))
    return torch.stack([top, (stats[..., 1] * scale).sum(0)], dim=-1)


def evolve_topk(hidden, weight_shard, bias_shard=None, *, vocab_offset: int, group=None,
                evolution_scale=10, evolution_rate=2.0, iterations=1, logit_scale=1.0,
                softcap=0.0, vocab_size: int | None = None):
    """SLED's evolved top-k over a vocab-sharded head. Every rank passes the same ``hidden``
    ``[R, N, H]`` and its own shard ``weight_shard`` ``[V_r, H]`` (+ ``bias_shard``) holding the
    tokens from ``vocab_offset`` on; every rank gets the same ``(values, indices)`` ``[N, k]``
    (global token ids), as :func:`sled_ext.evolve_topk` on the whole head would return.
    ``vocab_size`` (all shards together), when given, is checked against k up front; otherwise
    too large a k raises in ``sled.combine`` on CPU and yields token -1 / NaN on CUDA (a check
    there would synchronise with the host)."""
    k = evolution_scale
    if vocab_size is not None and not 1 <= k <= vocab_size:
        raise ValueError(f"evolution_scale (k) must be in [1, V] = [1, {vocab_size}], got {k}")
    stats, argmax, values, tokens, premature, rows = ops.partials(
        hidden, weight_shard, bias_shard, vocab_offset=vocab_offset, evolution_scale=k,
        logit_scale=logit_scale, softcap=softcap, keep_final=iterations > 1)
    gathered = gather_packed([stats, argmax, values, tokens, premature], group)
    tokens, values, delta, softmax = ops.combine(*gathered, evolution_scale=k)

    def reduce_softmax(local):
        return merge_softmax(gather_packed([local], group)[0])

    values = evolve(values, delta, softmax, evolution_rate, iterations, rows, tokens,
                    vocab_offset, reduce_softmax)
    return sort_topk(values, tokens)


def partials_bytes(positions: int, rows: int, k: int) -> int:
    """Bytes one rank contributes to the all-gather of a step (independent of the vocab)."""
    return positions * (rows * (_C.RECORD_FLOATS * 4 + 8) + k * (4 + 8 + 4 * (rows - 1)))
