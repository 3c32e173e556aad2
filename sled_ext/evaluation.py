"""Factuality evaluation of greedy, DoLa and SLED on the tasks of :mod:`sled_ext.tasks`, and the
search for better SLED settings.

Multiple choice shares one forward pass per item among all methods and settings
(:class:`sled_ext.scoring.ChoiceScorer`); both scoring conventions (raw values,
log-probabilities) come from the same values. Runs are resumable: every finished item is appended
to ``<out>.items.jsonl`` (:mod:`sled_ext.runs`); a run with the same settings continues from
there. :mod:`sled_ext.reporting` summarises and compares the methods.
"""
from __future__ import annotations

import itertools
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from . import tasks
from .decoding import generate
from .method import METHODS, Method
from .models import candidate_layers
from .reporting import CONTROL, paired, summarize_choice, summarize_generation
from .runs import ItemLog, Progress, item_seconds, machine, record_problem
from .scoring import ChoiceScorer


class ArgumentError(ValueError):
    """A bad argument of :func:`evaluate` or :func:`tune`. ``argument`` names it and ``problem``
    says what is wrong, so that a front end can name it its own way (the CLI by its flag)."""

    def __init__(self, argument: str, problem: str):
        super().__init__(f"{argument}{problem}")
        self.argument, self.problem = argument, problem


def sled_and_control(sled: Method) -> dict[str, Method]:
    """A SLED setting and its truncation-only control (the same k, alpha = 0), by label."""
    return {"sled": sled, CONTROL: replace(sled, evolution_rate=0.0)}


def run_choice(task_name, items, scorer: ChoiceScorer, log: ItemLog, quiet=False) -> list[dict]:
    todo = log.todo(items)
    bar = None if quiet else Progress(len(items), task_name, len(items) - len(todo))
    for item in todo:
        started = time.monotonic()
        scores = scorer(item)
        log.add(dict(id=item.id, n_true=len(item.true), best=item.best, scores=scores,
                     seconds=round(time.monotonic() - started, 2)))
        if bar:
            bar.update()
    return [log.done[item.id] for item in items]


def run_generation(task_name, items, model, tokenizer, methods: dict[str, Method], log: ItemLog,
                   max_new_tokens=256, batch_size=4, quiet=False) -> list[dict]:
    """Generates an answer per item and method (batched, left-padded); ``methods`` maps a label
    to its :class:`~sled_ext.method.Method`."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    todo = log.todo(items)
    bar = None if quiet else Progress(len(items), task_name, len(items) - len(todo))
    for first in range(0, len(todo), batch_size):
        batch = todo[first:first + batch_size]
        started = time.monotonic()
        encoded = tokenizer([item.prompt for item in batch], return_tensors="pt",
                            padding=True).to(model.device)
        texts = {}
        for label, method in methods.items():
            steps = itertools.count(1)
            note = f"items {first + 1}-{first + len(batch)} of the rest: {label}, token "
            out = generate(model, encoded.input_ids, encoded.attention_mask, method=method,
                           max_new_tokens=max_new_tokens, stop_strings=tasks.STOP_STRINGS,
                           tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id,
                           callback=None if bar is None else (
                               lambda _: bar.show(f"{note}{next(steps)}")))
            texts[label] = tokenizer.batch_decode(out[:, encoded.input_ids.shape[1]:],
                                                  skip_special_tokens=True)
        for b, item in enumerate(batch):
            record = dict(id=item.id, gold=item.answer, methods={},
                          seconds=round((time.monotonic() - started) / len(batch), 2))
            for label in methods:
                answer, correct = tasks.generation_correct(task_name, texts[label][b],
                                                           item.answer)
                record["methods"][label] = dict(text=tasks.cut_at_stop(texts[label][b]),
                                                answer=answer, correct=correct)
            log.add(record)
            if bar:
                bar.update()
    return [log.done[item.id] for item in items]


def _checked_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ArgumentError("device", f": {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", f" {device}: no CUDA GPU is visible to this torch "
                            f"({torch.__version__})")
    return device


def _items(task_name: str, data, limit, device) -> tuple[torch.device, list]:
    """The device checked and the task's first ``limit`` items (all when None)."""
    device = _checked_device(device)
    if limit is not None and limit < 1:
        raise ArgumentError("limit", f" must be >= 1, got {limit}")
    return device, tasks.load(task_name, data)[:limit]


@dataclass
class _Run:
    """What :func:`evaluate` and :func:`tune` share: the items log, the model, the clock."""
    out: Path
    log: ItemLog
    fresh: int  # the items this run scores itself
    started: float
    model: object
    tokenizer: object

    def write(self, report: dict, records, **after_command) -> dict:
        """``report`` with the run's times, command and machine, written to ``out``."""
        report.update(wall_seconds=round(time.monotonic() - self.started, 1),
                      item_seconds=item_seconds(records), command=" ".join(sys.argv),
                      **after_command, machine=machine(self.model), scored_here=self.fresh)
        self.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        return report


def _start(out: Path, config: dict, kind: str, labels, items, model_name, dtype, device) -> _Run:
    """Opens the items log (before the model loads: a log of other settings stops the run at
    once) and loads the model."""
    from .hub import load
    log = ItemLog(out.with_suffix(".items.jsonl"), config, partial(record_problem, kind, labels))
    fresh, started = len(log.todo(items)), time.monotonic()
    model, tokenizer = load(model_name, dtype=dtype, device=device)
    return _Run(out, log, fresh, started, model, tokenizer)


def evaluate(task_name: str, model_name: str, *, methods=METHODS, sled: Method | None = None,
             limit=None, data=None, out: Path | None = None, max_new_tokens=256, batch_size=4,
             dtype=torch.float32, device="cpu", quiet=False) -> dict:
    """Runs one task on one model; returns (and writes to ``out``) the results with every setting
    recorded. ``sled``: the SLED setting, whose ``layers`` and ``premature_norm`` DoLa shares
    (default the task's published one)."""
    task = tasks.TASKS.get(task_name)
    if task is None:
        raise ValueError(f"unknown task {task_name!r}; one of: {', '.join(tasks.TASKS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {list(methods)}")
    device, items = _items(task_name, data, limit, device)
    sled = sled or task.sled
    config = dict(task=task_name, model=model_name, methods=list(methods), items=len(items),
                  premature_norm=sled.premature_norm, layers=sled.layers,
                  sled=dict(evolution_scale=sled.evolution_scale,
                            evolution_rate=sled.evolution_rate, iterations=sled.iterations,
                            evolution_lower_bound=sled.evolution_lower_bound),
                  max_new_tokens=max_new_tokens if task.kind == "generation" else None,
                  dtype=str(dtype), primary_convention=task.convention)
    settings = sled_and_control(sled) if "sled" in methods else {}
    others = [m for m in methods if m != "sled"]
    labels = others + list(settings)
    run = _start(Path(out or f"results/{task_name}-{Path(model_name).name}.json"), config,
                 task.kind, labels, items, model_name, dtype, device)
    if task.kind == "choice":
        # Records keep the scorer's order, greedy and DoLa first, whatever the order asked.
        scored = {m: replace(sled, name=m) for m in sorted(others, key=METHODS.index)}
        scorer = ChoiceScorer(run.model, run.tokenizer, scored | settings)
        records = run_choice(task_name, items, scorer, run.log, quiet)
        results = summarize_choice(task_name, records, labels)
    else:
        generated = {m: replace(sled, name=m) for m in others} | settings
        records = run_generation(task_name, items, run.model, run.tokenizer, generated, run.log,
                                 max_new_tokens, batch_size, quiet)
        results = summarize_generation(records, labels)
    conventions = list(next(iter(results.values())))
    return run.write(dict(config=config, results=results,
                          paired=paired(task_name, records, labels, conventions)),
                     records, items_file=str(run.log.path))


# ---------------------------------------------------------------------------------------------
# Tuning: a grid of SLED settings on a development split, reported on the held-out split.

GRID_RATES = (0.5, 1.0, 1.75, 2.5, 3.5)
GRID_SCALES = (5, 10, 20, 50, 75)
GRID_LAYERS = ("all", "stride:2", "stride:4", "top-half")


def split(items, dev_fraction=0.5, seed=0):
    """A fixed random split of the items into (development, held-out)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = int(len(items) * dev_fraction)
    dev = sorted(order[:cut])
    held = sorted(order[cut:])
    return [items[i] for i in dev], [items[i] for i in held]




def tune(task_name: str, model_name: str, *, limit=None, data=None, out: Path | None = None,
         rates=GRID_RATES, scales=GRID_SCALES, layer_sets=GRID_LAYERS, select=None,
         convention=None, seed=0, dev_fraction=0.5, dtype=torch.float32, device="cpu",
         quiet=False) -> dict:
    """Scores every grid setting (plus the published one, its control and greedy) from one
    forward pass per item; picks the best on the development split by ``select`` (default MC1
    or accuracy) under ``convention`` (default the task's published one) and reports every
    candidate's held-out scores."""
    task = tasks.TASKS.get(task_name)
    if task is None or task.kind != "choice":
        raise ValueError(f"sled tune takes a multiple-choice task "
                         f"({', '.join(n for n, t in tasks.TASKS.items() if t.kind == 'choice')})"
                         f", got {task_name!r}")
    convention = convention or task.convention
    select = select or ("MC1" if task_name == "truthfulqa" else "accuracy")
    names = list(tasks.CHOICE_METRICS[task_name]([0.0], [0.0], 0))
    if select not in names:
        raise ArgumentError("select", f" must be one of {', '.join(names)} for {task_name}, "
                            f"got {select!r}")
    device, items = _items(task_name, data, limit, device)
    dev, held = split(items, dev_fraction, seed)
    if not dev or not held:
        raise ValueError(f"{len(items)} items are too few to split into development and held-out")
    grid = {f"k={k} a={a} layers={layers}": replace(task.sled, evolution_scale=k,
                                                    evolution_rate=a, layers=layers)
            for layers in layer_sets for k in scales for a in rates}
    settings = sled_and_control(task.sled) | grid
    config = dict(task=task_name, model=model_name, items=len(items), seed=seed,
                  dev_fraction=dev_fraction,
                  grid=[dict(label=label, evolution_scale=s.evolution_scale,
                             evolution_rate=s.evolution_rate, layers=s.layers)
                        for label, s in settings.items()],
                  iterations=task.sled.iterations, lower_bound=task.sled.evolution_lower_bound,
                  dtype=str(dtype))
    labels = ["greedy"] + list(settings)
    run = _start(Path(out or f"results/tune-{task_name}-{Path(model_name).name}.json"), config,
                 "choice", labels, items, model_name, dtype, device)
    scorer = ChoiceScorer(run.model, run.tokenizer,
                          {"greedy": replace(task.sled, name="greedy")} | settings)
    records = {r["id"]: r for r in run_choice(task_name, items, scorer, run.log, quiet)}
    on_dev = summarize_choice(task_name, [records[i.id] for i in dev], labels)
    on_held = summarize_choice(task_name, [records[i.id] for i in held], labels)

    def best_of(candidates):
        return max(candidates, key=lambda label: on_dev[label][convention][select])

    best = best_of(grid)
    chosen = dict(evolution_scale=grid[best].evolution_scale,
                  evolution_rate=grid[best].evolution_rate, layers=grid[best].layers)
    # Cost vs accuracy of the candidate layers: each set's best setting on the development split,
    # scored on the held-out split; the projection cost grows with the rows R = layers + 1.
    by_layers = {}
    for layers in layer_sets:
        pick = best_of([label for label, s in grid.items() if s.layers == layers])
        by_layers[str(layers)] = dict(
            label=pick, rows=len(candidate_layers(layers, scorer.adapter.num_layers)) + 1,
            held_out=on_held[pick][convention])
    return run.write(dict(config=config, convention=convention, select=select, chosen=chosen,
                          development_items=len(dev), held_out_items=len(held),
                          chosen_label=best, development=on_dev, held_out=on_held,
                          held_out_summary={label: on_held[label][convention]
                                            for label in ("greedy", "sled", CONTROL, best)},
                          layer_sets=by_layers),
                     list(records.values()))
