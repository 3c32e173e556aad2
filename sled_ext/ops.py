"""Thin wrappers over ``torch.ops.sled`` with keyword defaults, and the fake kernels that let the
ops trace under ``torch.compile``. The kernels, schemas and argument checks live in ``csrc/``."""
from __future__ import annotations

import torch

from . import _C  # loading the library registers torch.ops.sled

def evolve(hidden, weight, bias=None, *, evolution_scale=10, evolution_rate=2.0,
           evolution_lower_bound=-1000.0, iterations=1, logit_scale=1.0, softcap=0.0):
    """SLED-evolved logits ``[N, V]`` (float32) from stacked hidden states ``[R, N, H]``
    (premature rows first, the final row last) and the vocab head ``weight [V, H]`` (+ ``bias``).
    Tokens outside the final row's top-k get ``evolution_lower_bound``."""
    return torch.ops.sled.evolve.default(hidden, weight, bias, evolution_scale, evolution_rate,
                                         evolution_lower_bound, iterations, logit_scale, softcap)


def evolve_topk(hidden, weight, bias=None, *, evolution_scale=10, evolution_rate=2.0,
                iterations=1, logit_scale=1.0, softcap=0.0):
    """Only the k candidates: ``(values [N, k] float32, indices [N, k] int64)`` sorted by evolved
    value, descending (ties: lower token first)."""
    return torch.ops.sled.evolve_topk.default(hidden, weight, bias, evolution_scale,
                                              evolution_rate, iterations, logit_scale, softcap)


def evolve_logits(logits, *, evolution_scale=10, evolution_rate=2.0,
                  evolution_lower_bound=-1000.0, iterations=1, logit_scale=1.0, softcap=0.0):
    """As :func:`evolve` for callers that already hold the logits ``[R, N, V]``."""
    return torch.ops.sled.evolve_logits.default(logits, evolution_scale, evolution_rate,
                                                evolution_lower_bound, iterations, logit_scale,
                                                softcap)


def evolve_logits_topk(logits, *, evolution_scale=10, evolution_rate=2.0, iterations=1,
                       logit_scale=1.0, softcap=0.0):
    """As :func:`evolve_topk` for callers that already hold the logits ``[R, N, V]``."""
    return torch.ops.sled.evolve_logits_topk.default(logits, evolution_scale, evolution_rate,
                                                     iterations, logit_scale, softcap)


def partials(hidden, weight_shard, bias_shard=None, *, vocab_offset, evolution_scale=10,
             logit_scale=1.0, softcap=0.0, keep_final=False):
    """Phase 1 over one vocab shard (rows ``[vocab_offset, vocab_offset + V_r)`` of the head):
    ``(stats [N, R, RECORD_FLOATS], argmax [N, R], values [N, k], tokens [N, k],
    premature [N, k, L], final_rows [N, V_r or 0])``; see :mod:`sled_ext.distributed`.
    ``stats`` holds per row what ``store_record`` in ``csrc/sled_math.h`` lists."""
    return torch.ops.sled.partials.default(hidden, weight_shard, bias_shard, vocab_offset,
                                           evolution_scale, logit_scale, softcap, keep_final)


def partials_logits(logits, *, vocab_offset=0, evolution_scale=10, logit_scale=1.0, softcap=0.0,
                    keep_final=False):
    """As :func:`partials` for callers that already hold one shard's logits ``[R, N, V_r]``
    (e.g. to share them with another method)."""
    return torch.ops.sled.partials_logits.default(logits, vocab_offset, evolution_scale,
                                                  logit_scale, softcap, keep_final)


def combine(stats, argmax, values, tokens, premature, *, evolution_scale=10):
    """Phase 2 over S shards' partials stacked on a leading dim (docs/algorithm.md steps 1-4):
    ``(tokens [N, k], final logits [N, k], delta [N, k], final softmax max/sum [N, 2])``."""
    return torch.ops.sled.combine.default(stats, argmax, values, tokens, premature,
                                          evolution_scale)


def cpu_kernels():
    """What the CPU backend runs on this machine: ``{"level": "AVX512", "float32": "AVX512 FMAs
    as the weight streams, sgemm for many rows", "bfloat16": "brgemm", "float16": ...}``.
    ``level`` is the instruction set of its vector loops, chosen at load time
    (``ATEN_CPU_CAPABILITY=default|avx2`` forces a lower one); per weight dtype, how the vocab head
    is projected: ``"<level> FMAs as the weight streams, sgemm for many rows"`` (float32: the
    library's kernel for at most 48 hidden rows, BLAS beyond; ``"sgemm"`` alone at DEFAULT),
    ``"brgemm"`` (oneDNN's micro-kernel on the CPU's bf16/fp16 matrix or dot-product units,
    float32 accumulation), ``"widened to float32, "`` + the float32 one; for bfloat16 on CPUs with
    AVX512-BF16 but no AMX,
    ``"AVX512-BF16 dot products as the weight streams, brgemm for many rows"``; for float16 on CPUs
    with AMX for bf16 only, each half split exactly into bf16 hi + lo parts: ``"split into bfloat16
    hi + lo: AMX as the weight streams, brgemm for many rows"`` or ``"brgemm, split into bfloat16
    hi + lo"``. "As the weight streams" names the library's own kernels, used where the hidden
    rows are few; the AMX and AVX512-BF16 ones only where they pass a one-time check on a small
    exact product."""
    info = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        info["level"], info[str(dtype).removeprefix("torch.")] = \
            torch.ops.sled.cpu_kernels(dtype).split("; ")
    return info


# The fake kernels state the op's contract (what csrc/sled_ops.cpp checks on real tensors) with
# torch._check, so a traced call that breaks it fails at trace time, as the op itself would.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_rows(rows, name, last_dim):
    torch._check_value(rows.dim() == 3 and rows.shape[0] >= 2, lambda: (
        f"{name} must be [R, N, {last_dim}] with R >= 2 (premature rows, then the final row), "
        f"got shape {tuple(rows.shape)}"))
    torch._check_type(rows.dtype in _DTYPES, lambda: (
        f"{name} must be float32, bfloat16 or float16, got {rows.dtype}"))


def _check_like(t, name, rows):
    torch._check_value(t.device == rows.device, lambda: (
        f"{name} is on {t.device} but the rows are on {rows.device}"))
    torch._check_type(t.dtype == rows.dtype, lambda: (
        f"{name} is {t.dtype} but the rows are {rows.dtype}; use one dtype for all tensors"))


def _check_head(hidden, weight, bias):
    _check_rows(hidden, "hidden", "H")
    _check_like(weight, "weight", hidden)
    torch._check_value(weight.dim() == 2 and weight.shape[1] == hidden.shape[2], lambda: (
        f"weight must be [V, H] with H = {hidden.shape[2]}, got shape {tuple(weight.shape)}"))
    if bias is not None:
        _check_like(bias, "bias", hidden)
        torch._check_value(bias.dim() == 1 and bias.shape[0] == weight.shape[0], lambda: (
            f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}"))


def _check_k(k, vocab=None):
    """k in [1, V] over a whole vocabulary; a shard (``vocab`` None) may hold fewer tokens."""
    torch._check_value(k >= 1 and (vocab is None or k <= vocab), lambda: (
        f"evolution_scale (k) must be in [1, V], got {k}"))


def _check_iterations(iterations):
    torch._check_value(iterations >= 1, lambda: f"iterations must be >= 1, got {iterations}")


def _topk_outputs(rows, k):
    positions = rows.shape[1]
    return (rows.new_empty((positions, k), dtype=torch.float32),
            rows.new_empty((positions, k), dtype=torch.int64))


@torch.library.register_fake("sled::evolve")
def _(hidden, weight, bias, evolution_scale, evolution_rate, evolution_lower_bound,
      iterations=1, logit_scale=1.0, softcap=0.0):
    _check_head(hidden, weight, bias)
    _check_k(evolution_scale, weight.shape[0])
    _check_iterations(iterations)
    return hidden.new_empty((hidden.shape[1], weight.shape[0]), dtype=torch.float32)


@torch.library.register_fake("sled::evolve_topk")
def _(hidden, weight, bias, evolution_scale, evolution_rate, iterations=1, logit_scale=1.0,
      softcap=0.0):
    _check_head(hidden, weight, bias)
    _check_k(evolution_scale, weight.shape[0])
    _check_iterations(iterations)
    return _topk_outputs(hidden, evolution_scale)


@torch.library.register_fake("sled::evolve_logits")
def _(logits, evolution_scale, evolution_rate, evolution_lower_bound, iterations=1,
      logit_scale=1.0, softcap=0.0):
    _check_rows(logits, "logits", "V")
    _check_k(evolution_scale, logits.shape[2])
    _check_iterations(iterations)
    return logits.new_empty((logits.shape[1], logits.shape[2]), dtype=torch.float32)


@torch.library.register_fake("sled::evolve_logits_topk")
def _(logits, evolution_scale, evolution_rate, iterations=1, logit_scale=1.0, softcap=0.0):
    _check_rows(logits, "logits", "V")
    _check_k(evolution_scale, logits.shape[2])
    _check_iterations(iterations)
    return _topk_outputs(logits, evolution_scale)


def _partials_outputs(rows, shard_vocab, k, keep_final):
    R, N, f32, i64 = rows.shape[0], rows.shape[1], torch.float32, torch.int64
    return (rows.new_empty((N, R, _C.RECORD_FLOATS), dtype=f32), rows.new_empty((N, R), dtype=i64),
            rows.new_empty((N, k), dtype=f32), rows.new_empty((N, k), dtype=i64),
            rows.new_empty((N, k, R - 1), dtype=f32),
            rows.new_empty((N, shard_vocab if keep_final else 0), dtype=f32))


@torch.library.register_fake("sled::partials")
def _(hidden, weight, bias, vocab_offset, evolution_scale, logit_scale=1.0, softcap=0.0,
      keep_final=False):
    _check_head(hidden, weight, bias)
    _check_k(evolution_scale)
    torch._check_value(vocab_offset >= 0, lambda: f"vocab_offset must be >= 0, got {vocab_offset}")
    return _partials_outputs(hidden, weight.shape[0], evolution_scale, keep_final)


@torch.library.register_fake("sled::partials_logits")
def _(logits, vocab_offset, evolution_scale, logit_scale=1.0, softcap=0.0, keep_final=False):
    _check_rows(logits, "logits", "V")
    _check_k(evolution_scale)
    torch._check_value(vocab_offset >= 0, lambda: f"vocab_offset must be >= 0, got {vocab_offset}")
    return _partials_outputs(logits, logits.shape[2], evolution_scale, keep_final)


@torch.library.register_fake("sled::combine")
def _(stats, argmax, values, tokens, premature, evolution_scale):
    torch._check_value(stats.dim() == 4 and stats.shape[2] >= 2
                       and stats.shape[3] == _C.RECORD_FLOATS, lambda: (
                           f"stats must be [S, N, R, {_C.RECORD_FLOATS}], got shape "
                           f"{tuple(stats.shape)}"))
    S, N, R = stats.shape[:3]
    kept = values.shape[-1]
    for t, name, shape, dtype in ((stats, "stats", (S, N, R, _C.RECORD_FLOATS), torch.float32),
                                  (argmax, "argmax", (S, N, R), torch.int64),
                                  (values, "values", (S, N, kept), torch.float32),
                                  (tokens, "tokens", (S, N, kept), torch.int64),
                                  (premature, "premature", (S, N, kept, R - 1), torch.float32)):
        torch._check_value(t.shape == shape, lambda: (
            f"{name} must have shape {shape}, got {tuple(t.shape)}"))
        torch._check_type(t.dtype == dtype, lambda: f"{name} must be {dtype}, got {t.dtype}")
        torch._check_value(t.device == stats.device, lambda: (
            f"{name} is on {t.device} but stats is on {stats.device}"))
    k = evolution_scale
    torch._check_value(1 <= k <= kept, lambda: (
        f"evolution_scale (k) must be in [1, {kept}] (the shards' candidates), got {k}"))
    return (tokens.new_empty((N, k)), values.new_empty((N, k)), values.new_empty((N, k)),
            values.new_empty((N, 2)))
