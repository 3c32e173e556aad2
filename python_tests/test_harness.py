"""The lm-evaluation-harness model `sled` and the task definitions over the packaged data: the
same numbers as `sled eval`, the same generations as sled_ext.generate."""
import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import sled_ext
from sled_ext import evaluation, tasks
from sled_ext.harness import TASKS_DIR, SledLM
from tiny_models import chat_tokenizer, tiny_chat_model

# TruthfulQA's k = 75 > this vocabulary
SLED = dict(evolution_scale=20, evolution_rate=2.5)


@pytest.fixture(autouse=True)
def _packaged_data(monkeypatch):
    monkeypatch.delenv("SLED_DATA", raising=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder with a character-level tokenizer (TruthfulQA's primer is ~1000
    tokens)."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_chat_model(max_position_embeddings=4096).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return str(folder)


def requests(kind, args):
    return [Instance(kind, {}, arguments, idx=i) for i, arguments in enumerate(args)]


def test_truthfulqa_equals_sled_eval_in_the_logprob_convention(folder, tmp_path):
    out = tmp_path / "tqa.json"
    report = evaluation.evaluate("truthfulqa", folder, methods=("greedy", "dola", "sled"),
                                 limit=2, out=out, quiet=True,
                                 sled=replace(tasks.TASKS["truthfulqa"].sled, **SLED))
    records = [json.loads(line) for line in out.with_suffix(".items.jsonl").read_text()
               .splitlines()[1:]]
    results = simple_evaluate(
        model="sled", model_args=f"pretrained={folder},method=sled,evolution_scale=20,"
        "evolution_rate=2.5", tasks=["sled_truthfulqa"], limit=2, log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR)))
    got = results["results"]["sled_truthfulqa"]
    want = report["results"]["sled"]["logprob"]
    for metric in ("MC1", "MC2", "MC3"):
        assert got[f"{metric.lower()},none"] == pytest.approx(want[metric], rel=1e-12, abs=0)
    samples = sorted(results["samples"]["sled_truthfulqa"], key=lambda s: s["doc_id"])
    for sample, record in zip(samples, records):  # every answer's score, not only the means
        scores = [resp[0][0] for resp in sample["resps"]]
        assert scores == record["scores"]["sled"]["logprob"]
        assert scores != record["scores"]["greedy"]["logprob"]
    # greedy and DoLa through the model's loglikelihood, on the first item
    item = tasks.load("truthfulqa")[0]
    args = [(item.prompt, answer) for answer in item.true + item.false]
    for method in ("greedy", "dola"):
        lm = SledLM(folder, method=method)
        assert ([value for value, _ in lm.loglikelihood(requests("loglikelihood", args))]
                == records[0]["scores"][method]["logprob"])


@pytest.mark.parametrize("method", ["sled", "dola", "greedy"])
def test_is_greedy_asks_the_decoding_step(folder, method):
    """A continuation is greedy exactly when sled_ext.generate would produce it."""
    lm = SledLM(folder, method=method, **SLED)
    tokenizer = lm.tokenizer
    context = "Q: What is the capital of France?\nA:"
    ids = tokenizer(context, return_tensors="pt").input_ids

    def continuation(method):
        out = sled_ext.generate(lm.model, ids, method=method, max_new_tokens=6, eos_token_id=[],
                                iterations=10, evolution_lower_bound=-100.0, **SLED)
        return tokenizer.decode(out[0, ids.shape[1]:])

    own, other = continuation(method), continuation("sled" if method == "greedy" else "greedy")
    assert own != other
    results = lm.loglikelihood(requests("loglikelihood", [(context, own), (context, other)]))
    assert [greedy for _, greedy in results] == [True, False]


def test_generate_until_is_sled_ext_generate(folder):
    lm = SledLM(folder, batch_size=2)
    tokenizer = lm.tokenizer
    contexts = ["Q: What is the capital of France?\nA:", "Q: 2+2?\nA:", "Q: Why?\nA:"]
    gen = dict(until=["\n"], max_gen_toks=12, do_sample=False)
    texts = lm.generate_until(requests("generate_until", [(c, gen) for c in contexts]))
    for context, text in zip(contexts, texts):
        ids = tokenizer(context, return_tensors="pt").input_ids
        out = sled_ext.generate(lm.model, ids, max_new_tokens=12, stop_strings=["\n"],
                                tokenizer=tokenizer)
        assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) \
            .split("\n")[0]
    with pytest.raises(ValueError, match=r"generation arguments \['num_beams'\]"):
        lm.generate_until(requests("generate_until", [(contexts[0], dict(num_beams=2))]))


def test_gsm8k_task_equals_sled_eval(folder, tmp_path):
    out = tmp_path / "g.json"
    report = evaluation.evaluate("gsm8k", folder, methods=("sled",), limit=1, out=out,
                                 max_new_tokens=6, quiet=True)
    record = json.loads(out.with_suffix(".items.jsonl").read_text().splitlines()[1])
    results = simple_evaluate(model="sled", model_args=f"pretrained={folder}",
                              tasks=["sled_gsm8k"], limit=1, log_samples=True,
                              gen_kwargs="max_gen_toks=6",
                              task_manager=TaskManager(include_path=str(TASKS_DIR)))
    text = results["samples"]["sled_gsm8k"][0]["resps"][0][0]
    assert tasks.cut_at_stop(text) == record["methods"]["sled"]["text"]
    assert (results["results"]["sled_gsm8k"]["accuracy,none"]
            == report["results"]["sled"]["generated"]["accuracy"])
    config = yaml.safe_load((TASKS_DIR / "sled_gsm8k.yaml").read_text()
                            .replace("!function", ""))  # the YAML's copy of the stop strings
    assert config["generation_kwargs"]["until"] == tasks.STOP_STRINGS


def test_bad_model_args_and_rolling_are_clear_errors(folder):
    with pytest.raises(ValueError, match=r"unknown model_args \['evolution_rat'\]"):
        SledLM(folder, evolution_rat=2.0)
    with pytest.raises(ValueError, match="method must be one of"):
        SledLM(folder, method="beam")
    with pytest.raises(ValueError, match="evolution_scale"):
        SledLM(folder, evolution_scale=10_000)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        SledLM(folder, batch_size="auto")
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        SledLM(folder).loglikelihood_rolling(requests("loglikelihood_rolling", [("text",)]))


def test_the_command_line_finds_the_model_and_the_tasks(folder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sled_ext.harness_cli", "--model", "sled", "--model_args",
         f"pretrained={folder},evolution_scale=20", "--tasks", "sled_truthfulqa", "--limit", "1",
         "--output_path", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sled_truthfulqa" in result.stdout and "mc2" in result.stdout
