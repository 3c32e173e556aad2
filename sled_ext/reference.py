"""Pure-PyTorch SLED, written the way the published code computes it (docs/algorithm.md).

One vocab-head call per layer, softmaxes over the whole vocab, an explicit ``[L, k, V]`` tensor of
``p_l - e_i`` and ``torch.nn.functional.cosine_similarity``, one position at a time. It is the
oracle the tests trust and the baseline the benchmarks beat; keep it plain.

``dtype`` is the arithmetic type: float32 is the published behaviour (which loses accuracy when a
premature layer is nearly sure of one token), float64 is the oracle the kernels are held to (there
``1 - p_i`` is the sum of the other probabilities, so it is exact however sure the layer is).

One rule is this project's, not the published code's: the noise floor. A premature layer whose
logits equal the final row's up to a constant and float32 rounding (``NOISE_FLOOR``, defined with
the kernels in ``csrc/sled_math.h``) has no contrast; without it step 3's normalisations
(``docs/algorithm.md``) would turn the rounding of a batched projection into a full-strength
contrast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._C import NOISE_FLOOR


def project(hidden, weight, bias=None, dtype=torch.float32):
    """One call of the vocab head: ``[..., H] -> [..., V]``."""
    bias = None if bias is None else bias.to(dtype)
    return F.linear(hidden.to(dtype), weight.to(dtype), bias)


def postprocess(logits, logit_scale=1.0, softcap=0.0):
    """The model's logit post-processing (scale, then Gemma-2 style soft-capping), on every row."""
    logits = logits * logit_scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def top_tokens(final_logits, k):
    """The k largest final logits; ties go to the lower token, NaN ranks first (as torch.sort)."""
    return torch.sort(final_logits, descending=True, stable=True).indices[:k]


def within_noise_floor(premature, final):
    """``[L]``: whether each premature row is the final row up to a constant plus at most
    ``NOISE_FLOOR`` times the largest ``|logit|`` of the two rows (never for non-finite rows)."""
    divergence = premature - final
    spread = divergence.amax(-1) - divergence.amin(-1)
    size = torch.maximum(premature.abs().amax(-1), final.abs().amax())
    return (spread <= NOISE_FLOOR * size) & torch.isfinite(size)


def contrast_weights(premature, final, topk):
    """``[L, k]``: ``max(cos(p_l - e_i, z_l - z_N), 0)^2`` for every premature row ``l`` and
    candidate ``i`` (steps 2-3 before the normalisations), zero within the noise floor."""
    num_layers, vocab = premature.shape
    k = topk.numel()
    p_premature = F.softmax(premature, dim=-1)
    divergence = premature - final
    candidate_gradients = p_premature[:, None, :].expand(num_layers, k, vocab).clone()
    candidates = (slice(None), torch.arange(k), topk)
    if premature.dtype == torch.float64:
        # The oracle takes p_i - 1 as minus the other probabilities: float64 cancels too once a
        # layer leads by more than about 23 nats (docs/algorithm.md, "Numerics"); float32 is the
        # published formula.
        others = candidate_gradients.clone()
        others[candidates] = 0
        candidate_gradients[candidates] = -others.sum(-1)
    else:
        candidate_gradients[candidates] -= 1  # p_l - e_i for every i in the top-k
    cosine = F.cosine_similarity(candidate_gradients, divergence[:, None, :], dim=2)  # [L, k]
    weights = cosine.clamp(min=0) ** 2
    weights[within_noise_floor(premature, final)] = 0
    return weights


def evolve_position(logits, k, rate, lower_bound, iterations=1):
    """docs/algorithm.md steps 1-6 for one position: ``logits`` is ``[R, V]``, premature rows
    first."""
    premature, final = logits[:-1], logits[-1]
    topk = top_tokens(final, k)
    weights = contrast_weights(premature, final, topk)
    layer_sums = weights.sum(dim=1)
    nonzero = layer_sums != 0
    weights[nonzero] /= layer_sums[nonzero, None]
    if layer_sums.sum() != 0:
        layer_sums = layer_sums / layer_sums.sum()
    delta = torch.zeros_like(final)
    delta[topk] = -(weights * layer_sums[:, None]).sum(dim=0)

    evolved = final.clone()
    for t in range(iterations):
        step = rate * (1 - t / iterations)
        evolved = evolved - step * (F.softmax(evolved, dim=-1) + delta)

    out = torch.full_like(final, lower_bound)
    out[topk] = evolved[topk]
    return out


def evolve_logits(logits, evolution_scale, evolution_rate, evolution_lower_bound, iterations=1,
                  logit_scale=1.0, softcap=0.0, dtype=torch.float32):
    """``[R, N, V]`` logits -> ``[N, V]`` evolved logits (lower bound outside the top-k)."""
    logits = postprocess(logits.to(dtype), logit_scale, softcap)
    rows, positions, vocab = logits.shape
    out = logits.new_empty((positions, vocab))
    for n in range(positions):
        out[n] = evolve_position(logits[:, n], evolution_scale, evolution_rate,
                                 evolution_lower_bound, iterations)
    return out


def evolve(hidden, weight, bias, evolution_scale, evolution_rate, evolution_lower_bound,
           iterations=1, logit_scale=1.0, softcap=0.0, dtype=torch.float32):
    """``[R, N, H]`` stacked hidden states -> ``[N, V]``, one vocab-head call per layer."""
    logits = torch.stack([project(h, weight, bias, dtype=dtype) for h in hidden])
    return evolve_logits(logits, evolution_scale, evolution_rate, evolution_lower_bound,
                         iterations, logit_scale, softcap, dtype)


def evolve_topk(hidden, weight, bias, evolution_scale, evolution_rate, iterations=1,
                logit_scale=1.0, softcap=0.0, dtype=torch.float32):
    """The top-k form: values and tokens ``[N, k]``, by evolved value descending, ties to the
    lower token."""
    full = evolve(hidden, weight, bias, evolution_scale, evolution_rate, float("-inf"), iterations,
                  logit_scale, softcap, dtype)
    return topk_of(full, evolution_scale)


def topk_of(full, k):
    """The k kept entries of a full evolved row set, ordered as the top-k form orders them."""
    order = torch.sort(full, dim=-1, descending=True, stable=True).indices[..., :k]
    return full.gather(-1, order), order
