"""The bookkeeping of a resumable run: the items log (``<out>.items.jsonl``, one record per
finished item), the progress bar, and where and how long the run scored."""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from . import tasks
from .tasks import CONVENTIONS


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


class ItemLog:
    """``<out>.items.jsonl``: a header with the settings, then one record per finished item.
    Records are keyed by item id, so a run may grow or shrink its item limit and keep them; the
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
                                   "line first); delete it or choose another results path")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _parsed(line)
            if isinstance(record, dict) and "config" in record:
                if record != header:
                    raise tasks.file_error(path, number, "the items log of a run with other "
                                           f"settings ({_differences(record, header)}); delete "
                                           "it or choose another results path")
                continue  # the header, or a log of the same settings appended to this one
            why = (problem(record) if isinstance(record, dict) and isinstance(record.get("id"), str)
                   else "not an item record (a JSON object with a string 'id')")
            if why:
                raise tasks.file_error(path, number, f"{why}; fix or delete the line, or choose "
                                       "another results path")
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


def item_seconds(records) -> float | None:
    """The scoring time of all items, summed over the runs that produced them."""
    seconds = [r.get("seconds") for r in records]
    return None if None in seconds else round(sum(seconds), 1)


def machine(model) -> dict:
    """Where this run scored its ``scored_here`` items (the item log may hold others, scored by
    earlier runs elsewhere)."""
    device = model.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads")
    return dict(device=str(device), name=name, torch=torch.__version__)
