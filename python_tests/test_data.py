"""The evaluation data shipped with the package, and data files a user hands us: each is read in
full or refused with one error naming the file and line (targeted cases, and hypothesis fuzzing
with an independent account of which line is wrong)."""
import csv
import hashlib
import io
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sled_ext import tasks
from sled_ext.cli import main

COUNTS = {"truthfulqa": 817, "factor-news": 1036, "factor-expert": 236, "strategyqa": 2290,
          "gsm8k": 1319}
FUZZ = settings(max_examples=150, deadline=None)


@pytest.fixture(autouse=True)
def _no_data_override(monkeypatch):
    monkeypatch.delenv("SLED_DATA", raising=False)


def test_every_packaged_file_has_its_sha256_and_licence():
    names = {name for task in tasks.TASKS.values() for name in task.files}
    assert set(tasks.published_sha256()) == names
    for name, digest in tasks.published_sha256().items():
        assert hashlib.sha256(tasks.read_data(tasks.PACKAGED_DATA / name)).hexdigest() == digest
    for folder in {name.split("/")[0] for name in names}:
        assert (tasks.PACKAGED_DATA / folder / "LICENSE").is_file(), folder


def test_the_loaders_read_the_packaged_data_and_nothing_outside_it(tmp_path):
    """A fresh clone or a pip install has no ../shared: every task loads from sled_ext/data, and
    an audit hook sees no other file opened."""
    script = (
        "import json, sys\n"
        "from sled_ext import tasks\n"
        "opened = []\n"
        "sys.addaudithook(lambda event, args: event == 'open' and not isinstance(args[0], int)"
        " and opened.append(str(args[0])))\n"
        "counts = {name: len(tasks.load(name)) for name in tasks.TASKS}\n"
        "print(json.dumps(dict(counts=counts, opened=opened, data=str(tasks.PACKAGED_DATA))))\n")
    env = {key: value for key, value in __import__("os").environ.items() if key != "SLED_DATA"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["counts"] == COUNTS
    data = Path(report["data"])
    assert data == Path(tasks.__file__).resolve().parent / "data"
    assert report["opened"] and all(Path(p).resolve().is_relative_to(data)
                                    for p in report["opened"]), report["opened"]


def test_the_build_ships_the_data_and_its_notices(tmp_path):
    """setuptools' build_py step lays out what a wheel holds (without compiling the kernels)."""
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                           str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    built = tmp_path / "sled_ext" / "data"
    for name in [*(f"{name}.xz" for name in tasks.published_sha256()), "SHA256SUMS", "README.md", *(
            f"{folder}/LICENSE" for folder in ("truthfulqa", "factor", "gsm8k", "strategyqa"))]:
        assert (built / name).read_bytes() == (tasks.PACKAGED_DATA / name).read_bytes(), name


def test_a_damaged_packaged_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(tasks.PACKAGED_DATA, copy)
    path = copy / "gsm8k" / "test.jsonl.xz"
    raw = bytearray(lzma.decompress(path.read_bytes()))
    raw[1000] ^= 1
    path.write_bytes(lzma.compress(bytes(raw)))
    monkeypatch.setattr(tasks, "PACKAGED_DATA", copy.resolve())
    with pytest.raises(ValueError, match=r"test.jsonl is damaged: sha256 [0-9a-f]{64}, expected "
                       r"3730d312.* reinstall sled-ext"):
        tasks.load("gsm8k")
    assert len(tasks.load("truthfulqa")) == COUNTS["truthfulqa"]  # the intact files still load


TRUTHFULQA_HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"


def _folder(root: Path, files: dict) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def test_another_folder_is_read_and_a_file_that_differs_is_named(tmp_path):
    folder = _folder(tmp_path, {"truthfulqa/TruthfulQA.csv": TRUTHFULQA_HEADER
                                + 'A,B,Is it?,Yes,Yes; Sure,"No; Never",S\n'
                                + "A,B,Why?,Because,Because,No reason,S\n"})
    with pytest.warns(tasks.DataWarning, match="TruthfulQA.csv differs from the published "
                      "truthfulqa/TruthfulQA.csv"):
        items = tasks.load("truthfulqa", folder)
    assert [(i.true, i.false) for i in items] == [((" Yes.", " Sure."), (" No.", " Never.")),
                                                  ((" Because.",), (" No reason.",))]
    (tmp_path / "gsm8k").mkdir()
    published = tasks.read_data(tasks.PACKAGED_DATA / "gsm8k" / "test.jsonl")
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(published)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the published file: no warning
        assert len(tasks.load("gsm8k", tmp_path)) == COUNTS["gsm8k"]


VALID_STRATEGYQA = '[{"qid": "a", "question": "Is it?", "answer": true}]'
BAD_FILES = [  # task, file, content, line, what the error says
    ("truthfulqa", "truthfulqa/TruthfulQA.csv", "Question,Best Answer,Correct Answers\nQ,B,C\n",
     1, "no column 'Incorrect Answers' in the header"),
    ("truthfulqa", "truthfulqa/TruthfulQA.csv", TRUTHFULQA_HEADER + "A,B,Q?,Yes,Yes,No,S\n"
     'A,B,"Two\nlines?",Yes,Yes, ; ,S\n', 3, "no incorrect answer"),
    ("truthfulqa", "truthfulqa/TruthfulQA.csv", TRUTHFULQA_HEADER + "A,B,Q?,Yes,Yes,No,S,extra\n",
     2, "8 fields, the header has 7"),
    ("truthfulqa", "truthfulqa/TruthfulQA.csv", TRUTHFULQA_HEADER + "A,B,Q?,,Yes,No,S\n",
     2, "empty 'Best Answer'"),
    ("truthfulqa", "truthfulqa/TruthfulQA.csv", "", 1, "the file is empty"),
    ("truthfulqa", "truthfulqa/TruthfulQA.csv", TRUTHFULQA_HEADER.encode()
     + b"A,B,Q?,Yes,Yes,No,S\nA,B,Caf\xe9?,Yes,Yes,No,S\n", 3, "not UTF-8 text"),
    ("factor-news", "factor/news_factor.csv",
     "full_prefix,completion,contradiction_0,contradiction_1,contradiction_2\nP,C,X,Y, \n",
     2, "empty 'contradiction_2'"),
    ("factor-expert", "factor/expert_factor.csv",
     "full_prefix,completion,contradiction_0,contradiction_1,contradiction_2\nP,C,X,Y,Z\n",
     1, "no column 'turncated_prefixes'"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "Q", "answer": "so #### 4"}\n\n{"question": ',
     3, "not valid JSON"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "Q", "answer": "it is 4"}\n',
     1, "the answer has no final '#### N'"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "Q", "answer": "#### four"}\n',
     1, "the final answer 'four' is not a number"),
    ("gsm8k", "gsm8k/test.jsonl", '["Q", "#### 4"]\n', 1, "expected a JSON object"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "", "answer": "#### 4"}\n',
     1, "'question' must be a non-empty string"),
    ("gsm8k", "gsm8k/test.jsonl", b'{"question": "Q", "answer": "#### 4"}\n\xff\xfe\n',
     2, "not UTF-8 text"),
    ("strategyqa", "strategyqa/train.json", '[{"qid": "a", "question": "Is it?",\n'
     ' "answer": "yes"}]', 1, "'answer' must be true or false, found 'yes'"),
    ("strategyqa", "strategyqa/train.json", '{"qid": "a"}', 1, "expected '[' in a JSON array"),
    ("strategyqa", "strategyqa/train.json", '[\n{"qid": "a", "question": "Q", "answer": true}\n',
     3, "expected ',' in a JSON array, found the end of the file"),
    ("strategyqa", "strategyqa/train.json", VALID_STRATEGYQA + "\n]", 2,
     "text after the end of the JSON array"),
    ("strategyqa", "strategyqa/train.json", VALID_STRATEGYQA[:-1] + ",\n]", 2,
     "not valid JSON (Expecting value)"),
    ("strategyqa", "strategyqa/train.json", '[\n{"qid": "a", "question": "Q", "answer": true},\n'
     '{"qid": 7, "question": "Q", "answer": true}]', 3, "'qid' must be a non-empty string"),
    ("strategyqa", "strategyqa/dev.json", '[\n\n{"qid": "a", "question": "Q", "answer": false}]',
     3, "qid 'a' again (first at train.json, line 1)"),
    ("strategyqa", "strategyqa/train.json", "[\n" + "[" * 10**5 + "]" * 10**5 + "]",
     2, "JSON nested too deeply to read"),
    ("gsm8k", "gsm8k/test.jsonl", "[" * 10**5, 1, "JSON nested too deeply to read"),
]


@pytest.mark.parametrize("task,name,content,line,what", BAD_FILES)
def test_a_malformed_file_is_one_error_naming_file_and_line(tmp_path, task, name, content, line,
                                                            what):
    files = {"strategyqa/train.json": VALID_STRATEGYQA, "strategyqa/dev.json": "[]"}
    folder = _folder(tmp_path, {**files, name: content})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tasks.DataWarning)
        with pytest.raises(ValueError) as error:
            tasks.load(task, folder)
    assert str(error.value).startswith(f"{folder / name}, line {line}: {what}"), str(error.value)


def test_a_file_without_items_is_refused(tmp_path):
    folder = _folder(tmp_path, {"truthfulqa/TruthfulQA.csv": TRUTHFULQA_HEADER,
                                "gsm8k/test.jsonl": "\n\n"})
    for task in ("truthfulqa", "gsm8k"):
        with pytest.warns(tasks.DataWarning), pytest.raises(ValueError, match=f"{task}: no items"):
            tasks.load(task, folder)


def test_a_byte_order_mark_is_accepted(tmp_path):
    folder = _folder(tmp_path, {"gsm8k/test.jsonl": b'\xef\xbb\xbf{"question": "Q", '
                                                    b'"answer": "so #### 1,250"}\n'})
    with pytest.warns(tasks.DataWarning):
        assert [item.answer for item in tasks.load("gsm8k", folder)] == ["1250"]


def test_cli_names_the_bad_line_and_the_differing_file_in_one_line_each(tmp_path, capsys):
    folder = _folder(tmp_path, {"gsm8k/test.jsonl": '{"question": "Q", "answer": "#### 4"}\n'
                                                    '{"question": "Q", "answer": 4}\n'})
    assert main(["eval", "gsm8k", "--data", str(folder), "--out", str(tmp_path / "r.json")]) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"sled: warning: {folder}/gsm8k/test.jsonl differs from")
    assert error == (f"sled: error: {folder}/gsm8k/test.jsonl, line 2: 'answer' must be a "
                     f"non-empty string, found 4")


# ---------------------------------------------------------------------------------------------
# Fuzzing: random files, and an account of the first wrong line written independently of the
# loaders (the line each record starts on is counted while the file is written).

TEXT = st.text(max_size=8)
CELL = TEXT | st.lists(TEXT, max_size=3).map("; ".join)  # answer lists are "; "-separated
REQUIRED = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def _lines(text: str) -> int:
    """Lines as a CSV reader counts them (universal newlines)."""
    return len(io.StringIO(text, newline="").readlines())


def _expect(load, path: Path, error):
    """Runs ``load``: ``error`` is None or ``(line, what)``, the error the file must give."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tasks.DataWarning)
        if error is None:
            return load()
        with pytest.raises(ValueError) as raised:
            load()
    line, what = error
    prefix = f"{path}, line {line}: " if line else ""
    assert str(raised.value).startswith(prefix) and what in str(raised.value), (
        str(raised.value), error)


@FUZZ
@given(header=st.permutations(["Type", *REQUIRED]).flatmap(
           lambda columns: st.sampled_from([columns, *(columns[:i] + columns[i + 1:]
                                                       for i in range(1, 5))])),
       rows=st.lists(st.fixed_dictionaries({c: CELL for c in ("Type", *REQUIRED)}), max_size=4),
       ragged=st.none() | st.integers(0, 3))
def test_fuzzed_truthfulqa_csv(header, rows, ragged):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    error, line = None, 2
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        error = (1, f"no column {missing[0]!r}")
    for i, row in enumerate(rows):
        start = buffer.tell()
        writer.writerow([row[c] for c in header] + (["extra"] if i == ragged else []))
        if error is None:
            if i == ragged:
                error = (line, "fields, the header has")
            elif any(not row[c].strip() for c in REQUIRED):
                error = (line, "empty")
            elif not any(a.strip() for a in row["Incorrect Answers"].split(";")):
                error = (line, "no incorrect answer")
        line += _lines(buffer.getvalue()[start:])
    if error is None and not rows:
        error = (None, "truthfulqa: no items")
    with tempfile.TemporaryDirectory() as root:
        folder = _folder(Path(root), {"truthfulqa/TruthfulQA.csv": buffer.getvalue()})
        path = folder / "truthfulqa" / "TruthfulQA.csv"
        items = _expect(lambda: tasks.load("truthfulqa", folder), path, error)
    if error is None:
        assert [i.prompt for i in items] == [tasks.TRUTHFULQA_PRIMER + "Q: " + r["Question"]
                                             + "\nA:" for r in rows]
        assert all(item.false and 0 <= item.best < len(item.true) for item in items)


STRATEGYQA_ELEMENT = st.one_of(
    st.fixed_dictionaries({"qid": st.sampled_from("abcd"), "question": TEXT,
                           "answer": st.booleans()}),
    st.fixed_dictionaries({"qid": st.integers() | st.none() | TEXT, "question": TEXT,
                           "answer": st.booleans() | TEXT | st.integers()}),
    st.dictionaries(TEXT, st.integers(), max_size=2), st.integers(), TEXT,
    st.lists(st.booleans(), max_size=2))


def _strategyqa_problem(element, seen):
    """What the loader must say about an array element, or None (records the qid)."""
    if not isinstance(element, dict):
        return "expected a JSON object"
    for key in ("qid", "question"):
        if not (isinstance(element.get(key), str) and element[key].strip()):
            return f"{key!r} must be a non-empty string"
    if not isinstance(element.get("answer"), bool):
        return "'answer' must be true or false"
    if element["qid"] in seen:
        return f"qid {element['qid']!r} again"
    seen.add(element["qid"])
    return None


@FUZZ
@given(elements=st.lists(STRATEGYQA_ELEMENT, max_size=5), indent=st.none() | st.integers(0, 2),
       ascii_only=st.booleans(), damage=st.sampled_from([None, "cut", "trailing", "no comma"]),
       trailing=st.sampled_from([" ]", "\n]", "\n\n x"]))
def test_fuzzed_strategyqa_json(elements, indent, ascii_only, damage, trailing):
    dumps = [json.dumps(e, indent=indent, ensure_ascii=ascii_only) for e in elements]
    separators = [",\n"] * max(len(dumps) - 1, 0)
    if damage == "no comma" and separators:
        separators[-1] = "\n"
    text = "[\n" + "".join(d + s for d, s in zip(dumps, separators + [""])) + "\n]"
    starts = [2 + sum(d.count("\n") + 1 for d in dumps[:i]) for i in range(len(dumps))]
    seen = set()  # what is wrong, in file order: the elements, and the damage where it lies
    problems = [(line, _strategyqa_problem(e, seen)) for line, e in zip(starts, elements)]
    if damage == "cut":
        text = text[:-2]
        problems.append((text.count("\n") + 1, "expected ',' in a JSON array, found the end")
                        if dumps else (2, "not valid JSON"))
    elif damage == "trailing":
        text += trailing
        problems.append((text.count("\n") + 1, "text after the end of the JSON array"))
    elif damage == "no comma" and separators:  # the scan stops before the last element
        problems[-1] = (starts[-1], "expected ',' in a JSON array")
    error = next(((line, what) for line, what in problems if what), None)
    if error is None and not elements:
        error = (None, "strategyqa: no items")
    with tempfile.TemporaryDirectory() as root:
        folder = _folder(Path(root), {"strategyqa/train.json": text, "strategyqa/dev.json": "[]"})
        items = _expect(lambda: tasks.load("strategyqa", folder),
                        folder / "strategyqa" / "train.json", error)
    if error is None:
        assert [(i.id, i.answer) for i in items] == [(e["qid"], "yes" if e["answer"] else "no")
                                                     for e in elements]


GSM8K_LINE = st.one_of(
    st.builds(lambda q, a, n: json.dumps({"question": q, "answer": f"{a} #### {n}"}),
              TEXT, TEXT, st.integers(-10**6, 10**6).map("{:,}".format)),
    st.builds(lambda q, a: json.dumps({"question": q, "answer": a}), TEXT, TEXT),
    st.builds(json.dumps, st.integers() | st.lists(TEXT, max_size=2)),
    TEXT.filter(lambda t: "\n" not in t), st.just(""))


def _gsm8k_problem(line: str):
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return "not valid JSON"
    if not isinstance(row, dict):
        return "expected a JSON object"
    for key in ("question", "answer"):
        if not (isinstance(row.get(key), str) and row[key].strip()):
            return f"{key!r} must be a non-empty string"
    if "####" not in row["answer"]:
        return "no final '#### N'"
    gold = row["answer"].split("####")[-1].strip().replace(",", "")
    whole, dot, fraction = gold.removeprefix("-").partition(".")
    digits = [whole, fraction] if dot else [whole]
    return None if all(d.isascii() and d.isdigit() for d in digits) else "is not a number"


@FUZZ
@given(lines=st.lists(GSM8K_LINE, max_size=5))
def test_fuzzed_gsm8k_jsonl(lines):
    problems = [(n, _gsm8k_problem(line)) for n, line in enumerate(lines, 1)]
    error = next(((n, what) for n, what in problems if what), None)
    if error is None and not any(line.strip() for line in lines):
        error = (None, "gsm8k: no items")
    with tempfile.TemporaryDirectory() as root:
        folder = _folder(Path(root), {"gsm8k/test.jsonl": "\n".join(lines) + "\n"})
        items = _expect(lambda: tasks.load("gsm8k", folder), folder / "gsm8k" / "test.jsonl",
                        error)
    if error is None:
        golds = [json.loads(line)["answer"].split("####")[-1].strip().replace(",", "")
                 for line in lines if line.strip()]
        assert [item.answer for item in items] == golds


@pytest.mark.parametrize("content,what", [
    ("{", "not a JSON file (Expecting property name enclosed in double quotes: line 1"),
    ("[1, 2]", "expected a setting saved by sled tune --save"),
    ('{"chosen": {"evolution_scale": "ten"}}', "found {\"evolution_scale\": \"ten\"}"),
    ('{"chosen": {"evolution_rate": 1.5, "temperature": 0.7}}', "an object of evolution_scale"),
    ('{"chosen": {}}', "expected a setting"),
])
def test_a_bad_config_file_is_one_error_naming_it(tmp_path, capsys, content, what):
    path = tmp_path / "tuned.json"
    path.write_text(content)
    assert main(["eval", "truthfulqa", "--config", str(path), "--out",
                 str(tmp_path / "r.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"sled: error: --config {path}: ") and what in error, error


def test_a_saved_setting_reads_back():
    from sled_ext.cli import _saved_setting
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "tuned.json"
        chosen = {"evolution_scale": 75, "evolution_rate": 1.75, "layers": "stride:4"}
        path.write_text(json.dumps({"chosen": chosen}))  # what sled tune --save writes
        assert _saved_setting(str(path)) == chosen
        path.write_text(json.dumps({"layers": [0, 4], "evolution_lower_bound": -100}))
        assert _saved_setting(str(path)) == {"layers": [0, 4], "evolution_lower_bound": -100}
