"""The two-phase op and SLED over a vocab-sharded head (gloo processes on CPU)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sled_ext
from sled_ext import distributed
from two_phase import combine_and_evolve

K = 10


def make_case(seed=0, R=5, N=3, H=32, V=1003):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, N, H, generator=g).cumsum(0) / R**0.5
    weight = torch.randn(V, H, generator=g) * (2 / H**0.5)
    bias = torch.randn(V, generator=g)
    return hidden, weight, bias


def split(V, bounds):
    edges = [0, *bounds, V]
    return list(zip(edges[:-1], edges[1:]))


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def sharded_topk(hidden, weight, bias, shards, iterations, rate=2.0, **kw):
    parts = [sled_ext.partials(hidden, weight[a:b], bias[a:b], vocab_offset=a, evolution_scale=K,
                               keep_final=iterations > 1, **kw) for a, b in shards]
    return combine_and_evolve(parts, K, iterations, rate)


@pytest.mark.parametrize("iterations", [1, 4])
@pytest.mark.parametrize("bounds", [[], [17], [300, 301, 900], [5, 6, 7, 8, 9]])
def test_shards_combine_to_the_single_device_op(bounds, iterations, device):
    hidden, weight, bias = on(device, *make_case())
    kw = dict(logit_scale=0.7, softcap=20.0)
    expected = sled_ext.evolve_topk(hidden, weight, bias, evolution_scale=K,
                                    iterations=iterations, **kw)
    got = sharded_topk(hidden, weight, bias, split(1003, bounds), iterations, **kw)
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("iterations", [1, 3])
def test_rate_zero_keeps_the_final_logits(iterations, device):
    hidden, weight, bias = on(device, *make_case(seed=2))
    expected = sled_ext.evolve_topk(hidden, weight, bias, evolution_scale=K, evolution_rate=0.0,
                                    iterations=iterations)
    got = sharded_topk(hidden, weight, bias, split(1003, [400]), iterations, rate=0.0)
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-6)
    final = (hidden[-1] @ weight.T + bias).topk(K)
    torch.testing.assert_close(got[0], final.values, atol=1e-5, rtol=1e-6)


def test_a_shard_without_any_of_the_top_k(device):
    hidden, weight, bias = on(device, *make_case(seed=1))
    bias[500:] -= 100.0  # the second shard's tokens can never make the top-k
    got = sharded_topk(hidden, weight, bias, split(1003, [500]), 1)
    assert bool((got[1] < 500).all())
    expected = sled_ext.evolve_topk(hidden, weight, bias, evolution_scale=K)
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("iterations", [1, 3])
def test_shards_merge_what_the_noise_floor_reads(iterations, device):
    """Premature row 0 equals the final row up to rounding on the first shards and differs on the
    last one only: its contrast counts, which no shard can tell alone. Row 1 is a constant shift
    of the final row plus rounding everywhere: no contrast, though every shard holds some."""
    final = torch.randn(3, 1003) * 2
    rounding = 1e-7 * final.abs().amax() * torch.rand(3, 1003)
    logits = torch.stack([final + rounding, final + 4.0 + rounding, final])
    logits[0, :, 900:] += torch.randn(3, 103)
    logits = logits.to(device)
    expected = sled_ext.evolve_logits_topk(logits, evolution_scale=K, iterations=iterations)
    reference = sled_ext.reference.evolve_logits(logits.cpu(), K, 2.0, float("-inf"), iterations,
                                                 dtype=torch.float64)
    torch.testing.assert_close(expected[0].cpu().double(),
                               sled_ext.reference.topk_of(reference, K)[0], atol=1e-4, rtol=2e-5)
    without_row_0 = sled_ext.evolve_logits_topk(logits[1:], evolution_scale=K,
                                                iterations=iterations)
    assert (expected[0] - without_row_0[0]).abs().max() > 0.1  # row 0's contrast counts
    final_alone = sled_ext.evolve_logits_topk(logits[[2, 2]], evolution_scale=K,
                                              iterations=iterations)
    torch.testing.assert_close(without_row_0, final_alone, atol=1e-5, rtol=1e-6)  # row 1's not
    for bounds in ([], [300, 600], [899, 900]):
        parts = [sled_ext.partials_logits(logits[..., a:b], vocab_offset=a, evolution_scale=K,
                                          keep_final=iterations > 1)
                 for a, b in split(1003, bounds)]
        got = combine_and_evolve(parts, K, iterations)
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-6)


def test_partials_pad_small_shards_and_their_size_ignores_the_vocab(device):
    hidden, weight, bias = on(device, *make_case())
    stats, argmax, values, tokens, premature, rows = sled_ext.partials(
        hidden, weight[:4], bias[:4], vocab_offset=200, evolution_scale=K)
    assert tokens.shape == (3, K) and bool((tokens[:, 4:] == -1).all())
    assert set(tokens[0, :4].tolist()) == {200, 201, 202, 203} and rows.shape == (3, 0)
    assert argmax.min() >= 200 and argmax.max() <= 203
    sizes = {sum(t.numel() * t.element_size() for t in sled_ext.partials(
        hidden, weight[:V], bias[:V], vocab_offset=0, evolution_scale=K)[:5]) for V in (50, 1003)}
    assert sizes == {distributed.partials_bytes(3, 5, K)}


@pytest.mark.parametrize("bounds", [[], [300, 301, 900]])
def test_partials_of_held_logits_match_the_projecting_phase(bounds, device):
    hidden, weight, bias = on(device, *make_case())
    kw = dict(evolution_scale=K, logit_scale=0.7, softcap=20.0, keep_final=True)
    logits = hidden @ weight.T + bias  # before scaling and soft-capping, as the op takes them
    for a, b in split(1003, bounds):
        got = sled_ext.partials_logits(logits[..., a:b], vocab_offset=a, **kw)
        expected = sled_ext.partials(hidden, weight[a:b], bias[a:b], vocab_offset=a, **kw)
        for name, x, y in zip(("stats", "argmax", "values", "tokens", "premature", "rows"), got,
                              expected):
            if x.dtype == torch.int64:
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=name)


def test_partials_of_held_logits_check_their_shape():
    with pytest.raises(ValueError, match=r"logits must be \[R, N, V\]"):
        sled_ext.partials_logits(torch.zeros(3, 50), evolution_scale=K)
    with pytest.raises(ValueError, match="R >= 2"):
        sled_ext.partials_logits(torch.zeros(1, 2, 50), evolution_scale=K)
    with pytest.raises(ValueError, match="vocab_offset must be >= 0"):
        sled_ext.partials_logits(torch.zeros(2, 2, 50), vocab_offset=-1, evolution_scale=K)


def test_combine_checks_its_inputs():
    hidden, weight, bias = make_case()
    parts = [t[None] for t in sled_ext.partials(hidden, weight, bias, vocab_offset=0,
                                                 evolution_scale=K)[:5]]
    with pytest.raises(ValueError, match=r"evolution_scale \(k\) must be in \[1, 10\]"):
        sled_ext.combine(*parts, evolution_scale=11)
    with pytest.raises(ValueError, match="premature must have shape"):
        sled_ext.combine(*parts[:4], parts[4][..., :2], evolution_scale=K)
    few = [t[:, :, :3] if i >= 2 else t for i, t in enumerate(parts)]
    few[3] = torch.full_like(few[3], -1)
    with pytest.raises(ValueError, match="fewer than k"):
        sled_ext.combine(*few, evolution_scale=3)


def test_opcheck_of_both_phases(device):
    hidden, weight, bias = on(device, *make_case(N=2, V=60))
    torch.library.opcheck(torch.ops.sled.partials.default,
                          (hidden, weight, bias, 100, K, 1.0, 0.0, True))
    parts = [t[None] for t in sled_ext.partials(hidden, weight, bias, vocab_offset=0,
                                                 evolution_scale=K)[:5]]
    torch.library.opcheck(torch.ops.sled.combine.default, (*parts, K))
    torch.library.opcheck(torch.ops.sled.partials_logits.default,
                          (hidden @ weight.T, 100, K, 0.5, 3.0, True))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, bounds, iterations):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hidden, weight, bias = make_case(seed=2)
        a, b = split(weight.shape[0], bounds)[rank]
        got = distributed.evolve_topk(hidden, weight[a:b], bias[a:b], vocab_offset=a,
                                      evolution_scale=K, iterations=iterations)
        expected = sled_ext.evolve_topk(hidden, weight, bias, evolution_scale=K,
                                        iterations=iterations)
        assert torch.equal(got[1], expected[1]), (rank, got[1], expected[1])
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-6)
        everyone = [torch.empty_like(got[0]) for _ in range(world)]
        dist.all_gather(everyone, got[0])
        assert all(torch.equal(v, got[0]) for v in everyone), "ranks disagree"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,bounds", [(2, [400]), (4, [10, 500, 501])])
@pytest.mark.parametrize("iterations", [1, 3])
def test_gloo_ranks_match_the_single_process_op(world, bounds, iterations):
    mp.spawn(rank_main, args=(world, free_port(), bounds, iterations), nprocs=world, join=True)


def tensor_parallel_main(rank, world, port, folder):
    """transformers' own tensor parallelism (tp_plan="auto") splits the vocab head: the loop must
    decode as the unsplit model does, on every rank."""
    from transformers import AutoModelForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    split = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
    whole = AutoModelForCausalLM.from_pretrained(folder).eval()
    try:
        assert sled_ext.adapt(split).vocab_shard is not None
        ids = torch.tensor([[5, 17, 99, 3, 42]])
        for method in ("sled", "greedy", "dola"):
            kw = dict(method=method, max_new_tokens=6, eos_token_id=[], iterations=2)
            got = sled_ext.generate(split, ids, **kw)
            assert torch.equal(got, sled_ext.generate(whole, ids, **kw)), (method, rank)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_model_decodes_like_the_whole_model(tmp_path):
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    mp.spawn(tensor_parallel_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_combine_on_cuda_marks_missing_candidates_instead_of_reading_past_them():
    hidden, weight, bias = on("cuda", *make_case(V=6))
    parts = [t[None] for t in sled_ext.partials(hidden, weight, bias, vocab_offset=0,
                                                 evolution_scale=K)[:5]]
    tokens, values, delta, _ = sled_ext.combine(*parts, evolution_scale=K)
    assert bool((tokens[:, 6:] == -1).all()) and bool(values[:, 6:].isnan().all())
    assert bool((tokens[:, :6] >= 0).all())
