"""The evaluation harness: metrics on hand-made items, the data loaders, the shared-forward scorer
against the one-method scoring path, and real-model slices end to end (resumed). The items log's
damage handling is in test_item_log.py, malformed data files in test_data.py."""
import csv
import io
import json
import math
from dataclasses import replace

import pytest
import torch

import sled_ext
from sled_ext import MULTIPLE_CHOICE, evaluation, reporting, runs, tasks
from sled_ext.reporting import CONTROL
from sled_ext.scoring import ChoiceScorer
from test_scoring import CharTokenizer
from tiny_models import tiny_model


@pytest.fixture(autouse=True)
def _packaged_data(monkeypatch):
    """The data shipped with the package, whatever $SLED_DATA says."""
    monkeypatch.delenv("SLED_DATA", raising=False)


def test_truthfulqa_metrics_on_a_hand_made_item():
    m = tasks.truthfulqa_metrics([-1.0, -2.0], [-3.0, -1.5], best=0)
    assert m["MC1"] == 1.0 and m["MC3"] == 0.5
    mass = math.exp(-1) + math.exp(-2)
    assert m["MC2"] == pytest.approx(mass / (mass + math.exp(-3) + math.exp(-1.5)))
    assert tasks.truthfulqa_metrics([-2.0, -1.0], [-1.5], best=0)["MC1"] == 0.0


def test_mc2_survives_raw_logit_sums_that_overflow_exp():
    # exp(3000) overflows and exp(-3000) underflows: the published formula gives NaN or 0 / 0.
    for shift in (3000.0, -3000.0):
        m = tasks.truthfulqa_metrics([shift + 1.0], [shift], best=0)
        assert m["MC2"] == pytest.approx(1 / (1 + math.exp(-1)))


def test_factor_counts_ties_as_correct():
    assert tasks.factor_metrics([-2.0], [-2.0, -5.0, -9.0])["accuracy"] == 1.0
    assert tasks.factor_metrics([-2.0], [-1.9, -5.0, -9.0])["accuracy"] == 0.0


def test_paired_counts_items_only_one_method_gets_right():
    def item(sled, greedy):  # one true, one false continuation; MC1 right when true > false
        return dict(n_true=1, best=0, scores={"sled": {"raw": [sled, 0.0]},
                                              "greedy": {"raw": [greedy, 0.0]}})
    records = [item(1, -1)] * 5 + [item(-1, 1)] + [item(1, 1)] * 3
    counts = reporting.paired("truthfulqa", records, ["greedy", "sled"], ["raw"])
    assert counts == {"sled vs greedy": {"raw": dict(only_first=5, only_second=1, p=0.2188)}}
    assert reporting.sign_test(5, 0) == 2 / 32 and reporting.sign_test(0, 0) == 1.0
    generated = [dict(methods={"dola": {"correct": d}, "greedy": {"correct": g}})
                 for d, g in [(True, False), (False, True), (False, True)]]
    assert reporting.paired("gsm8k", generated, ["greedy", "dola"], ["generated"]) == {
        "dola vs greedy": {"generated": dict(only_first=1, only_second=2, p=1.0)}}


@pytest.mark.parametrize("text,answer", [
    (" Janet has 9 eggs. 9 * 2 = 18. The answer is 18.\n\nQ: next", "18"),
    (" It costs $1,250 in total. The answer is $1,250.", "1250"),
    (" 3 + 4 = 7 and then 7 - 2 = 5", "5"),
    (" I do not know.", None),
])
def test_gsm8k_answer_extraction(text, answer):
    assert tasks.gsm8k_answer(text) == answer


@pytest.mark.parametrize("text,answer", [
    (" Pears float. So the answer is no.", "no"),
    (" Thus yes. So the answer is Yes.\n\nQ: Is it?", "yes"),
    (" Maybe. So the answer is unclear.", None),
    (" No trigger here", None),
])
def test_strategyqa_answer_extraction(text, answer):
    assert tasks.strategyqa_answer(text) == answer


def test_generation_correct_compares_numbers():
    assert tasks.generation_correct("gsm8k", "The answer is 18.0.", "18") == ("18.0", True)
    assert tasks.generation_correct("gsm8k", "no number", "18") == (None, False)
    assert tasks.generation_correct("strategyqa", "So the answer is no.", "no") == ("no", True)


def test_loaders_read_every_item_of_the_packaged_data():
    counts = {"truthfulqa": 817, "factor-news": 1036, "factor-expert": 236,
              "strategyqa": 2290, "gsm8k": 1319}
    for name, count in counts.items():
        items = tasks.load(name)
        assert len(items) == count and len({i.id for i in items}) == count, name
    tqa = tasks.load("truthfulqa")[0]
    assert tqa.prompt.startswith(tasks.TRUTHFULQA_PRIMER) and tqa.prompt.endswith("\nA:")
    assert tqa.true[tqa.best] == " The watermelon seeds pass through your digestive system."
    expert = tasks.load("factor-expert")[0]
    assert len(expert.true) == 1 and len(expert.false) == 3
    text = tasks.read_data(tasks.PACKAGED_DATA / "factor/expert_factor.csv").decode()
    row = next(csv.DictReader(io.StringIO(text, newline="")))
    assert expert.prompt == row["turncated_prefixes"] != row["full_prefix"]
    assert tasks.load("gsm8k")[0].answer == "18"
    assert tasks.load("strategyqa")[0].answer in ("yes", "no")


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="missing data file .*TruthfulQA.csv"):
        tasks.load("truthfulqa", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load("mmlu")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evaluation.evaluate("truthfulqa", "smollm2-135m", limit=-1, out=tmp_path / "x.json")
    with pytest.raises(ValueError, match="multiple-choice task"):
        evaluation.tune("gsm8k", "smollm2-135m", out=tmp_path / "t.json")
    with pytest.raises(ValueError, match="select must be one of MC1, MC2, MC3"):
        evaluation.tune("truthfulqa", "smollm2-135m", out=tmp_path / "t.json", select="BLEU")


ITEM = tasks.ChoiceItem("0", "Q: where is the sun?\nA:", (" in the sky", " up high"),
                        (" under the sea", " in a box", " blue"), best=0)


@pytest.mark.parametrize("chunk", [64, 5])  # positions per projection
@pytest.mark.parametrize("iterations", [1, 10])
def test_one_forward_scores_like_the_one_method_path(iterations, chunk):
    """Every method and setting from the shared forward (prefix cached once) matches
    sled_ext.score run separately for each."""
    model, tokenizer = tiny_model("llama"), CharTokenizer()
    published = replace(MULTIPLE_CHOICE, iterations=iterations)
    settings = {"sled": published, CONTROL: replace(published, evolution_rate=0.0),
                "s2": replace(published, evolution_scale=5, evolution_rate=1.5, layers="stride:2"),
                "top": replace(published, evolution_scale=20, evolution_rate=3.0,
                               layers="top-half")}
    methods = {"greedy": replace(published, name="greedy"),
               "dola": replace(published, name="dola")}
    got = ChoiceScorer(model, tokenizer, methods | settings, chunk=chunk)(ITEM)
    got["dola-s2"] = ChoiceScorer(model, tokenizer, {
        "dola": replace(published, name="dola", layers="stride:2")})(ITEM)["dola"]
    continuations = list(ITEM.true) + list(ITEM.false)
    prompts = [ITEM.prompt] * len(continuations)
    expected = {"greedy": dict(method="greedy"), "dola": dict(method="dola"),
                "dola-s2": dict(method="dola", layers="stride:2")}
    for label, s in settings.items():
        expected[label] = dict(method="sled", evolution_scale=s.evolution_scale,
                               evolution_rate=s.evolution_rate, layers=s.layers)
    for label, kwargs in expected.items():
        for convention in ("raw", "logprob"):
            want = sled_ext.score(model, tokenizer, prompts, continuations, iterations=iterations,
                                  evolution_lower_bound=-100.0,
                                  post_softmax=convention == "logprob", **kwargs)
            assert got[label][convention] == pytest.approx(want, rel=1e-4, abs=1e-3), (
                label, convention)


def test_continuations_that_begin_alike_share_their_projected_positions():
    """ITEM's continuations share first characters (" in the sky" / " in a box", " u..."): each
    distinct input is projected once, the scores staying those of the test above."""
    model, tokenizer = tiny_model("llama"), CharTokenizer()
    scorer = ChoiceScorer(model, tokenizer, {"sled": replace(MULTIPLE_CHOICE, iterations=1)})
    projected, head = [], scorer.adapter.head
    scorer.adapter.head = lambda rows: projected.append(rows.shape[1]) or head(rows)
    scorer(ITEM)
    starts = len(tokenizer(ITEM.prompt).input_ids)
    inputs = [tokenizer(ITEM.prompt + c).input_ids for c in ITEM.true + ITEM.false]
    distinct = {tuple(ids[:j]) for ids in inputs for j in range(starts, len(ids))}
    assert sum(projected) == len(distinct) < sum(len(ids) - starts for ids in inputs)


def test_split_is_fixed_and_disjoint():
    items = list(range(101))
    dev, held = evaluation.split(items, 0.5, seed=3)
    assert (dev, held) == evaluation.split(items, 0.5, seed=3)
    assert sorted(dev + held) == items and len(dev) == 50
    assert evaluation.split(items, 0.5, seed=4) != (dev, held)


def test_truthfulqa_slice_on_a_real_model_end_to_end_and_resumed(tmp_path, monkeypatch):
    out = tmp_path / "tqa.json"
    first = evaluation.evaluate("truthfulqa", "smollm2-135m", limit=2, out=out, quiet=True)
    assert set(first["results"]) == {"greedy", "dola", "sled", CONTROL}
    for by_convention in first["results"].values():
        for metrics in by_convention.values():
            assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert json.loads(out.read_text())["config"]["sled"]["iterations"] == 10
    # A killed run: drop the last record, run again; only that item is scored anew.
    log = out.with_suffix(".items.jsonl")
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n")
    calls = []
    original = ChoiceScorer.__call__
    monkeypatch.setattr(ChoiceScorer, "__call__",
                        lambda self, item: calls.append(item.id) or original(self, item))
    second = evaluation.evaluate("truthfulqa", "smollm2-135m", limit=2, out=out, quiet=True)
    assert calls == ["1"]
    assert second["results"] == first["results"]
    assert (first["scored_here"], second["scored_here"]) == (2, 1)
    assert second["machine"]["device"] == "cpu" and "paired" in second


def test_generation_slice_on_a_real_model(tmp_path):
    report = evaluation.evaluate("gsm8k", "smollm2-135m", limit=2, out=tmp_path / "g.json",
                                 methods=("greedy", "sled"), max_new_tokens=6, quiet=True)
    assert set(report["results"]) == {"greedy", "sled", CONTROL}
    records = [json.loads(line) for line in
               (tmp_path / "g.items.jsonl").read_text().splitlines()[1:]]
    assert [r["gold"] for r in records] == ["18", "3"]
    assert all(isinstance(r["methods"]["sled"]["text"], str) for r in records)


def test_cli_reports_bad_settings_in_one_line(capsys, tmp_path):
    from sled_ext.cli import main
    assert main(["eval", "truthfulqa", "--limit", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "--data", str(tmp_path)]) == 2
    assert "missing data file" in capsys.readouterr().err
    assert main(["eval", "truthfulqa", "--device", "abacus", "--limit", "1"]) == 2
    assert "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["tune", "truthfulqa", "--device", "cuda", "--limit", "2"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_tune_picks_on_development_and_reports_held_out(tmp_path):
    report = evaluation.tune("factor-expert", "smollm2-135m", limit=4, out=tmp_path / "t.json",
                             rates=(0.5, 2.0), scales=(5, 10), layer_sets=("all", "stride:4"),
                             quiet=True)
    assert report["convention"] == "logprob" and report["select"] == "accuracy"
    assert (report["development_items"], report["held_out_items"]) == (2, 2)
    grid = {s["label"] for s in report["config"]["grid"]} - {"sled", CONTROL}
    assert len(grid) == 8 and report["chosen_label"] in grid
    assert set(report["held_out_summary"]) == {"greedy", "sled", CONTROL, report["chosen_label"]}
    rows = {name: entry["rows"] for name, entry in report["layer_sets"].items()}
    assert rows == {"all": 31, "stride:4": 8}  # SmolLM2: 30 blocks; 26, 22, ..., 2 + final
    labels = grid | {"greedy", "sled", CONTROL}
    assert set(report["development"]) == set(report["held_out"]) == labels


def test_progress_shows_counts_eta_and_a_note_it_clears():
    stream = io.StringIO()
    bar = runs.Progress(4, "task", done=1, stream=stream)
    bar.show("items 2-3 of the rest: dola, token 17")
    bar.update(2)
    lines = stream.getvalue().split("\r")[1:]
    assert lines[0].startswith("task [######..................] 1/4 elapsed 0:00:00 eta --:--")
    assert lines[1].endswith("| items 2-3 of the rest: dola, token 17")
    # the note goes with the update, and the shorter line blanks out the longer one
    assert "3/4" in lines[2] and "|" not in lines[2] and len(lines[2]) == len(lines[1])
    bar.update()
    last = stream.getvalue().split("\r")[-1]
    assert "4/4" in last and last.endswith("\n")
