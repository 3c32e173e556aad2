"""Multiple-choice scoring against a per-position computation with the reference."""
import pytest
import torch

import sled_ext
from sled_ext import reference
from sled_ext.decoding import dola_contrast
from tiny_models import VOCAB, tiny_model


class CharTokenizer:
    """Two tokens per character, so a continuation always adds tokens after its prompt."""

    def __call__(self, text):
        class Out:
            input_ids = [1] + [3 + (ord(c) * 7 + i) % (VOCAB - 3) for c in text for i in (0, 1)]
        return Out()


PROMPTS = ["Q: where is the sun?\nA:", "Q: 2+2?\nA:", "Q: sky colour?\nA:"]
ANSWERS = [" in the sky", " four", " blue, mostly"]


def per_position_scores(model, method, post_softmax, **kw):
    tokenizer, out = CharTokenizer(), []
    head = model.get_output_embeddings()
    for prompt, answer in zip(PROMPTS, ANSWERS):
        full = tokenizer(prompt + answer).input_ids
        start = len(tokenizer(prompt).input_ids)
        ids = torch.tensor([full])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
        positions = list(range(start - 1, len(full) - 1))
        rows = torch.stack([h[0, positions] for h in hidden])  # [R, P, H]
        targets = torch.tensor(full[start:])
        if method == "sled":
            values = reference.evolve(rows, head.weight, head.bias, 10, 2.0, -100.0, 10,
                                      dtype=torch.float64)
        elif method == "greedy":
            values = reference.project(rows[-1], head.weight, head.bias, torch.float64)
        else:
            values, keep = dola_contrast(reference.project(rows, head.weight, head.bias).double())
        if post_softmax:
            values = values.log_softmax(-1)
        if method == "dola":
            values = values.masked_fill(~keep, -1000.0)
        out.append(values.gather(-1, targets[:, None]).sum().item())
    return out


@pytest.mark.parametrize("post_softmax", [False, True])
@pytest.mark.parametrize("method", ["sled", "greedy", "dola"])
def test_score_matches_per_position_reference(method, post_softmax):
    model = tiny_model("llama")
    got = sled_ext.score(model, CharTokenizer(), PROMPTS, ANSWERS, method=method,
                         post_softmax=post_softmax, batch_size=2)
    expected = per_position_scores(model, method, post_softmax)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_sled_scores_differ_from_greedy_and_lower_bound_applies():
    model = tiny_model("llama")
    sled = sled_ext.score(model, CharTokenizer(), PROMPTS, ANSWERS, evolution_scale=3)
    greedy = sled_ext.score(model, CharTokenizer(), PROMPTS, ANSWERS, method="greedy")
    assert sled != pytest.approx(greedy)
    assert min(sled) <= -100.0  # some continuation token falls outside the top-3


def test_score_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        sled_ext.score(tiny_model("llama"), CharTokenizer(), ["a", "b"], ["c"])
