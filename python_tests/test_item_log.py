"""The resumable items log (``<out>.items.jsonl``) when it is damaged: a kill, a foreign line,
another run's settings. Opening it never loses a finished record: a record cut short by a kill is
dropped with a warning, anything else is one error naming file and line, the file left as it was."""
import json
import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sled_ext.runs import ItemLog, record_problem
from sled_ext.tasks import DataWarning

CONFIG = {"task": "gsm8k", "rate": 2.0}
HEADER = json.dumps({"config": CONFIG}) + "\n"
FUZZ = settings(max_examples=150, deadline=None)


def needs_value(record):
    return None if type(record.get("v")) is int else "no 'v'"


@contextmanager
def no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def written(path, records) -> bytes:
    log = ItemLog(path, CONFIG, needs_value)
    for record in records:
        log.add(record)
    return path.read_bytes()


def test_resuming_keeps_every_record_whatever_the_item_count(tmp_path):
    path = tmp_path / "run.items.jsonl"
    written(path, [{"id": "x", "v": 1}, {"id": "y", "v": 2}])
    again = ItemLog(path, {**CONFIG, "items": 7}, needs_value)  # a new --limit
    assert again.done == {"x": {"id": "x", "v": 1}, "y": {"id": "y", "v": 2}}
    assert [item.id for item in again.todo([SimpleNamespace(id="x"), SimpleNamespace(id="z")])
            ] == ["z"]


def test_a_record_cut_short_by_a_kill_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "run.items.jsonl"
    whole = written(path, [{"id": "x", "v": 1}])
    path.write_bytes(whole + b'{"id": "y", "v"')
    with pytest.warns(DataWarning, match=f"{path}, line 3: dropped a record cut short"):
        again = ItemLog(path, CONFIG, needs_value)
    assert list(again.done) == ["x"] and path.read_bytes() == whole
    again.add({"id": "z", "v": 3})  # appends cleanly after the dropped part
    assert list(ItemLog(path, CONFIG, needs_value).done) == ["x", "z"]


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "run.items.jsonl"
    whole = written(path, [{"id": "x", "v": 1}, {"id": "y", "v": 2}])
    path.write_bytes(whole[:-1])
    assert list(ItemLog(path, CONFIG, needs_value).done) == ["x", "y"]
    assert path.read_bytes() == whole


def test_a_header_cut_short_starts_afresh(tmp_path):
    path = tmp_path / "run.items.jsonl"
    path.write_text(HEADER[:10])
    with pytest.warns(DataWarning, match="line 1: dropped a header cut short"):
        assert ItemLog(path, CONFIG).done == {}
    assert path.read_text() == HEADER


@pytest.mark.parametrize("line,what", [
    (b"garbage", "not an item record"),
    (b'{"id": 5, "v": 1}', "not an item record"),
    (b"[1, 2]", "not an item record"),
    (b'{"id": "z"}', "no 'v'"),
    (b'{"config": {"task": "gsm8k", "rate": 2.5}}',
     "the items log of a run with other settings (rate: 2.5 there, 2.0 now)"),
    (b'{"id": "z", "v": "\xff"}', "not UTF-8 text"),
    (b"[" * 10**5, "not an item record"),
])
def test_damage_is_one_error_naming_the_line_and_the_file_stays(tmp_path, line, what):
    path = tmp_path / "run.items.jsonl"
    whole = written(path, [{"id": "x", "v": 1}, {"id": "y", "v": 2}])
    lines = whole.splitlines(keepends=True)
    damaged = b"".join(lines[:2] + [line + b"\n"] + lines[2:])
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match="^" + f"{path}, line 3: {what}".replace("(", r"\(")
                       .replace(")", r"\)")):
        ItemLog(path, CONFIG, needs_value)
    assert path.read_bytes() == damaged


def test_other_settings_are_refused_naming_what_differs(tmp_path):
    path = tmp_path / "run.items.jsonl"
    written(path, [{"id": "x", "v": 1}])
    with pytest.raises(ValueError, match=r"line 1: the items log of a run with other settings "
                       r"\(extra: None there, True now; rate: 2.0 there, 3.0 now\)"):
        ItemLog(path, {**CONFIG, "rate": 3.0, "extra": True})
    path.write_text('{"id": "x", "v": 1}\n')
    with pytest.raises(ValueError, match="line 1: not an items log of sled eval or tune"):
        ItemLog(path, CONFIG)


def test_records_of_another_setting_lack_its_methods():
    choice = dict(id="0", n_true=1, best=0, scores={
        label: {"raw": [1.0, 0.5], "logprob": [-1.0, -2.0]} for label in ("greedy", "sled")})
    assert record_problem("choice", ["greedy", "sled"], choice) is None
    assert record_problem("choice", ["greedy", "dola"], choice) == (
        "no raw scores of 'dola' for every answer")
    assert record_problem("choice", ["greedy"], {**choice, "best": 1}) == (
        "not a multiple-choice record (n_true, best, scores)")
    generated = dict(id="0", gold="4", methods={"sled": dict(text="4", answer="4", correct=True)})
    assert record_problem("generation", ["sled"], generated) is None
    assert record_problem("generation", ["greedy"], generated) == "no answer of 'greedy'"
    assert record_problem("generation", ["sled"], choice) == (
        "not a generation record (gold, methods)")


RECORDS = st.lists(st.builds(lambda i, v: {"id": str(i), "v": v}, st.integers(0, 5),
                             st.integers()), max_size=6)


@FUZZ
@given(records=RECORDS, cut=st.integers(0, 10**6))
def test_fuzzed_kill_loses_no_finished_record(tmp_path_factory, records, cut):
    """Killed at any byte of its last append, a log reopens with every record written in full."""
    path = tmp_path_factory.mktemp("log") / "run.items.jsonl"
    whole = written(path, records)
    cut = len(HEADER) + cut % (len(whole) - len(HEADER) + 1)
    path.write_bytes(whole[:cut])
    ends, expected = [len(HEADER)], {}  # where each line ends, its newline included
    for record in records:
        ends.append(ends[-1] + len(json.dumps(record)) + 1)
        if ends[-1] - 1 <= cut:  # the JSON is whole; only its newline may be missing
            expected[record["id"]] = record
    torn = cut not in ends and cut + 1 not in ends
    with pytest.warns(DataWarning) if torn else no_warning():
        log = ItemLog(path, CONFIG, needs_value)
    assert log.done == expected
    with no_warning():  # reopened: clean, the same records
        assert ItemLog(path, CONFIG, needs_value).done == expected


@FUZZ
@given(records=RECORDS, at=st.integers(0, 10**6),
       line=st.binary(max_size=20).filter(lambda b: b"\n" not in b)
       | st.text(max_size=20).filter(lambda t: "\n" not in t).map(str.encode)
       | st.builds(lambda r: json.dumps(r).encode(), st.dictionaries(
           st.sampled_from(["id", "v", "config"]), st.integers() | st.text(max_size=3))))
def test_fuzzed_foreign_line_is_refused_or_harmless(tmp_path_factory, records, at, line):
    """A line put anywhere after the header: one error naming exactly that line, the file as it
    was; or, when it is a usable record or blank, every record still there."""
    path = tmp_path_factory.mktemp("log") / "run.items.jsonl"
    lines = written(path, records).splitlines(keepends=True)
    at = 1 + at % len(lines)
    damaged = b"".join(lines[:at] + [line + b"\n"] + lines[at:])
    path.write_bytes(damaged)
    try:
        log = ItemLog(path, CONFIG, needs_value)
    except ValueError as error:
        assert str(error).startswith(f"{path}, line {at + 1}: "), str(error)
        assert path.read_bytes() == damaged
        return
    foreign = json.loads(line) if line.strip() else None
    for id, record in {r["id"]: r for r in records}.items():  # the last record of an id counts
        assert log.done[id] in (record, foreign)
