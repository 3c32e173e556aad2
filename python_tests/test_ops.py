"""torch.ops.sled.* against sled_ext.reference (float64) over a sampled grid and edge cases."""
import math
import random

import pytest
import torch

import sled_ext
from sled_ext import reference as ref
from sled_ext._C import RECORD_FLOATS
from tolerance import assert_matches_reference

LB = -1000.0


def make_inputs(R, N, H, V, dtype, bias=False, device="cpu"):
    """A residual-stream-like stack (each layer adds to the last) and a vocab head whose logits
    have a standard deviation of about 2."""
    hidden = torch.randn(R, N, H).cumsum(0) / math.sqrt(R)
    weight = torch.randn(V, H) * (2 / math.sqrt(H))
    b = torch.randn(V) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b)


AXES = {
    "R": [2, 3, 17, 33],
    "N": [0, 1, 3, 8],
    "H": [8, 64, 257],
    "V": ["k", 1000, 32003, 128256],
    "k": [1, 5, 10, 75, 100],
    "iterations": [1, 10],
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    "bias": [False, True],
    "softcap": [0.0, 30.0],
    "logit_scale": [1.0, 0.5],
}
def case_id(case):
    return "-".join(f"{a}{str(v).replace('torch.', '')}" for a, v in case.items())


# The float64 reference builds [L, k, V] per position; keep each case's reference work bounded.
POSITION_BUDGET, CASE_BUDGET = 2e7, 6e7


def sampled_grid(count=120, seed=1234):
    """Every value of every axis at least once, the rest drawn at random within the budgets;
    empty batches only where forced (they are cheap and say little)."""
    rng = random.Random(seed)
    forced = [(axis, value) for axis, values in AXES.items() for value in values]
    cases, seen = [], set()
    while len(cases) < count:
        case = {axis: rng.choice(values) for axis, values in AXES.items()}
        case["N"] = rng.choice(AXES["N"][1:])
        if forced:
            case[forced[0][0]] = forced[0][1]
        if case["V"] == "k":
            case["V"] = case["k"]
        work = (case["R"] - 1) * case["k"] * case["V"]
        key = case_id(case)
        if (case["k"] > case["V"] or work > POSITION_BUDGET
                or work * case["N"] > CASE_BUDGET or key in seen):
            continue
        if forced:
            forced.pop(0)
        seen.add(key)
        cases.append(case)
    return cases


GRID = sampled_grid()


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_evolve_matches_reference_on_grid(case, device):
    R, N, H, V, k = (case[a] for a in "RNHVk")
    hidden, weight, bias = make_inputs(R, N, H, V, case["dtype"], case["bias"], device)
    scalars = dict(iterations=case["iterations"], logit_scale=case["logit_scale"],
                   softcap=case["softcap"])
    out = sled_ext.evolve(hidden, weight, bias, evolution_scale=k, evolution_rate=2.0,
                          evolution_lower_bound=LB, **scalars)
    expected = ref.evolve(hidden.cpu(), weight.cpu(), None if bias is None else bias.cpu(), k,
                          2.0, LB, dtype=torch.float64, **scalars)
    assert out.device.type == device
    assert_matches_reference(out, expected, k, LB)

    values, indices = sled_ext.evolve_topk(hidden, weight, bias, evolution_scale=k,
                                           evolution_rate=2.0, **scalars)
    assert values.shape == indices.shape == (N, k) and indices.dtype == torch.int64
    torch.testing.assert_close(values, out.gather(1, indices), atol=0, rtol=0)
    expected_values, _ = ref.topk_of(expected, k)
    torch.testing.assert_close(values.cpu(), expected_values.float(), atol=1e-4, rtol=2e-5)
    if N:
        assert bool((values[:, :-1] >= values[:, 1:]).all()), "top-k form must be sorted"


@pytest.mark.parametrize("iterations", [1, 10])
def test_logits_form_matches_projection_form(device, iterations):
    hidden, weight, bias = make_inputs(4, 3, 32, 3001, torch.float32, True, device)
    logits = torch.stack([ref.project(h, weight, bias) for h in hidden])
    kwargs = dict(evolution_scale=20, evolution_rate=1.5, iterations=iterations, softcap=20.0)
    a = sled_ext.evolve(hidden, weight, bias, evolution_lower_bound=LB, **kwargs)
    b = sled_ext.evolve_logits(logits, evolution_lower_bound=LB, **kwargs)
    assert_matches_reference(a, b.double(), 20, LB)
    values, indices = sled_ext.evolve_logits_topk(logits, **kwargs)
    torch.testing.assert_close(values, b.gather(1, indices), atol=0, rtol=0)


def check_logits_case(logits, k, rate=2.0, iterations=1, lower_bound=LB):
    out = sled_ext.evolve_logits(logits, evolution_scale=k, evolution_rate=rate,
                                 evolution_lower_bound=lower_bound, iterations=iterations)
    expected = ref.evolve_logits(logits.cpu(), k, rate, lower_bound, iterations,
                                 dtype=torch.float64)
    assert_matches_reference(out, expected, k, lower_bound)
    return out


def test_exact_ties_keep_the_lower_tokens(device):
    # Final logits from a handful of values: many exact ties at the top-k boundary.
    logits = torch.randint(0, 4, (3, 5, 700)).float().to(device)
    for k in (1, 7, 100):
        out = check_logits_case(logits, k)
        final = logits[-1].cpu()
        for n in range(final.shape[0]):
            kept = (out[n] != LB).nonzero().flatten().cpu()
            assert torch.equal(kept, torch.sort(ref.top_tokens(final[n], k)).values)


def test_exact_ties_through_the_projection(device):
    # Small integers make every logit exact in float32, whatever the summation order.
    hidden = torch.randint(-2, 3, (3, 4, 16)).float().to(device)
    weight = torch.randint(-2, 3, (999, 16)).float().to(device)
    weight[500:] = weight[:499]  # duplicate rows: exact ties between distant tokens
    out = sled_ext.evolve(hidden, weight, None, evolution_scale=30, evolution_lower_bound=LB)
    expected = ref.evolve(hidden.cpu(), weight.cpu(), None, 30, 2.0, LB, dtype=torch.float64)
    assert_matches_reference(out, expected, 30, LB)


@pytest.mark.parametrize("V", [1, 2, 37, 1000])
def test_k_equals_vocab(device, V):
    logits = torch.randn(3, 2, V, device=device) * 3
    for iterations in (1, 10):
        out = check_logits_case(logits, V, iterations=iterations)
        assert bool((out != LB).all())


def test_one_premature_layer(device):
    check_logits_case(torch.randn(2, 4, 5003, device=device) * 2, 10, iterations=10)


def test_premature_layer_identical_to_final(device):
    logits = torch.randn(3, 2, 2000, device=device) * 2
    logits[1] = logits[2]  # zero contrast for layer 1
    check_logits_case(logits, 10)
    logits[0] = logits[2]  # zero contrast everywhere: only the softmax step moves the logits
    out = check_logits_case(logits, 10)
    final = logits[2].double().cpu()
    step = final - 2.0 * torch.softmax(final, -1)
    kept = out.cpu() != LB
    torch.testing.assert_close(out.cpu()[kept].double(), step[kept], atol=1e-5, rtol=1e-6)


def no_contrast(final, k, iterations, rate=2.0):
    """The float64 result of SLED without any layer contrast: final logits [N, V] evolved alone."""
    final = final.double().cpu()
    return ref.evolve_logits(torch.stack([final, final]), k, rate, LB, iterations,
                             dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,k", [(2, 1), (3, 1000)])
def test_a_layer_with_the_final_hidden_state_has_no_contrast(device, dtype, R, k):
    """The issue's case: several positions, a premature hidden state equal to the final one. A
    batched projection may round the two rows differently; that must not become a contrast."""
    hidden, weight, bias = make_inputs(R, 6, 64, 1000, dtype, True, device)
    hidden[0] = hidden[-1]
    out = sled_ext.evolve(hidden, weight, bias, evolution_scale=k, evolution_lower_bound=LB,
                          iterations=10)
    expected = ref.evolve(hidden.cpu(), weight.cpu(), bias.cpu(), k, 2.0, LB, 10,
                          dtype=torch.float64)
    assert_matches_reference(out, expected, k, LB)
    if R == 2:
        final = ref.project(hidden[-1].cpu(), weight.cpu(), bias.cpu(), dtype=torch.float64)
        assert_matches_reference(out, no_contrast(final, k, 10), k, LB)


@pytest.mark.parametrize("k", [1, 10])
def test_rounding_level_differences_are_no_contrast(device, k):
    """Hidden states 1e-7 apart (the size of float32 rounding) project to logits whose difference
    is below the noise floor: no contrast, in the op and in the float64 reference alike."""
    hidden, weight, bias = make_inputs(2, 5, 256, 3000, torch.float32, True, device)
    hidden[0] = hidden[-1] * (1 + 1e-7 * torch.randn_like(hidden[-1]))
    out = sled_ext.evolve(hidden, weight, bias, evolution_scale=k, evolution_lower_bound=LB,
                          iterations=10)
    final = ref.project(hidden[-1].cpu(), weight.cpu(), bias.cpu(), dtype=torch.float64)
    expected = ref.evolve(hidden.cpu(), weight.cpu(), bias.cpu(), k, 2.0, LB, 10,
                          dtype=torch.float64)
    assert_matches_reference(out, expected, k, LB)
    assert_matches_reference(out, no_contrast(final, k, 10), k, LB)


def test_logits_rounded_in_another_order_are_no_contrast(device):
    """The logits form, fed what a batched projection gives: the same hidden state's logits
    summed in another order, so the rows differ by float32 rounding only."""
    hidden, weight, _ = make_inputs(2, 4, 512, 5000, torch.float32)
    order = torch.randperm(512)
    final = hidden[-1] @ weight.T
    logits = torch.stack([hidden[-1][:, order] @ weight[:, order].T, final]).to(device)
    assert bool((logits[0] != logits[1]).any()), "the test needs rows that differ by rounding"
    for k, iterations in ((1, 10), (10, 1), (5000, 3)):
        out = check_logits_case(logits, k, iterations=iterations)
        assert_matches_reference(out, no_contrast(final, k, iterations), k, LB)


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_noise_floor_boundary(device, shift):
    """A premature row = final row + a constant + a spread of 1/8 of the floor has no contrast;
    with a spread of 8 times the floor its contrast counts (op and reference agree on both)."""
    final = torch.randn(3, 2000, dtype=torch.float64) * 2
    wiggle = torch.rand(3, 2000, dtype=torch.float64)
    wiggle = wiggle - wiggle.amin(-1, keepdim=True)
    wiggle = wiggle / wiggle.amax(-1, keepdim=True)  # spread exactly 1
    size = (final.abs() + shift).amax(-1, keepdim=True)  # the largest |logit| of either row
    for factor, floored in ((1 / 8, True), (8, False)):
        premature = final + shift + factor * sled_ext.reference.NOISE_FLOOR * size * wiggle
        logits = torch.stack([premature, final]).float().to(device)
        out = check_logits_case(logits, 10, iterations=3)
        plain = no_contrast(logits[1], 10, 3).to(out.device).float()
        if floored:
            assert_matches_reference(out, plain.double(), 10, LB)
        else:
            assert (out - plain).abs().max() > 0.1


def test_all_zero_weights(device):
    hidden, _, _ = make_inputs(4, 3, 64, 1000, torch.float32, device=device)
    weight = torch.zeros(1000, 64, device=device)
    out = sled_ext.evolve(hidden, weight, None, evolution_scale=10, evolution_lower_bound=LB)
    expected = ref.evolve(hidden.cpu(), weight.cpu(), None, 10, 2.0, LB, dtype=torch.float64)
    assert_matches_reference(out, expected, 10, LB)
    assert bool((out[:, :10] != LB).all())  # all tie: the lowest tokens win


@pytest.mark.parametrize("scale", [1e-6, 1e3, 3e4])
def test_huge_and_tiny_logits(device, scale):
    logits = torch.randn(5, 3, 4099, device=device) * scale
    out = sled_ext.evolve_logits(logits, evolution_scale=10, evolution_lower_bound=LB,
                                 iterations=10)
    expected = ref.evolve_logits(logits.cpu(), 10, 2.0, LB, 10, dtype=torch.float64)
    assert torch.isfinite(out).all()
    assert torch.equal(out != LB, expected.to(out.device) != LB)
    torch.testing.assert_close(out, expected.float().to(out.device), atol=1e-4, rtol=1e-5)


def test_dominant_premature_token_is_exact(device):
    """The trap of docs/algorithm.md, "Numerics": premature rows nearly sure of token 7
    (1 - p = 1e-3 ... 1e-10), and a final row that puts token 7 slightly further ahead, so its
    contrast weight is positive and matters. The published float32 math cancels there; the
    kernel must not."""
    logits = torch.randn(6, 4, 4096, dtype=torch.float64)
    logits[:-1, :, 7] += torch.tensor([14.0, 18.0, 22.0, 26.0, 30.0])[:, None]
    logits[-1, :, 7] += 24.0
    logits = logits.float()
    out = sled_ext.evolve_logits(logits.to(device), evolution_scale=10,
                                 evolution_lower_bound=LB).cpu()
    exact = ref.evolve_logits(logits, 10, 2.0, LB, dtype=torch.float64).float()
    published = ref.evolve_logits(logits, 10, 2.0, LB)
    kernel_error = (out - exact).abs().max().item()
    published_error = (published - exact).abs().max().item()
    assert kernel_error < 2e-5
    assert published_error > 1e-3  # the float32 published math does lose accuracy here


def test_the_oracle_is_exact_for_a_layer_sure_of_its_token(device):
    """A premature layer leading by 37 nats: 1 - p_a is below float64's resolution, so the plain
    float64 p - e_a points the wrong way (found by the fuzzing). Here the exact cosine is negative,
    no contrast: the evolved value is the final logit minus rate * its probability."""
    logits = torch.tensor([[[13.0, -24.0]], [[-5.7, -31.3]]])
    out = check_logits_case(logits.to(device), 1, rate=0.5)
    final = logits[-1, 0].double()
    expected = final[0] - 0.5 * torch.softmax(final, -1)[0]
    torch.testing.assert_close(out[0, 0].cpu().double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_empty_batch(device, dtype):
    hidden, weight, bias = make_inputs(3, 0, 16, 100, dtype, True, device)
    out = sled_ext.evolve(hidden, weight, bias, evolution_scale=5)
    assert out.shape == (0, 100) and out.dtype == torch.float32 and out.device.type == device
    values, indices = sled_ext.evolve_topk(hidden, weight, bias, evolution_scale=5)
    assert values.shape == indices.shape == (0, 5)
    assert sled_ext.evolve_logits(torch.randn(3, 0, 100, device=device)).shape == (0, 100)
    stats, _, values, _, premature, _ = sled_ext.partials(hidden, weight, bias, vocab_offset=0,
                                                          evolution_scale=5)
    assert stats.shape[0] == values.shape[0] == premature.shape[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_empty_hidden_size(device, dtype):
    """H = 0: every logit is the bias (a zero product), on every projection path."""
    hidden = torch.empty(3, 2, 0, dtype=dtype, device=device)
    weight = torch.empty(50, 0, dtype=dtype, device=device)
    bias = torch.randn(50).to(device=device, dtype=dtype)
    out = sled_ext.evolve(hidden, weight, bias, evolution_scale=5)
    expected = ref.evolve(hidden.double(), weight.double(), bias.double(), 5, 2.0, LB)
    assert_matches_reference(out, expected, 5, LB)


def test_non_contiguous_inputs(device):
    hidden, weight, bias = make_inputs(5, 3, 64, 2001, torch.float32, True, device)
    wide = torch.randn(2001, 128, device=device)
    wide[:, ::2] = weight
    strided_weight = wide[:, ::2]
    strided_hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided_weight.is_contiguous() and not strided_hidden.is_contiguous()
    a = sled_ext.evolve(hidden, weight, bias, evolution_lower_bound=LB)
    b = sled_ext.evolve(strided_hidden, strided_weight, bias, evolution_lower_bound=LB)
    assert_matches_reference(b, a.double(), 10, LB)
    logits = torch.stack([ref.project(h, weight, bias) for h in hidden])
    c = sled_ext.evolve_logits(logits.transpose(1, 2).contiguous().transpose(1, 2),
                               evolution_lower_bound=LB)
    assert_matches_reference(c, a.double(), 10, LB)


def test_deterministic_and_independent_of_thread_count():
    hidden, weight, bias = make_inputs(9, 4, 64, 50000, torch.float32, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sled_ext.evolve(hidden, weight, bias, iterations=3)
        torch.set_num_threads(max(2, threads))
        many = sled_ext.evolve(hidden, weight, bias, iterations=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.equal(many, sled_ext.evolve(hidden, weight, bias, iterations=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_weight_that_requires_grad(device, dtype):
    """A model's parameters require grad; the op (its products run in worker threads too) gives
    the same values with or without grad mode, as with a plain tensor."""
    hidden, weight, _ = make_inputs(5, 3, 64, 20000, dtype, device=device)
    expected = sled_ext.evolve(hidden, weight)
    parameter = torch.nn.Parameter(weight)
    assert torch.equal(sled_ext.evolve(hidden, parameter), expected)
    with torch.inference_mode():
        assert torch.equal(sled_ext.evolve(hidden, parameter), expected)


def test_non_finite_inputs_stay_in_their_position(device):
    """Documented: a NaN/inf in a position's hidden rows makes that position's evolved values NaN;
    other positions are untouched; the kept tokens are always k distinct valid indices."""
    hidden, weight, bias = make_inputs(4, 3, 32, 1000, torch.float32, True, device)
    clean = sled_ext.evolve(hidden, weight, bias, evolution_lower_bound=LB)
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = hidden.clone()
        poisoned[1, 1, 5] = bad
        out = sled_ext.evolve(poisoned, weight, bias, evolution_lower_bound=LB)
        assert torch.equal(out[[0, 2]], clean[[0, 2]])
        assert torch.isnan(out[1]).any()
        values, indices = sled_ext.evolve_topk(poisoned, weight, bias)
        assert bool(((indices >= 0) & (indices < 1000)).all())
        assert all(len(set(row.tolist())) == 10 for row in indices)


@pytest.mark.parametrize("V", [11, 16, 1003])
def test_a_nan_logit_nothing_keeps_still_poisons_its_position(device, V):
    """A NaN outside the top-k, in a premature row, at the vocab's end: where the CPU kernel's last
    SIMD lanes and scalar tail hold it alone (it was once dropped there with them)."""
    logits = torch.randn(3, 2, V, device=device)
    logits[0, 1, V - 1] = float("nan")
    logits[-1, 1, V - 1] = -50.0  # never kept
    out = sled_ext.evolve_logits(logits, evolution_scale=2, evolution_lower_bound=LB)
    assert bool(out[1].isnan().any())
    assert torch.equal(out[0], sled_ext.evolve_logits(logits[:, :1], evolution_scale=2,
                                                      evolution_lower_bound=LB)[0])


def test_non_finite_weight_does_not_crash(device):
    hidden, weight, bias = make_inputs(4, 3, 32, 1000, torch.float32, True, device)
    for bad in (float("nan"), float("inf")):
        w = weight.clone()
        w[123, 4] = bad
        out = sled_ext.evolve(hidden, w, bias, evolution_scale=10, iterations=10)
        assert out.shape == (3, 1000)
        values, indices = sled_ext.evolve_topk(hidden, w, bias, evolution_scale=10)
        assert bool(((indices >= 0) & (indices < 1000)).all())
        assert all(len(set(row.tolist())) == 10 for row in indices)


def good_args(device="cpu"):
    hidden, weight, bias = make_inputs(3, 2, 8, 50, torch.float32, True, device)
    return dict(hidden=hidden, weight=weight, bias=bias, evolution_scale=5, evolution_rate=2.0,
                evolution_lower_bound=LB, iterations=1, logit_scale=1.0, softcap=0.0)


BAD_INPUTS = [
    (dict(hidden=torch.randn(2, 8)), ValueError, "hidden must be [R, N, H]"),
    (dict(hidden=torch.randn(1, 2, 8)), ValueError, "R >= 2"),
    (dict(weight=torch.randn(50, 9)), ValueError, "weight must be [V, H] with H = 8"),
    (dict(bias=torch.randn(49)), ValueError, "bias must be [V] = [50]"),
    (dict(evolution_scale=0), ValueError, "evolution_scale (k) must be in [1, V] = [1, 50]"),
    (dict(evolution_scale=51), ValueError, "evolution_scale (k) must be in [1, V] = [1, 50]"),
    (dict(iterations=0), ValueError, "iterations must be >= 1"),
    (dict(evolution_rate=float("nan")), ValueError, "evolution_rate must be finite"),
    (dict(evolution_lower_bound=float("nan")), ValueError, "evolution_lower_bound must not be NaN"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale must be finite"),
    (dict(hidden=torch.ones(3, 2, 8, dtype=torch.int64)), TypeError, "hidden must be float32"),
    (dict(weight=torch.ones(50, 8, dtype=torch.int32)), TypeError, "weight is Int but hidden"),
    (dict(weight=torch.randn(50, 8, dtype=torch.float64)), TypeError, "weight is Double"),
    (dict(bias=torch.randn(50).half()), TypeError, "bias is Half but hidden is Float"),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_input_gets_a_clear_error(change, error, message):
    args = {**good_args(), **change}
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        sled_ext.evolve(args.pop("hidden"), args.pop("weight"), args.pop("bias"), **args)


def test_bad_logits_get_a_clear_error():
    with pytest.raises(ValueError, match=r"logits must be \[R, N, V\]"):
        sled_ext.evolve_logits(torch.randn(5, 7))
    with pytest.raises(ValueError, match="R >= 2"):
        sled_ext.evolve_logits_topk(torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match=r"\[1, V\] = \[1, 7\]"):
        sled_ext.evolve_logits(torch.randn(2, 2, 7), evolution_scale=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_get_a_clear_error():
    args = good_args()
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        sled_ext.evolve(args["hidden"], args["weight"].cuda(), None)


def test_opcheck(device):
    args = good_args(device)
    evolve_args = tuple(args.values())
    torch.library.opcheck(torch.ops.sled.evolve.default, evolve_args)
    topk_args = evolve_args[:5] + evolve_args[6:]
    torch.library.opcheck(torch.ops.sled.evolve_topk.default, topk_args)
    logits = torch.randn(3, 2, 50, device=device)
    torch.library.opcheck(torch.ops.sled.evolve_logits.default, (logits, 5, 2.0, LB, 2, 1.0, 0.0))
    torch.library.opcheck(torch.ops.sled.evolve_logits_topk.default, (logits, 5, 2.0, 2, 1.0, 0.0))


def test_opcheck_two_phase(device):
    hidden, weight, bias = make_inputs(3, 2, 16, 50, torch.float32, True, device)
    torch.library.opcheck(torch.ops.sled.partials.default,
                          (hidden, weight[10:], bias[10:], 10, 5, 1.0, 0.0, True))
    logits = torch.randn(3, 2, 50, device=device)
    torch.library.opcheck(torch.ops.sled.partials_logits.default, (logits, 0, 5, 1.0, 0.0, False))
    parts = [p[None] for p in sled_ext.partials_logits(logits, evolution_scale=5)[:5]]
    torch.library.opcheck(torch.ops.sled.combine.default, (*parts, 4))


def test_fake_kernels_check_the_contract():
    """Traced with fake tensors, a call that breaks the op's contract fails as the op would."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        hidden, weight = torch.empty(3, 2, 16), torch.empty(50, 16)
        with pytest.raises(ValueError, match="weight must be"):
            torch.ops.sled.evolve_topk(hidden, torch.empty(50, 8), None, 5, 2.0)
        with pytest.raises(ValueError, match="R >= 2"):
            torch.ops.sled.evolve_logits(torch.empty(1, 2, 50), 5, 2.0, LB)
        with pytest.raises(ValueError, match=r"evolution_scale \(k\) must be in \[1, V\]"):
            torch.ops.sled.evolve(hidden, weight, None, 51, 2.0, LB)
        with pytest.raises(TypeError, match="use one dtype"):
            torch.ops.sled.partials(hidden, weight.half(), None, 0, 5)
        stats, argmax, values, tokens, premature, _ = torch.ops.sled.partials(
            hidden, weight, None, 0, 5)
        with pytest.raises(ValueError, match="premature must have shape"):
            torch.ops.sled.combine(stats[None], argmax[None], values[None], tokens[None],
                                   premature[None, :, :, :1], 5)


def test_compiles_with_fullgraph(device):
    hidden, weight, bias = make_inputs(3, 2, 16, 300, torch.float32, True, device)

    def step(hidden, weight, bias):
        values, indices = sled_ext.evolve_topk(hidden, weight, bias, evolution_scale=7)
        return indices.gather(1, values.argmax(1, keepdim=True)), sled_ext.evolve(
            hidden, weight, bias, evolution_scale=7)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(hidden, weight, bias), step(hidden, weight, bias)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("iterations", [1, 3])
def test_many_positions_and_small_vocab_slices(device, iterations):
    # Several position groups on CUDA (32 positions each) and vocab slices narrower than k.
    hidden, weight, bias = make_inputs(3, 70, 16, 2500, torch.float32, True, device)
    out = sled_ext.evolve(hidden, weight, bias, evolution_scale=100, evolution_lower_bound=LB,
                          iterations=iterations)
    expected = ref.evolve(hidden.cpu(), weight.cpu(), bias.cpu(), 100, 2.0, LB, iterations,
                          dtype=torch.float64)
    assert_matches_reference(out, expected, 100, LB)


def test_many_packed_rows_over_a_large_vocab(device):
    """136 bf16 rows (R = 17, N = 8) over 128256 tokens: on AVX-512 CPUs with brgemm, each lane of
    the statistics fold sums one row's tokens of a whole chunk in order (fold_columns), a longer
    float32 sum than the other layouts'."""
    hidden, weight, _ = make_inputs(17, 8, 320, 128256, torch.bfloat16, device=device)
    out = sled_ext.evolve(hidden, weight, evolution_scale=10, evolution_lower_bound=LB)
    expected = ref.evolve(hidden.cpu(), weight.cpu(), None, 10, 2.0, LB, dtype=torch.float64)
    assert_matches_reference(out, expected, 10, LB)


@pytest.mark.parametrize("R,N,H", [(12, 1, 64), (16, 1, 100), (3, 8, 33), (31, 1, 576),
                                   (18, 2, 70), (16, 3, 128), (7, 7, 40), (2, 1, 50), (5, 1, 17),
                                   (17, 1, 96), (23, 1, 65), (11, 3, 40), (2, 17, 24),
                                   (24, 2, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_float_rows_go_through_float_product(device, R, N, H, dtype):
    """At most 48 float32 rows (float16 too where there is no brgemm for it) go through
    float_product: at AVX512 1-3 vectors of hidden rows against blocks of 24 / 12 / 8 tokens and
    the blocks' remainders, at AVX2 (make test-levels) up to 6 vectors of 8 in passes of at most
    3. Its [tile, columns] product is folded a lane per row where the rows fill 3/4 of the AVX-512
    lanes (12, 16, 24, 31, 36, 48 rows), else turned back (2, 5, 17, 23, 33, 34); 49 rows (7 x 7)
    go to sgemm. Bias and soft-capping on, a vocab that ends mid-tile and mid-vector."""
    hidden, weight, bias = make_inputs(R, N, H, 5003, dtype, True, device)
    kwargs = dict(evolution_scale=20, iterations=3, softcap=30.0)
    out = sled_ext.evolve(hidden, weight, bias, evolution_lower_bound=LB, **kwargs)
    expected = ref.evolve(hidden.cpu(), weight.cpu(), bias.cpu(), 20, 2.0, LB, iterations=3,
                          softcap=30.0, dtype=torch.float64)
    assert_matches_reference(out, expected, 20, LB)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_rejects_more_rows_than_it_stages():
    with pytest.raises(ValueError, match="at most 128 stacked rows"):
        sled_ext.evolve_logits(torch.randn(129, 1, 50, device="cuda"))
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype, device="cuda")
    S, N, R, kept = 1, 1, 129, 1
    with pytest.raises(ValueError, match="at most 128 stacked rows"):
        sled_ext.combine(zeros(S, N, R, RECORD_FLOATS), zeros(S, N, R, dtype=torch.long),
                         zeros(S, N, kept), zeros(S, N, kept, dtype=torch.long),
                         zeros(S, N, kept, R - 1), evolution_scale=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_capture_replays_the_step():
    """No host synchronisation inside the op: a step captures into a CUDA graph."""
    hidden, weight, bias = make_inputs(5, 4, 64, 5000, torch.bfloat16, True, "cuda")
    eager = sled_ext.evolve(hidden, weight, bias, iterations=2)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sled_ext.evolve(hidden, weight, bias, iterations=2)  # warm-up outside the capture
        with torch.cuda.graph(graph, stream=stream):
            captured = sled_ext.evolve(hidden, weight, bias, iterations=2)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
