"""The decoding loop: parity with transformers and with a cache-free reference loop, batching,
stopping, streaming, DoLa."""
import math

import pytest
import torch
import torch.nn.functional as F

import sled_ext
from sled_ext import reference
from sled_ext.decoding import dola_contrast
from tiny_models import ARCHITECTURES, VOCAB, tiny_model

NO_EOS = dict(eos_token_id=[])


def prompt(length, seed=0, batch=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers_generate(arch):
    model = tiny_model(arch)
    ids = prompt(6)
    expected = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(sled_ext.generate(model, ids, method="greedy", max_new_tokens=8, **NO_EOS),
                       expected)


def reference_loop(model, ids, steps, k=10, rate=2.0, lower_bound=-1000.0):
    """Published-style SLED: recompute the whole sequence each step (no cache), project every
    candidate layer with its own head call, run the reference math."""
    head = model.get_output_embeddings()
    for _ in range(steps):
        hidden = model(ids, output_hidden_states=True).hidden_states  # emb, blocks..., final
        rows = torch.stack([h[:, -1] for h in hidden])
        logits = reference.evolve(rows, head.weight, head.bias, k, rate, lower_bound,
                                  dtype=torch.float64)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "gpt_neox"])
def test_sled_matches_a_cache_free_reference_loop(arch):
    model = tiny_model(arch)
    ids = prompt(5, seed=3)
    with torch.no_grad():
        expected = reference_loop(model, ids, steps=10)
    assert torch.equal(sled_ext.generate(model, ids, method="sled", max_new_tokens=10, **NO_EOS),
                       expected)
    differs = [not torch.equal(*(sled_ext.generate(model, prompt(5, seed), method=m,
                                                   max_new_tokens=10, **NO_EOS)
                                 for m in ("sled", "greedy")))
               for seed in range(4)]
    assert any(differs), "SLED never changed a greedy choice: is it doing anything?"


@pytest.mark.parametrize("method", ["sled", "dola", "greedy"])
def test_batched_output_equals_per_row_output(method):
    model = tiny_model("llama")
    prompts = [prompt(n, seed=n)[0] for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batched = sled_ext.generate(model, ids, mask, method=method, max_new_tokens=6,
                                repetition_penalty=1.05, **NO_EOS)
    for row, p in enumerate(prompts):
        alone = sled_ext.generate(model, p[None], method=method, max_new_tokens=6,
                                  repetition_penalty=1.05, **NO_EOS)
        assert torch.equal(batched[row, width:], alone[0, len(p):])


@pytest.mark.parametrize("method", ["sled", "dola", "greedy"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_finished_rows_leave_the_batch_without_changing_any_row(arch, method):
    """Rows stop at different steps (on their own content); dropping them from the batch and KV
    cache (a sliding-window one too) gives the tokens of the loop that keeps them."""
    from transformers.generation import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
    from sled_ext.decoding import Method, StepScorer, decode
    from sled_ext.models import adapt
    model = tiny_model(arch, sliding_window=4) if arch == "gemma3" else tiny_model(arch)
    adapter = adapt(model)
    prompts = [prompt(n, seed=n)[0] for n in (3, 7, 5, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batch_sizes = []
    forward = adapter.forward
    adapter.forward = lambda input_ids, *rest: (batch_sizes.append(len(input_ids)),
                                                forward(input_ids, *rest))[1]

    def run(drop_finished):
        batch_sizes.clear()
        return decode(adapter, StepScorer(adapter, Method(method)), ids, mask,
                      LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.05)]),
                      lambda seen, _scores: seen[:, -1] % 5 == 0, max_new_tokens=12,
                      do_sample=False, pad_token_id=0, drop_finished=drop_finished)

    kept = run(drop_finished=False)
    assert set(batch_sizes) == {len(prompts)}
    dropped = run(drop_finished=True)
    assert torch.equal(dropped, kept)
    stops = sorted(next((step for step, token in enumerate(row[width:].tolist(), 1)
                         if token % 5 == 0), 12) for row in kept)
    # the prefill, then one forward per step with the rows that have not stopped yet
    assert batch_sizes == [len(prompts)] + [sum(stop > step for stop in stops)
                                            for step in range(1, stops[-1])]
    assert len(set(stops)) > 1, "every row stopped at the same step: nothing was dropped"


def test_rows_stop_on_their_own_eos_and_pad():
    model = tiny_model("llama")
    ids = torch.cat([prompt(5, seed=1), prompt(5, seed=2)])
    free = sled_ext.generate(model, ids, max_new_tokens=6, **NO_EOS)
    only_row0 = [t for t in free[0, 5:].tolist() if t not in free[1, 5:].tolist()]
    if not only_row0:
        pytest.skip("the rows produce the same tokens")
    eos = only_row0[0]
    end = 5 + free[0, 5:].tolist().index(eos) + 1
    out = sled_ext.generate(model, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[0, :end], free[0, :end]) and bool((out[0, end:] == 0).all())
    assert torch.equal(out[1], free[1])


def test_callback_and_streamer_see_every_token():
    model = tiny_model("llama")
    ids = prompt(4, seed=5)
    seen = []

    class Streamer:
        def put(self, tokens):
            seen.append(tokens.flatten().tolist())

        def end(self):
            seen.append("end")

    steps = []
    out = sled_ext.generate(model, ids, max_new_tokens=5, streamer=Streamer(),
                            callback=lambda t: steps.append(t.tolist()), **NO_EOS)
    assert seen[0] == ids[0].tolist() and seen[-1] == "end"
    assert [s[0] for s in seen[1:-1]] == out[0, 4:].tolist() == [s[0] for s in steps]


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_model("llama")
    ids = prompt(4)
    runs = [sled_ext.generate(model, ids, max_new_tokens=8, do_sample=True, temperature=0.8,
                              top_p=0.9, generator=torch.Generator().manual_seed(7), **NO_EOS)
            for _ in range(2)]
    assert torch.equal(*runs)


def test_custom_generate_integration():
    model = tiny_model("llama")
    ids = prompt(5, seed=4)
    expected = sled_ext.generate(model, ids, max_new_tokens=7, evolution_scale=5, **NO_EOS)
    got = model.generate(ids, custom_generate=sled_ext.custom_generate("sled", evolution_scale=5),
                         max_new_tokens=7, do_sample=False, eos_token_id=None)
    assert torch.equal(got, expected)
    # A left-padded batch: the caller's attention mask reaches the loop.
    ids = prompt(5, seed=4, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    expected = sled_ext.generate(model, ids, mask, max_new_tokens=7, evolution_scale=5, **NO_EOS)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False,
                         eos_token_id=None,
                         custom_generate=sled_ext.custom_generate("sled", evolution_scale=5))
    assert torch.equal(got, expected)


def test_bad_settings_get_clear_errors():
    model = tiny_model("llama")
    ids = prompt(3)
    with pytest.raises(ValueError, match="method must be one of"):
        sled_ext.generate(model, ids, method="beam")
    with pytest.raises(ValueError, match=r"evolution_scale \(k\) must be in \[1, V\] = \[1, 211\]"):
        sled_ext.generate(model, ids, evolution_scale=500)
    with pytest.raises(ValueError, match="at least one premature layer"):
        sled_ext.generate(model, ids, layers=[])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        sled_ext.generate(model, ids, max_new_tokens=0)


def test_dola_contrast_follows_the_published_definition():
    """Per position, as transformers' _dola_select_contrast computes it for one row."""
    logits = torch.randn(5, 3, 50) * 3
    contrast, keep = dola_contrast(logits, relative_top=0.1)
    for n in range(3):
        final, premature = logits[-1, n:n + 1], logits[:-1, n:n + 1]
        p_final, p_premature = F.softmax(final, -1), F.softmax(premature, -1)
        mean = 0.5 * (p_final[None] + p_premature)
        kl1 = F.kl_div(F.log_softmax(final, -1)[None], mean, reduction="none").mean(-1)
        kl2 = F.kl_div(F.log_softmax(premature, -1), mean, reduction="none").mean(-1)
        layer = int((0.5 * (kl1 + kl2)).mean(-1).argmax())
        log_final, log_base = final.log_softmax(-1)[0], premature[layer].log_softmax(-1)[0]
        threshold = log_final.max() + math.log(0.1)
        assert torch.equal(keep[n], log_final >= threshold)
        torch.testing.assert_close(contrast[n][keep[n]], (log_final - log_base)[keep[n]])


@pytest.mark.parametrize("method", ["sled", "dola"])
def test_a_step_compiles_with_fullgraph(method):
    """The scoring and picking of a decode step has no host synchronisation: it compiles whole."""
    from transformers.generation import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    from sled_ext.decoding import Method, StepScorer
    from sled_ext.models import adapt

    model = tiny_model("llama")
    scorer = StepScorer(adapt(model), Method(method))
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.05)])
    rows = torch.randn(4, 2, 64)
    ids = prompt(6, batch=2)

    def step(rows, ids, done):
        token = processors(ids, scorer.scores(rows)).argmax(-1)
        return token.masked_fill(done, 0)

    done = torch.tensor([False, True])
    compiled = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(rows, ids, done), step(rows, ids, done))
