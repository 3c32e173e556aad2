"""The Hugging Face custom_generate repo (hub/sled): loaded from its folder the way transformers
loads a hub id, it decodes as sled_ext.generate."""
from pathlib import Path

import pytest
import torch

import sled_ext
from tiny_models import VOCAB, tiny_model

REPO = str(Path(__file__).resolve().parents[1] / "hub" / "sled")
NO_EOS = dict(eos_token_id=None)


def left_padded_prompts():
    """Two prompts of different lengths, left-padded, with their attention mask."""
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


@pytest.mark.parametrize("method,settings", [
    ("sled", dict(evolution_rate=1.5, evolution_scale=5)),
    ("sled", dict(evolution_scale=20, iterations=3, layers="stride:2")),
    ("dola", dict(layers=[0, 1])),
    ("greedy", {}),
])
def test_the_repo_decodes_as_sled_ext_generate(method, settings):
    model = tiny_model("llama")
    ids, mask = left_padded_prompts()
    expected = sled_ext.generate(model, ids, mask, method=method, max_new_tokens=8,
                                 eos_token_id=[], **settings)
    got = model.generate(ids, attention_mask=mask, custom_generate=REPO, trust_remote_code=True,
                         method=method, max_new_tokens=8, do_sample=False, **NO_EOS, **settings)
    assert torch.equal(got, expected)
    if method == "sled":  # so that a plain greedy decoder could not pass for SLED here
        greedy = sled_ext.generate(model, ids, mask, method="greedy", max_new_tokens=8,
                                   eos_token_id=[])
        assert not torch.equal(expected, greedy)


def test_sled_is_the_default_method():
    model = tiny_model("llama")
    ids, mask = left_padded_prompts()
    got = model.generate(ids, attention_mask=mask, custom_generate=REPO, trust_remote_code=True,
                         max_new_tokens=6, do_sample=False, **NO_EOS)
    assert torch.equal(got, sled_ext.generate(model, ids, mask, max_new_tokens=6, eos_token_id=[]))


def test_refused_without_trust_remote_code():
    model = tiny_model("llama")
    ids, _ = left_padded_prompts()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        model.generate(ids, custom_generate=REPO, max_new_tokens=2)


def test_bad_settings_are_refused_by_name():
    model = tiny_model("llama")
    ids, _ = left_padded_prompts()
    with pytest.raises(ValueError, match="method must be one of"):
        model.generate(ids, custom_generate=REPO, trust_remote_code=True, method="beam",
                       max_new_tokens=2)
    with pytest.raises(ValueError, match="evolution_rat"):  # a misspelt setting is not dropped
        model.generate(ids, custom_generate=REPO, trust_remote_code=True, evolution_rat=2.0,
                       max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams must be 1"):
        model.generate(ids, custom_generate=REPO, trust_remote_code=True, num_beams=2,
                       max_new_tokens=2)


def test_the_repo_has_the_hub_layout():
    repo = Path(REPO)
    assert "sled-ext" in (repo / "custom_generate" / "requirements.txt").read_text().split()
    header = (repo / "README.md").read_text().split("---")[1]
    assert "custom_generate" in header
