"""SLED with a vocab-sharded head: each rank of a ``torch.distributed`` group holds rows
``[vocab_offset, vocab_offset + V_r)`` of the vocab matrix (Megatron / vLLM style).

Each rank runs phase 1 (``torch.ops.sled.partials``) on its shard; one all-gather exchanges the
partials, whose size depends on N, R and k but not on V; every rank then runs phase 2
(``torch.ops.sled.combine``) on the same gathered bytes, so all ranks end with the same evolved
top-k. ``iterations > 1`` adds one all-gather of two floats per position for each further
iteration (the softmax over the whole vocab of the evolving final row). Works with any backend
whose all-gather takes uint8 tensors (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _C  # registers torch.ops.sled

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
    stats, argmax, values, tokens, premature, rows = torch.ops.sled.partials(
        hidden, weight_shard, bias_shard, vocab_offset, k, logit_scale, softcap, iterations > 1)
    gathered = gather_packed([stats, argmax, values, tokens, premature], group)
    tokens, values, delta, softmax = torch.ops.sled.combine(*gathered, k)

    def reduce_softmax(local):
        return merge_softmax(gather_packed([local], group)[0])

    values = evolve(values, delta, softmax, evolution_rate, iterations, rows, tokens,
                    vocab_offset, reduce_softmax)
    return sort_topk(values, tokens)


def partials_bytes(positions: int, rows: int, k: int) -> int:
    """Bytes one rank contributes to the all-gather of a step (independent of the vocab)."""
    return positions * (rows * (_C.RECORD_FLOATS * 4 + 8) + k * (4 + 8 + 4 * (rows - 1)))
