"""Property-based fuzzing (hypothesis) of every op form against the float64 reference: random
shapes, k, T, dtypes, bias, logit scale, soft-cap, strides and degenerate rows.

Profiles, chosen by ``SLED_FUZZ``: ``ci`` (the default) draws the same examples on every run
(derandomized); ``release`` draws many more, fresh each run, for release checks:
``SLED_FUZZ=release .venv/bin/python -m pytest -q python_tests/test_fuzz_ops.py``. A failure
prints the falsifying case (its ``seed`` regenerates the tensors) and a ``@reproduce_failure``
blob.

The contract checked is the README's: on positions without NaN or infinity, the kept top-k sets
equal the reference's and the evolved values agree within ``tolerance.py``; a position with a NaN
or infinity gets NaN values, k distinct valid tokens, and leaves the others alone. Two kinds of
input are set aside (``assume``), since float32 and float64 may legitimately part there: final
logits within float32 rounding of the k-th largest (without equalling it); a premature layer within
a factor of 16 of the noise floor, where the rule is a threshold; and contrast weights that are all
below 2^-100 yet not zero (a layer sure of a token by 60 nats or more: cosine_similarity's eps
leaves its cosine tiny), which float32 cannot hold but SLED's normalisations scale to full
strength.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sled_ext
from sled_ext import reference as ref
from tolerance import ATOL, PROJECTION_ROUNDING, RTOL, assert_matches_reference
from two_phase import combine_and_evolve

PROFILES = {
    "ci": settings(max_examples=200, derandomize=True, deadline=None, database=None,
                   print_blob=True, suppress_health_check=[HealthCheck.too_slow]),
    "release": settings(max_examples=5000, deadline=None, print_blob=True,
                        suppress_health_check=[HealthCheck.too_slow]),
}
FUZZ = PROFILES[os.environ.get("SLED_FUZZ", "ci")]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "strided"]
# What a degenerate row is made of. Logits form: a bit-identical copy of the final row, a copy
# off by float32 rounding, a copy shifted by a constant, one dominant token, all logits equal.
# Projection form: the final hidden state, a zero hidden state (logits = bias), a constant one.
# Both: a row scaled up 1000x, and one entry NaN or +-inf.
LOGIT_KINDS = ["copy", "rounded_copy", "shifted_copy", "dominant", "all_equal", "huge", "nan",
               "inf", "-inf"]
HIDDEN_KINDS = ["copy", "zero", "constant", "huge", "nan", "inf", "-inf"]
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@st.composite
def cases(draw, projects, finite=False, many_rows=False):
    """``many_rows``: 12-160 hidden rows and H wide enough that the CPU kernel packs them; where
    they fill 3/4 of the vector lanes it folds the products a lane per row (sled_cpu.cpp,
    fold_a_lane_per_row), with R on both sides of 17, where it changes how a lane finds its final
    row."""
    R = draw(st.sampled_from([2, 3, 7, 16, 17, 18, 33]) if many_rows else st.integers(2, 6))
    N = draw(st.integers(-(-12 // R), 160 // R) if many_rows else st.integers(1, 4))
    V = draw(st.one_of(st.integers(1, 40), st.integers(1, 600)))  # small: SIMD tails
    k = draw(st.one_of(st.integers(1, min(V, 80)), st.just(V)))
    kinds = [kind for kind in (HIDDEN_KINDS if projects else LOGIT_KINDS)
             if not (finite and kind in NON_FINITE)]
    return dict(
        R=R, N=N, V=V, k=k,
        H=(draw(st.integers(4 * R * N + 32, 4 * R * N + 64) if many_rows else st.integers(1, 96))
           if projects else None),
        iterations=draw(st.sampled_from([1, 2, 3, 10])),
        dtype=draw(st.sampled_from(DTYPES[1:] if many_rows else DTYPES)),  # fp32: never packed
        bias=projects and draw(st.booleans()),
        logit_scale=draw(st.sampled_from([1.0, 0.5, 1.7])),
        softcap=draw(st.sampled_from([0.0, 10.0, 30.0])),
        rate=draw(st.sampled_from([0.0, 0.5, 2.0, 3.5])),
        # no 16-bit logit equals these (kept values found as those != the bound)
        lower_bound=draw(st.sampled_from([-1000.25, -100.25, -math.inf])),
        spread=draw(st.sampled_from([1e-3, 1.0, 3.0, 20.0])),  # the logits' standard deviation
        layout=draw(st.sampled_from(LAYOUTS)),
        degenerate=draw(st.lists(st.tuples(st.integers(0, R - 1), st.integers(0, N - 1),
                                           st.sampled_from(kinds)), max_size=3)),
        seed=draw(st.integers(0, 2**32 - 1)))


def laid_out(t, layout):
    """The values of ``t`` in a tensor of the given memory layout (same shape)."""
    if layout == "transposed":  # reversed dimension order in memory
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(
            *reversed(range(t.dim())))
    if layout == "strided":  # every other element of a wider last dimension
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def make_logits(case, g):
    """``[R, N, V]`` float64 logits with the case's degenerate rows."""
    R, N, V = case["R"], case["N"], case["V"]
    logits = torch.randn(R, N, V, generator=g, dtype=torch.float64) * case["spread"]
    logits[:-1] = (logits[:-1] + logits[-1:]) / 2  # premature rows correlate with the final one
    for r, n, kind in case["degenerate"]:
        row, final = logits[r, n], logits[-1, n]
        if kind == "copy":
            row.copy_(final)
        elif kind == "rounded_copy":  # what another summation order of one projection gives
            row.copy_(final + 2e-7 * final.abs().max() * torch.rand(V, generator=g,
                                                                    dtype=torch.float64))
        elif kind == "shifted_copy":
            row.copy_(final + 2.5)
        elif kind == "dominant":
            row[int(torch.randint(V, (), generator=g))] += 25.0
        elif kind == "all_equal":
            row.fill_(float(row[0]))
        elif kind == "huge":
            row.mul_(1000.0)
        else:  # at a random token, or where the final row is smallest (outside the top-k)
            token = torch.randint(V, (), generator=g) if torch.rand((), generator=g) < 0.5 \
                else final.argmin()
            row[int(token)] = NON_FINITE[kind]
    return logits


def make_hidden(case, g):
    """``[R, N, H]`` hidden states, ``[V, H]`` weight and ``[V]`` bias or None (float64)."""
    R, N, H, V = case["R"], case["N"], case["H"], case["V"]
    hidden = torch.randn(R, N, H, generator=g, dtype=torch.float64).cumsum(0) / math.sqrt(R)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (case["spread"] / math.sqrt(H))
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * case["spread"] if case["bias"]
            else None)
    for r, n, kind in case["degenerate"]:
        row = hidden[r, n]
        if kind == "copy":
            row.copy_(hidden[-1, n])
        elif kind == "zero":
            row.zero_()
        elif kind == "constant":
            row.fill_(float(row[0]))
        elif kind == "huge":
            row.mul_(1000.0)
        else:
            row[int(torch.randint(H, (), generator=g))] = NON_FINITE[kind]
    return hidden, weight, bias


def poisoned_positions(logits):
    """Positions whose ``[R, N, V]`` logits, post-processed, hold a NaN or an infinity (a 16-bit
    cast may overflow; soft-capping maps +-inf to +-softcap, which are numbers)."""
    return {n for n in range(logits.shape[1]) if not bool(logits[:, n].isfinite().all())}


def set_aside_ill_conditioned(final, premature, k, positions):
    """``assume`` away (see the module docstring) cases whose float64 logits (``final [N, V]``,
    ``premature [L, N, V]``, post-processed) sit where float32 may legitimately part from them."""
    for n in positions:
        z = final[n]
        size = z.abs().max()
        if k < z.numel():  # no logit may sit near the k-th largest without equalling it
            distance = (z - torch.sort(z, descending=True).values[k - 1]).abs()
            assume(not bool(((distance > 0) & (distance <= 2**-16 * size)).any()))
        d = premature[:, n] - z
        spread = d.amax(-1) - d.amin(-1)
        ratio = spread / torch.maximum(premature[:, n].abs().amax(-1), size)
        floor = ref.NOISE_FLOOR
        assume(not bool(((ratio > floor / 16) & (ratio < floor * 16)).any()))
        largest = ref.contrast_weights(premature[:, n], z, ref.top_tokens(z, k)).max()
        assume(not 0 < largest < 2**-100)


def check_full(out, expected, case, poisoned, atol):
    """The full ``[N, V]`` form against the reference's."""
    N, V, k, lb = case["N"], case["V"], case["k"], case["lower_bound"]
    clean = [n for n in range(N) if n not in poisoned]
    assert out.shape == (N, V) and out.dtype == torch.float32
    if clean:
        assert_matches_reference(out[clean], expected[clean], k, lb, atol)
    for n in poisoned:
        assert bool(out[n].isnan().any()), f"position {n} holds a NaN or an infinity"


def check_topk(values, tokens, full, expected, case, poisoned, atol):
    """The top-k form: the full form's values at its tokens, sorted; the reference's top-k
    (``expected``: its full form with lower bound -inf, since kept values may lie below any
    other)."""
    N, V, k = case["N"], case["V"], case["k"]
    assert values.shape == tokens.shape == (N, k) and tokens.dtype == torch.int64
    assert bool(((tokens >= 0) & (tokens < V)).all())
    assert all(len(set(row.tolist())) == k for row in tokens.cpu())
    clean = [n for n in range(N) if n not in poisoned]
    if not clean:
        return
    values, tokens = values[clean].cpu(), tokens[clean].cpu()
    torch.testing.assert_close(values, full[clean].cpu().gather(1, tokens), atol=0, rtol=0)
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "the top-k form must be sorted"
    expected_values, expected_tokens = ref.topk_of(expected[clean], k)
    assert torch.equal(tokens.sort(1).values, expected_tokens.sort(1).values)
    torch.testing.assert_close(values, expected_values.float(), atol=atol, rtol=RTOL)


def projection_atol(raw, case, positions):
    """ATOL plus float32's rounding of the projection (tolerance.py) at those positions, from the
    logits before post-processing (soft-capping only shrinks their errors)."""
    positions = list(positions)
    largest = raw[:, positions].abs().max().item() if positions else 0.0
    return ATOL + PROJECTION_ROUNDING * abs(case["logit_scale"]) * largest


def scalars(case):
    return dict(iterations=case["iterations"], logit_scale=case["logit_scale"],
                softcap=case["softcap"])


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=cases(projects=True))
def test_fuzz_projection_forms(device, case):
    check_projection_forms(device, case)


@pytest.mark.parametrize("device", DEVICES)
@settings(FUZZ, max_examples=FUZZ.max_examples // 5)
@given(case=cases(projects=True, many_rows=True))
def test_fuzz_projection_forms_with_many_rows(device, case):
    check_projection_forms(device, case)


def check_projection_forms(device, case):
    g = torch.Generator().manual_seed(case["seed"])
    cast = lambda t: None if t is None else laid_out(  # noqa: E731
        t.to(device=device, dtype=case["dtype"]), case["layout"])
    hidden, weight, bias = (cast(t) for t in make_hidden(case, g))
    k, rate, lb = case["k"], case["rate"], case["lower_bound"]
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    raw = torch.stack([ref.project(h, cpu(weight), cpu(bias), torch.float64) for h in cpu(hidden)])
    post = ref.postprocess(raw, case["logit_scale"], case["softcap"])
    poisoned = poisoned_positions(post)
    clean = [n for n in range(case["N"]) if n not in poisoned]
    set_aside_ill_conditioned(post[-1], post[:-1], k, clean)

    expected = {bound: ref.evolve(cpu(hidden), cpu(weight), cpu(bias), k, rate, bound,
                                  dtype=torch.float64, **scalars(case)) for bound in (lb, -math.inf)}
    full = sled_ext.evolve(hidden, weight, bias, evolution_scale=k, evolution_rate=rate,
                           evolution_lower_bound=lb, **scalars(case))
    atol = projection_atol(raw, case, clean)
    check_full(full, expected[lb], case, poisoned, atol)
    values, tokens = sled_ext.evolve_topk(hidden, weight, bias, evolution_scale=k,
                                          evolution_rate=rate, **scalars(case))
    check_topk(values, tokens, full, expected[-math.inf], case, poisoned, atol)


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=cases(projects=False))
def test_fuzz_logits_forms(device, case):
    g = torch.Generator().manual_seed(case["seed"])
    logits = laid_out(make_logits(case, g).to(device=device, dtype=case["dtype"]),
                      case["layout"])
    k, rate, lb = case["k"], case["rate"], case["lower_bound"]
    post = ref.postprocess(logits.cpu().double(), case["logit_scale"], case["softcap"])
    poisoned = poisoned_positions(post)
    clean = [n for n in range(case["N"]) if n not in poisoned]
    set_aside_ill_conditioned(post[-1], post[:-1], k, clean)

    expected = {bound: ref.evolve_logits(logits.cpu(), k, rate, bound, dtype=torch.float64,
                                         **scalars(case)) for bound in (lb, -math.inf)}
    full = sled_ext.evolve_logits(logits, evolution_scale=k, evolution_rate=rate,
                                  evolution_lower_bound=lb, **scalars(case))
    check_full(full, expected[lb], case, poisoned, ATOL)
    values, tokens = sled_ext.evolve_logits_topk(logits, evolution_scale=k, evolution_rate=rate,
                                                 **scalars(case))
    check_topk(values, tokens, full, expected[-math.inf], case, poisoned, ATOL)


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=cases(projects=True, finite=True), projects=st.booleans(), data=st.data())
def test_fuzz_two_phases(device, case, projects, data):
    """partials (or partials_logits) over random vocab shards, then combine and the evolution of
    sled_ext.distributed, against the reference's top-k."""
    V, k, T = case["V"], case["k"], case["iterations"]
    cuts = sorted(data.draw(st.lists(st.integers(1, V - 1), unique=True, max_size=4)
                            if V > 1 else st.just([]), label="shard bounds"))
    shards = list(zip([0, *cuts], [*cuts, V]))
    g = torch.Generator().manual_seed(case["seed"])
    cast = lambda t: None if t is None else t.to(device=device, dtype=case["dtype"])  # noqa: E731
    hidden, weight, bias = (cast(t) for t in make_hidden(case, g))
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    logits = torch.stack([ref.project(h, cpu(weight), cpu(bias), torch.float32)
                          for h in cpu(hidden)]).to(device)
    if projects:
        expected = ref.evolve(cpu(hidden), cpu(weight), cpu(bias), k, case["rate"], -math.inf,
                              dtype=torch.float64, **scalars(case))
        raw = torch.stack([ref.project(h, cpu(weight), cpu(bias), torch.float64)
                           for h in cpu(hidden)])
        post = ref.postprocess(raw, case["logit_scale"], case["softcap"])
    else:
        expected = ref.evolve_logits(logits.cpu(), k, case["rate"], -math.inf,
                                     dtype=torch.float64, **scalars(case))
        post = ref.postprocess(logits.cpu().double(), case["logit_scale"], case["softcap"])
    assume(not poisoned_positions(post))  # a 16-bit cast overflowed; NaN is fuzzed above
    set_aside_ill_conditioned(post[-1], post[:-1], k, range(case["N"]))

    common = dict(evolution_scale=k, logit_scale=case["logit_scale"], softcap=case["softcap"],
                  keep_final=T > 1)
    if projects:
        parts = [sled_ext.partials(hidden, weight[a:b], None if bias is None else bias[a:b],
                                   vocab_offset=a, **common) for a, b in shards]
    else:
        parts = [sled_ext.partials_logits(logits[..., a:b], vocab_offset=a, **common)
                 for a, b in shards]
    values, tokens = combine_and_evolve(parts, k, T, case["rate"])
    expected_values, expected_tokens = ref.topk_of(expected, k)
    assert torch.equal(tokens.cpu().sort(1).values, expected_tokens.sort(1).values)
    atol = projection_atol(raw, case, range(case["N"])) if projects else ATOL
    torch.testing.assert_close(values.cpu(), expected_values.float(), atol=atol, rtol=RTOL)
