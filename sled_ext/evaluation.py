"""Factuality evaluation of greedy, DoLa and SLED on the tasks of :mod:`sled_ext.tasks`, and the
search for better SLED settings.

Multiple choice shares one forward pass per item among all methods and settings: the prompt
prefix the continuations share runs once (KV cache), the continuations run as one batch with every
candidate layer's hidden states captured, and every row's logits are projected once: greedy reads
the final row, DoLa contrasts the rows, and SLED folds them with ``sled.partials_logits``, whose
candidates serve any number of ``(layers, k)`` choices through ``sled.combine`` and any number of
rates through the evolution step. Both scoring conventions (raw values, log-probabilities) come
from the same values.

Runs are resumable: every finished item is appended to ``<out>.items.jsonl``; a run with the same
settings continues from there.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import DynamicCache

from . import ops, tasks
from .decoding import dola_contrast, generate
from .distributed import evolve
from .models import adapt, candidate_layers
from .scoring import head_target_values, right_padded, sled_target_values, tokenize_pair

CONVENTIONS = ("raw", "logprob")
METHODS = ("greedy", "dola", "sled")
CONTROL = "sled-a0"  # SLED's top-k truncation alone (alpha = 0): the control of every SLED result


@dataclass(frozen=True)
class SledSetting:
    """One SLED configuration scored from the shared forward pass."""
    label: str
    evolution_scale: int
    evolution_rate: float
    layers: object = "all"


class Progress:
    """A one-line progress bar with rate and ETA on stderr, and an optional note on what runs now
    (generation finishes a whole batch of items at once; the note shows the step within it)."""

    def __init__(self, total: int, desc: str, done: int = 0, stream=sys.stderr):
        self.total, self.desc, self.done, self.stream = total, desc, done, stream
        self.start, self.start_done = time.monotonic(), done
        self.note, self.width = "", 0
        self.show()

    def update(self, n: int = 1):
        self.done += n
        self.note = ""
        self.show()

    def show(self, note: str | None = None):
        if note is not None:
            self.note = note
        elapsed = time.monotonic() - self.start
        fresh = self.done - self.start_done
        eta = elapsed / fresh * (self.total - self.done) if fresh else float("nan")
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        clock = (lambda s: "--:--" if math.isnan(s) else
                 f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}")
        line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"elapsed {clock(elapsed)} eta {clock(eta)}" + (f" | {self.note}" if self.note
                                                                 else ""))
        # pad over the rest of a longer previous line
        self.stream.write(f"\r{line.ljust(self.width)}")
        self.width = len(line)
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


class ChoiceScorer:
    """Scores every continuation of a :class:`tasks.ChoiceItem` under greedy, DoLa and several SLED
    settings from one forward pass. Returns ``{label: {"raw": [...], "logprob": [...]}}`` with the
    true continuations first, then the false ones."""

    def __init__(self, model, tokenizer, settings: list[SledSetting], *, iterations: int,
                 evolution_lower_bound: float, methods=METHODS, premature_norm=False,
                 dola_layers="all", relative_top=0.1, relative_top_value=-1000.0, chunk=64):
        self.adapter, self.tokenizer = adapt(model), tokenizer
        self.settings, self.methods = settings, tuple(methods)
        self.iterations, self.lower_bound = iterations, evolution_lower_bound
        # Positions per projection: wide GEMMs, [R, chunk, V] logits.
        self.premature_norm, self.chunk = premature_norm, chunk
        self.relative_top, self.relative_top_value = relative_top, relative_top_value
        self.layers = candidate_layers("all", self.adapter.num_layers)
        self.rows_of = {s.label: self._row_indices(s.layers) for s in settings}
        self.dola_rows = self._row_indices(dola_layers)
        if settings and max(s.evolution_scale for s in settings) > self.adapter.vocab:
            raise ValueError(f"evolution_scale (k) must be <= the vocabulary "
                             f"({self.adapter.vocab})")

    def _row_indices(self, layers) -> list[int]:
        """Indices into the captured ``[all premature layers..., final]`` rows for a layer set."""
        chosen = candidate_layers(layers, self.adapter.num_layers)
        return [self.layers.index(layer) for layer in chosen] + [len(self.layers)]

    @torch.inference_mode()
    def __call__(self, item: tasks.ChoiceItem) -> dict:
        rows, targets, owner, source = self._forward(item.prompt,
                                                     list(item.true) + list(item.false))
        per_position = self._score(rows, targets, source)
        choices = len(item.true) + len(item.false)
        out = {}
        for label, by_convention in per_position.items():
            out[label] = {}
            for convention, values in by_convention.items():
                totals = torch.zeros(choices, dtype=torch.float64)
                totals.index_add_(0, owner, values.double().cpu())
                out[label][convention] = totals.tolist()
        return out

    def _forward(self, prompt: str, continuations: list[str]):
        """``[R, U, H]`` rows (all premature layers, then the final row) at the U distinct
        positions that predict continuation tokens; for each of the P such positions its target
        token, owning continuation and distinct position (``[P]`` each)."""
        a = self.adapter
        device = a.weight.device
        pairs = [tokenize_pair(self.tokenizer, prompt, c) for c in continuations]
        # The prefix every sequence shares runs once; the position before each continuation's
        # first token must stay in the batch, since its hidden state is scored.
        shared = min(_common_prefix([ids for ids, _ in pairs]), min(s for _, s in pairs) - 1)
        cache = None
        if shared > 0:
            prefix = torch.tensor([pairs[0][0][:shared]], device=device)
            cache = DynamicCache(config=a.model.config)
            a.forward(prefix, torch.ones_like(prefix), torch.arange(shared, device=device)[None],
                      cache)
            cache.batch_repeat_interleave(len(pairs))
        ids, mask, row, col = right_padded(pairs, shared, device)
        first, source = _distinct_inputs(ids, row, col)
        distinct = (row[first], col[first])
        positions = (shared + torch.arange(ids.shape[1], device=device)).expand_as(ids)
        with a.capture(self.layers, select=lambda hidden: hidden[distinct]):
            final = a.forward(ids, mask, positions, cache)[distinct]
        premature = a.premature_rows(self.layers, self.premature_norm)
        rows = torch.cat([premature, final.to(premature.device)[None]])
        return rows, ids[row, col + 1], row.cpu(), source.to(rows.device)

    def _score(self, rows, targets, source):
        """``{label: {convention: [P]}}``: each target's value per method (``source``: the row
        that predicts it). The logits of every row, ``[R, chunk, V]`` at a time, are projected
        once and serve all methods."""
        values, parts = {}, []
        k_max = max((s.evolution_scale for s in self.settings), default=0)

        def add(label, mine, by_convention):
            for c, v in by_convention.items():
                values.setdefault(label, {}).setdefault(c, v.new_empty(len(targets)))[mine] = v

        for first in range(0, rows.shape[1], self.chunk):
            logits = self.adapter.head(rows[:, first:first + self.chunk])  # scaled, soft-capped
            mine = ((source >= first) & (source < first + logits.shape[1])).nonzero()[:, 0]
            local, wanted = source[mine] - first, targets[mine]
            if "greedy" in self.methods:
                add("greedy", mine, {c: head_target_values(logits[-1], wanted, c == "logprob",
                                                           rows=local) for c in CONVENTIONS})
            if "dola" in self.methods:
                dola = logits[self.dola_rows] if len(self.dola_rows) < len(logits) else logits
                contrast, keep = dola_contrast(dola, self.relative_top)
                add("dola", mine, {c: head_target_values(contrast, wanted, c == "logprob", keep,
                                                         self.relative_top_value, rows=local)
                                   for c in CONVENTIONS})
            if self.settings:
                parts.append(ops.partials_logits(logits, evolution_scale=k_max,
                                                 keep_final=self.iterations > 1))
        if self.settings:
            values.update(self._sled([torch.cat(p) for p in zip(*parts)], targets, source))
        return values

    def _sled(self, partials, targets, source):
        """docs/algorithm.md steps 1-5 for every setting from the partials of the whole
        vocabulary."""
        a, T = self.adapter, self.iterations
        stats, argmax, values, tokens, premature, final_rows = partials
        out, selected = {}, {}
        for s in self.settings:
            key = (tuple(self.rows_of[s.label]), s.evolution_scale)
            if key not in selected:  # steps 1-4 for this layer set and k
                index = torch.tensor(self.rows_of[s.label], device=stats.device)
                selected[key] = ops.combine(
                    stats[:, index][None], argmax[:, index][None], values[None], tokens[None],
                    premature[:, :, index[:-1]][None], evolution_scale=s.evolution_scale)
            top_tokens, top_values, delta, softmax = selected[key]
            evolved = evolve(top_values, delta, softmax, s.evolution_rate, T, final_rows,
                             top_tokens)[source]
            out[s.label] = {c: sled_target_values(evolved, top_tokens[source], targets,
                                                  self.lower_bound, a.vocab, c == "logprob")
                            for c in CONVENTIONS}
        return out


def _item_seconds(records) -> float | None:
    """The scoring time of all items, summed over the runs that produced them."""
    seconds = [r.get("seconds") for r in records]
    return None if None in seconds else round(sum(seconds), 1)


def _checked_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to this torch "
                         f"({torch.__version__})")
    return device


def _machine(model) -> dict:
    """Where this run scored its ``scored_here`` items (the item log may hold others, scored by
    earlier runs elsewhere)."""
    device = model.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads")
    return dict(device=str(device), name=name, torch=torch.__version__)


def _first(task_name: str, data, limit) -> list:
    """The task's first ``limit`` items (all when None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return tasks.load(task_name, data)[:limit]


def _distinct_inputs(ids, row, col):
    """Positions ``(row, col)`` of ``ids`` whose inputs so far are the same (continuations that
    begin alike) have the same hidden state: the first of each kind and, per position, which of
    those it repeats."""
    first, source, seen, sequences = [], [], {}, ids.tolist()
    for p, (b, c) in enumerate(zip(row.tolist(), col.tolist())):
        key = tuple(sequences[b][:c + 1])
        if key not in seen:
            seen[key] = len(first)
            first.append(p)
        source.append(seen[key])
    return (torch.tensor(first, device=ids.device, dtype=torch.long),
            torch.tensor(source, dtype=torch.long))


def _common_prefix(sequences) -> int:
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return n


# ---------------------------------------------------------------------------------------------
# Runs: resumable per-item records, a summary per method and convention.

class ItemLog:
    """``<out>.items.jsonl``: a header with the settings, then one record per finished item.
    Records are keyed by item id, so a run may grow or shrink its ``--limit`` and keep them; the
    item count is not part of the settings compared.

    Opening never loses a finished record. A last line cut short by a kill is dropped with a
    :class:`tasks.DataWarning` (its item is scored again); any other damage (a line that is not a
    record these settings can use, by ``problem``, or another run's header) is a ValueError
    naming the file and line, and leaves the file as it was."""

    def __init__(self, path: Path, config: dict, problem=lambda record: None):
        self.path, self.done = path, {}
        config = {key: value for key, value in config.items() if key != "items"}
        header = json.loads(json.dumps({"config": config}))  # as it reads back
        raw = path.read_bytes() if path.exists() else b""
        whole = raw[:raw.rfind(b"\n") + 1]  # the lines written in full
        lines = tasks.decoded_text(path, whole).split("\n")[:-1]
        if not lines:  # new, or killed before its header was written in full
            if raw:
                warnings.warn(f"{path}, line 1: dropped a header cut short (by a kill?); no "
                              "item was scored", tasks.DataWarning, stacklevel=2)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n", encoding="utf-8")
            return
        first = _parsed(lines[0])
        if not (isinstance(first, dict) and "config" in first):
            raise tasks.file_error(path, 1, "not an items log of sled eval or tune (no settings "
                                   "line first); delete it or choose another --out")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _parsed(line)
            if isinstance(record, dict) and "config" in record:
                if record != header:
                    raise tasks.file_error(path, number, "the items log of a run with other "
                                           f"settings ({_differences(record, header)}); delete "
                                           "it or choose another --out")
                continue  # the header, or a log of the same settings appended to this one
            why = (problem(record) if isinstance(record, dict) and isinstance(record.get("id"), str)
                   else "not an item record (a JSON object with a string 'id')")
            if why:
                raise tasks.file_error(path, number, f"{why}; fix or delete the line, or choose "
                                       "another --out")
            self.done[record["id"]] = record
        torn = raw[len(whole):]
        record = _parsed(torn.decode("utf-8", "replace"))
        if isinstance(record, dict) and isinstance(record.get("id"), str) and not problem(record):
            self.done[record["id"]] = record  # whole, only its newline is missing
            with open(path, "ab") as f:
                f.write(b"\n")
        elif torn:
            warnings.warn(f"{path}, line {len(lines) + 1}: dropped a record cut short (by a "
                          "kill?); its item is scored again", tasks.DataWarning, stacklevel=2)
            os.truncate(path, len(whole))

    def todo(self, items) -> list:
        """The items without a record yet."""
        return [item for item in items if item.id not in self.done]

    def add(self, record: dict):
        self.done[record["id"]] = record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _parsed(line: str):
    """The JSON value of ``line``, or None."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
        return None


def _differences(found: dict, wanted: dict) -> str:
    """The settings that differ between two headers, as 'key: there -> now'."""
    there, now = found.get("config"), wanted["config"]
    if not isinstance(there, dict):
        return f"settings {tasks.abbreviated(there)}"
    return "; ".join(f"{key}: {tasks.abbreviated(there.get(key), 40)} there, "
                     f"{tasks.abbreviated(now.get(key), 40)} now"
                     for key in sorted(set(there) | set(now)) if there.get(key) != now.get(key))


def record_problem(kind: str, labels, record: dict) -> str | None:
    """Why an item record cannot serve a run of ``kind`` ("choice" or "generation") whose methods
    are ``labels``, or None. Records of other settings miss labels or fields."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if kind == "choice":
        n_true, best, scores = record.get("n_true"), record.get("best"), record.get("scores")
        if not (type(n_true) is int and type(best) is int and 0 <= best < n_true
                and isinstance(scores, dict)):
            return "not a multiple-choice record (n_true, best, scores)"
        for label in labels:
            by_convention = scores.get(label)
            for convention in CONVENTIONS:
                values = by_convention.get(convention) if isinstance(by_convention, dict) else None
                if not (isinstance(values, list) and len(values) > n_true
                        and all(map(number, values))):
                    return f"no {convention} scores of {label!r} for every answer"
        return None
    methods = record.get("methods")
    if not (isinstance(record.get("gold"), str) and isinstance(methods, dict)):
        return "not a generation record (gold, methods)"
    for label in labels:
        entry = methods.get(label)
        if not (isinstance(entry, dict) and isinstance(entry.get("text"), str)
                and isinstance(entry.get("correct"), bool)):
            return f"no answer of {label!r}"
    return None


def sled_and_control(evolution_scale: int, evolution_rate: float,
                     layers="all") -> list[SledSetting]:
    """A SLED setting and its truncation-only control (the same k, alpha = 0)."""
    return [SledSetting("sled", evolution_scale, evolution_rate, layers),
            SledSetting(CONTROL, evolution_scale, 0.0, layers)]


def summarize_choice(task_name: str, records: list[dict], labels) -> dict:
    """Mean metrics per label and convention."""
    metric = tasks.CHOICE_METRICS[task_name]
    out = {}
    for label in labels:
        out[label] = {}
        for c in CONVENTIONS:
            sums = {}
            for r in records:
                scores = r["scores"][label][c]
                n_true = r["n_true"]
                for name, value in metric(scores[:n_true], scores[n_true:], r["best"]).items():
                    sums[name] = sums.get(name, 0.0) + value
            out[label][c] = {name: total / len(records) for name, total in sums.items()}
    return out


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


def run_generation(task_name, items, model, tokenizer, methods: dict, log: ItemLog,
                   max_new_tokens=256, batch_size=4, quiet=False) -> list[dict]:
    """Generates an answer per item and method (batched, left-padded); ``methods`` maps a label
    to :func:`sled_ext.generate` keyword arguments."""
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
        for label, kwargs in methods.items():
            steps = itertools.count(1)
            note = f"items {first + 1}-{first + len(batch)} of the rest: {label}, token "
            out = generate(model, encoded.input_ids, encoded.attention_mask,
                           max_new_tokens=max_new_tokens, stop_strings=tasks.STOP_STRINGS,
                           tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id,
                           callback=None if bar is None else (
                               lambda _: bar.show(f"{note}{next(steps)}")),
                           **kwargs)
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


PAIRS = (("sled", "greedy"), ("sled", CONTROL), ("dola", "greedy"))


def _right(task_name: str, record: dict, label: str, convention: str) -> bool:
    """Whether ``label`` gets the item right: MC1 for TruthfulQA, accuracy otherwise."""
    if "methods" in record:
        return bool(record["methods"][label]["correct"])
    scores, n_true = record["scores"][label][convention], record["n_true"]
    metrics = tasks.CHOICE_METRICS[task_name](scores[:n_true], scores[n_true:], record["best"])
    return metrics.get("MC1", metrics.get("accuracy")) == 1.0


def sign_test(a: int, b: int) -> float:
    """Two-sided exact binomial p-value of a split of ``a + b`` discordant items into a and b."""
    n = a + b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n)


def paired(task_name: str, records: list[dict], labels, conventions) -> dict:
    """Per pair of methods (see :data:`PAIRS`) and convention: the items only the first gets
    right, those only the second does, and the sign test's p-value of that split. Both methods
    score the same items, so this is far more sensitive than comparing two means."""
    right = {(label, c): [_right(task_name, r, label, c) for r in records]
             for label in labels for c in conventions}
    out = {}
    for first, second in PAIRS:
        if first in labels and second in labels:
            out[f"{first} vs {second}"] = by_convention = {}
            for c in conventions:
                pairs = list(zip(right[first, c], right[second, c]))
                a = sum(x and not y for x, y in pairs)
                b = sum(y and not x for x, y in pairs)
                by_convention[c] = dict(only_first=a, only_second=b, p=round(sign_test(a, b), 4))
    return out


def summarize_generation(records, labels) -> dict:
    return {label: {"generated": {"accuracy": sum(r["methods"][label]["correct"]
                                                  for r in records) / len(records)}}
            for label in labels}


def evaluate(task_name: str, model_name: str, *, methods=METHODS, limit=None, data=None,
             out: Path | None = None, premature_norm=False, layers="all", sled_overrides=None,
             max_new_tokens=256, batch_size=4, dtype=torch.float32, device="cpu",
             quiet=False) -> dict:
    """Runs one task on one model; returns (and writes to ``out``) the results with every setting
    recorded. ``sled_overrides`` replaces the published k / rate / T / lower bound."""
    from .hub import load
    task = tasks.TASKS.get(task_name)
    if task is None:
        raise ValueError(f"unknown task {task_name!r}; one of: {', '.join(tasks.TASKS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {list(methods)}")
    device = _checked_device(device)
    items = _first(task_name, data, limit)
    sled = dict(evolution_scale=task.evolution_scale, evolution_rate=task.evolution_rate,
                iterations=task.iterations, evolution_lower_bound=task.evolution_lower_bound)
    sled.update(sled_overrides or {})
    config = dict(task=task_name, model=model_name, methods=list(methods), items=len(items),
                  premature_norm=premature_norm, layers=layers, sled=sled,
                  max_new_tokens=max_new_tokens if task.kind == "generation" else None,
                  dtype=str(dtype), primary_convention="logprob" if task.post_softmax else "raw")
    settings = []
    if "sled" in methods:
        settings = sled_and_control(sled["evolution_scale"], sled["evolution_rate"], layers)
    labels = [m for m in methods if m != "sled"] + [s.label for s in settings]
    out = Path(out or f"results/{task_name}-{Path(model_name).name}.json")
    log = ItemLog(out.with_suffix(".items.jsonl"), config,
                  partial(record_problem, task.kind, labels))
    fresh = len(log.todo(items))
    started = time.monotonic()
    model, tokenizer = load(model_name, dtype=dtype, device=device)
    if task.kind == "choice":
        scorer = ChoiceScorer(model, tokenizer, settings, iterations=sled["iterations"],
                              evolution_lower_bound=sled["evolution_lower_bound"],
                              methods=methods, premature_norm=premature_norm,
                              dola_layers=layers)
        records = run_choice(task_name, items, scorer, log, quiet)
        results = summarize_choice(task_name, records, labels)
    else:
        common = dict(premature_norm=premature_norm, layers=layers)
        gen_methods = {m: dict(method=m, **common) for m in methods if m != "sled"}
        for s in settings:
            gen_methods[s.label] = dict(method="sled", evolution_scale=s.evolution_scale,
                                        evolution_rate=s.evolution_rate,
                                        evolution_lower_bound=sled["evolution_lower_bound"],
                                        iterations=sled["iterations"], **common)
        records = run_generation(task_name, items, model, tokenizer, gen_methods, log,
                                 max_new_tokens, batch_size, quiet)
        results = summarize_generation(records, labels)
    conventions = list(next(iter(results.values())))
    report = dict(config=config, results=results,
                  paired=paired(task_name, records, labels, conventions),
                  wall_seconds=round(time.monotonic() - started, 1),
                  item_seconds=_item_seconds(records), command=" ".join(sys.argv),
                  items_file=str(log.path), machine=_machine(model), scored_here=fresh)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def table(report: dict) -> str:
    """The results as a printed table: one line per method, metrics per convention; then the
    paired comparisons."""
    results = report["results"]
    lines = []
    conventions = list(next(iter(results.values())))
    metrics = list(results[next(iter(results))][conventions[0]])
    columns = [(c, m, max(10, len(c) + len(m) + 3)) for c in conventions for m in metrics]
    width = max(10, *(len(label) + 2 for label in results))
    lines.append(f"{'method':<{width}}" + "".join(f"{c + ' ' + m:>{w}}" for c, m, w in columns))
    for label, by_convention in results.items():
        lines.append(f"{label:<{width}}" + "".join(f"{by_convention[c][m]:>{w}.4f}"
                                                    for c, m, w in columns))
    for pair, by_convention in report.get("paired", {}).items():
        first, second = pair.split(" vs ")
        for c, n in by_convention.items():
            lines.append(f"{pair} ({c}): {n['only_first']} items only {first} gets right, "
                         f"{n['only_second']} only {second}; sign test p = {n['p']:.3f}")
    return "\n".join(lines)


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
    from .hub import load
    task = tasks.TASKS.get(task_name)
    if task is None or task.kind != "choice":
        raise ValueError(f"sled tune takes a multiple-choice task "
                         f"({', '.join(n for n, t in tasks.TASKS.items() if t.kind == 'choice')})"
                         f", got {task_name!r}")
    convention = convention or ("logprob" if task.post_softmax else "raw")
    select = select or ("MC1" if task_name == "truthfulqa" else "accuracy")
    names = list(tasks.CHOICE_METRICS[task_name]([0.0], [0.0], 0))
    if select not in names:
        raise ValueError(f"--select must be one of {', '.join(names)} for {task_name}, "
                         f"got {select!r}")
    device = _checked_device(device)
    items = _first(task_name, data, limit)
    dev, held = split(items, dev_fraction, seed)
    if not dev or not held:
        raise ValueError(f"{len(items)} items are too few to split into development and held-out")
    grid = [SledSetting(f"k={k} a={a} layers={layers}", k, a, layers)
            for layers in layer_sets for k in scales for a in rates]
    settings = sled_and_control(task.evolution_scale, task.evolution_rate) + grid
    config = dict(task=task_name, model=model_name, items=len(items), seed=seed,
                  dev_fraction=dev_fraction, grid=[asdict(s) for s in settings],
                  iterations=task.iterations, lower_bound=task.evolution_lower_bound,
                  dtype=str(dtype))
    out = Path(out or f"results/tune-{task_name}-{Path(model_name).name}.json")
    labels = ["greedy"] + [s.label for s in settings]
    log = ItemLog(out.with_suffix(".items.jsonl"), config,
                  partial(record_problem, "choice", labels))
    fresh = len(log.todo(items))
    started = time.monotonic()
    model, tokenizer = load(model_name, dtype=dtype, device=device)
    scorer = ChoiceScorer(model, tokenizer, settings, iterations=task.iterations,
                          evolution_lower_bound=task.evolution_lower_bound,
                          methods=("greedy",))
    records = {r["id"]: r for r in run_choice(task_name, items, scorer, log, quiet)}
    on_dev = summarize_choice(task_name, [records[i.id] for i in dev], labels)
    on_held = summarize_choice(task_name, [records[i.id] for i in held], labels)
    def best_of(candidates):
        return max(candidates, key=lambda s: on_dev[s.label][convention][select])

    best = best_of(grid)
    chosen = dict(evolution_scale=best.evolution_scale, evolution_rate=best.evolution_rate,
                  layers=best.layers)
    # Cost vs accuracy of the candidate layers: each set's best setting on the development split,
    # scored on the held-out split; the projection cost grows with the rows R = layers + 1.
    by_layers = {}
    for layers in layer_sets:
        pick = best_of([s for s in grid if s.layers == layers])
        by_layers[str(layers)] = dict(
            label=pick.label, rows=len(candidate_layers(layers, scorer.adapter.num_layers)) + 1,
            held_out=on_held[pick.label][convention])
    report = dict(config=config, convention=convention, select=select, chosen=chosen,
                  development_items=len(dev), held_out_items=len(held),
                  chosen_label=best.label, development=on_dev, held_out=on_held,
                  held_out_summary={label: on_held[label][convention]
                                    for label in ("greedy", "sled", CONTROL, best.label)},
                  layer_sets=by_layers,
                  wall_seconds=round(time.monotonic() - started, 1),
                  item_seconds=_item_seconds(list(records.values())), command=" ".join(sys.argv),
                  machine=_machine(model), scored_here=fresh)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
