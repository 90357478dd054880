"""Task loading (YAML + data files), splits, fingerprints, and every bad-input path."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from opro_agent.errors import ConfigError
from opro_agent.metrics import METRIC_NAMES
from opro_agent.task import SplitSpec, Task

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"

# Five multiple-field records used for every data format.
RECORDS = [
    {"question": f"Which is {i} plus one?", "options": f"(A) {i + 1} (B) {i + 2}", "answer": "A"}
    for i in range(5)
]
FIELDS_YAML = "  input: [question, options]\n  target: answer\n"
SMALL_SPLIT = "split: {train: 2, validation: 1}\n"


def _delimited(records: list[dict[str, str]], delimiter: str) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(records[0]), delimiter=delimiter)
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")


def _task_yaml(data_yaml: str) -> str:
    return f"name: fmt\ndata:\n{data_yaml}{FIELDS_YAML}{SMALL_SPLIT}"


# -- loading each data format ------------------------------------------------------------

FORMATS = {
    "json-list": ("d.json", json.dumps(RECORDS), "  path: d.json\n"),
    "json-records": (
        "d.json",
        json.dumps({"meta": {"v": 1}, "items": RECORDS}),
        "  path: d.json\n  records: items\n",
    ),
    "jsonl": ("d.jsonl", "\n".join(json.dumps(r) for r in RECORDS) + "\n\n", "  path: d.jsonl\n"),
    "csv": ("d.csv", _delimited(RECORDS, ","), "  path: d.csv\n"),
    "tsv": ("d.tsv", _delimited(RECORDS, "\t"), "  path: d.tsv\n"),
    "upper-case-suffix": (
        "D.JSONL",
        "\n".join(json.dumps(r) for r in RECORDS),
        "  path: D.JSONL\n",
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_loads_each_data_format(tmp_path: Path, fmt: str) -> None:
    data_name, data_text, data_yaml = FORMATS[fmt]
    _write(tmp_path, {data_name: data_text, "task.yaml": _task_yaml(data_yaml)})

    task = Task.from_yaml(tmp_path / "task.yaml")

    assert task.name == "fmt"
    assert task.input_fields == ("question", "options")
    assert [e.id for e in task.examples] == ["0", "1", "2", "3", "4"]
    for example, record in zip(task.examples, RECORDS, strict=True):
        assert dict(example.inputs) == {
            "question": record["question"],
            "options": record["options"],
        }
        assert example.target == record["answer"]
        assert task.question(example) == f"{record['question']}\n{record['options']}"
    assert task.source == str((tmp_path / "task.yaml").resolve())


def test_data_path_is_relative_to_the_task_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "sub").mkdir()
    _write(
        tmp_path / "sub", {"d.json": json.dumps(RECORDS), "t.yaml": _task_yaml("  path: d.json\n")}
    )
    monkeypatch.chdir(tmp_path)
    assert len(Task.from_yaml("sub/t.yaml").examples) == 5


def test_inline_examples_and_defaults(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "t.yaml": "name: inline-1\nexamples:\n"
            "  - {input: 'Is 2 even?', target: 'yes'}\n"
            "  - {input: 'Is 3 even?', target: 'no'}\n"
            "  - {input: 'Is 4 even?', target: 'yes'}\n"
            "split: {train: 1, validation: 1}\n"
        },
    )
    task = Task.from_yaml(tmp_path / "t.yaml")
    assert task.input_fields == ("input",)
    assert [task.question(e) for e in task.examples] == ["Is 2 even?", "Is 3 even?", "Is 4 even?"]
    assert [e.target for e in task.examples] == ["yes", "no", "yes"]
    assert task.metric_name == "exact_match"
    assert task.instruction_position == "Q_begin"
    assert task.initial_instructions == ("Let's solve the problem.",)
    assert task.answer_max_tokens == 64


def test_numbers_and_booleans_in_data_become_text(tmp_path: Path) -> None:
    rows = [
        {"input": 7, "target": 2.5},
        {"input": True, "target": 0},
        {"input": "text", "target": False},
    ]
    _write(
        tmp_path,
        {
            "d.jsonl": "\n".join(json.dumps(r) for r in rows),
            "t.yaml": "name: nums\ndata: {path: d.jsonl}\nsplit: {train: 1, validation: 1}\n",
            "i.yaml": "name: nums\nexamples:\n  - {input: 12, target: 15}\n"
            "split: {train: 1, validation: 0}\n",
        },
    )
    task = Task.from_yaml(tmp_path / "t.yaml")
    assert [(task.question(e), e.target) for e in task.examples] == [
        ("7", "2.5"),
        ("true", "0"),
        ("text", "false"),
    ]
    inline = Task.from_yaml(tmp_path / "i.yaml")
    assert (inline.question(inline.examples[0]), inline.examples[0].target) == ("12", "15")


@pytest.mark.parametrize("path", sorted(TASKS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_example_tasks_load(path: Path) -> None:
    task = Task.from_yaml(path)
    assert task.name == path.stem
    assert task.metric_name in METRIC_NAMES
    splits = task.splits()
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (20, 20, 50)
    for example in task.examples:
        assert task.question(example).strip()
        assert example.target.strip()


def test_shipped_tasks_exist() -> None:
    assert len(sorted(TASKS_DIR.glob("*.yaml"))) == 3


# -- Task.from_records and metrics ---------------------------------------------------------


def _records(n: int) -> list[dict[str, str]]:
    return [{"input": f"q{i}", "target": f"a{i}"} for i in range(n)]


def test_from_records_with_builtin_metric() -> None:
    task = Task.from_records("t", _records(10), metric="boolean", split=SplitSpec(3, 2))
    assert task.metric_name == "boolean"
    assert task.metric("Yes.", "yes", "q") == 1.0
    assert task.metric("No.", "yes", "q") == 0.0
    assert task.source is None


def test_from_records_with_two_argument_callable() -> None:
    task = Task.from_records(
        "t", _records(10), metric=lambda prediction, target: prediction == target
    )
    assert task.metric_name == "custom"
    assert task.metric("a1", "a1", "q1") == 1.0
    assert task.metric("a2", "a1", "q1") == 0.0


def test_from_records_multiple_input_fields() -> None:
    task = Task.from_records(
        "t",
        [{"q": f"question {i}", "opts": "(A) x\n(B) y", "gold": "A"} for i in range(4)],
        input=["q", "opts"],
        target="gold",
        split=SplitSpec(1, 1),
    )
    assert task.question(task.examples[2]) == "question 2\n(A) x\n(B) y"
    assert task.examples[2].target == "A"


def test_from_records_unknown_metric_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown metric 'f1'"):
        Task.from_records("t", _records(10), metric="f1")


# -- splits --------------------------------------------------------------------------------


def _ids(examples) -> list[str]:
    return [e.id for e in examples]


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        (SplitSpec(train=10, validation=5, test=20), (10, 5, 20)),
        (SplitSpec(train=10, validation=5), (10, 5, 35)),  # test omitted: the rest
        (SplitSpec(train=0.3, validation=0.2, test=0.1), (15, 10, 5)),
        (SplitSpec(train=0.3, validation=0.2), (15, 10, 25)),
        (SplitSpec(train=1.0, validation=0, test=0), (50, 0, 0)),
        (SplitSpec(train=50, validation=0), (50, 0, 0)),
        (SplitSpec(train=0.5, validation=5), (25, 5, 20)),  # fraction and count mixed
    ],
)
def test_split_sizes_disjoint_and_within_data(spec: SplitSpec, sizes: tuple[int, int, int]) -> None:
    task = Task.from_records("t", _records(50), split=spec)
    splits = task.splits()
    parts = [_ids(splits.train), _ids(splits.validation), _ids(splits.test)]
    assert tuple(len(p) for p in parts) == sizes
    every = [i for p in parts for i in p]
    assert len(every) == len(set(every)), "splits overlap"
    assert set(every) <= set(_ids(task.examples))
    if spec.test is None:
        assert set(every) == set(_ids(task.examples))
    assert splits.get("train") == splits.train and splits.get("test") == splits.test


def test_splits_are_deterministic_for_a_seed_and_differ_across_seeds() -> None:
    def train_ids(seed: int) -> list[str]:
        task = Task.from_records("t", _records(50), split=SplitSpec(10, 10, seed=seed))
        return _ids(task.splits().train)

    assert train_ids(1) == train_ids(1)
    assert train_ids(1) != train_ids(2)
    assert train_ids(0) != _ids(Task.from_records("t", _records(50)).examples)[:10]  # shuffled


def test_split_from_yaml_is_deterministic(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "d.jsonl": "\n".join(json.dumps(r) for r in _records(40)),
            "t.yaml": "name: t\ndata: {path: d.jsonl}\nsplit: {train: 8, validation: 4, seed: 7}\n",
        },
    )
    first = Task.from_yaml(tmp_path / "t.yaml").splits()
    second = Task.from_yaml(tmp_path / "t.yaml").splits()
    assert first == second
    assert (len(first.train), len(first.validation), len(first.test)) == (8, 4, 28)


@pytest.mark.parametrize(
    ("n", "spec"),
    [(10, SplitSpec(train=8, validation=5)), (3, SplitSpec(train=0.5, validation=0.5))],
    ids=["counts", "rounded-fractions"],
)
def test_train_plus_validation_exceeding_data_is_rejected(n: int, spec: SplitSpec) -> None:
    task = None
    try:
        task = Task.from_records("t", _records(n), split=spec)
    except ConfigError as exc:
        assert exc.field == "split"
    assert task is None, f"accepted; validation has {len(task.splits().validation)} examples"


# -- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_changes_with_data_only(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _records(10)), encoding="utf-8")
    _write(
        tmp_path, {"t.yaml": "name: t\ndata: {path: d.jsonl}\nsplit: {train: 3, validation: 2}\n"}
    )
    first = Task.from_yaml(tmp_path / "t.yaml").fingerprint()
    assert Task.from_yaml(tmp_path / "t.yaml").fingerprint() == first

    changed = _records(10)
    changed[4]["target"] = "something else"
    data.write_text("\n".join(json.dumps(r) for r in changed), encoding="utf-8")
    assert Task.from_yaml(tmp_path / "t.yaml").fingerprint() != first


def test_fingerprint_covers_split_and_metric() -> None:
    base = Task.from_records("t", _records(10), split=SplitSpec(3, 2, seed=0))
    assert Task.from_records("t", _records(10), split=SplitSpec(3, 2, seed=1)).fingerprint() != (
        base.fingerprint()
    )
    assert Task.from_records(
        "t", _records(10), metric="contains", split=SplitSpec(3, 2, seed=0)
    ).fingerprint() != (base.fingerprint())


# -- bad input: every path is a one-line ConfigError naming the file and the field ----------

EXAMPLES = "examples:\n" + "".join(f"  - {{input: 'q{i}', target: 'a{i}'}}\n" for i in range(10))
GOOD_HEAD = "name: t\n" + EXAMPLES
JSONL10 = "\n".join(json.dumps(r) for r in _records(10)) + "\n"

# id: (task.yaml text or None for "no file", other files, fragments str(error) must contain)
BAD_INPUTS: dict[str, tuple[str | None, dict[str, str], list[str]]] = {
    "missing-file": (None, {}, ["task.yaml", "no such file"]),
    "invalid-yaml": (
        "name: t\nfoo: bar\n  baz: qux\n",
        {},
        ["task.yaml", "invalid YAML", "line 3"],
    ),
    "top-level-list": ("- name: t\n", {}, ["task.yaml", "mapping"]),
    "top-level-scalar": ("just text\n", {}, ["task.yaml", "mapping"]),
    "empty-file": ("", {}, ["task.yaml", "mapping"]),
    "unknown-top-field": (GOOD_HEAD + "colour: red\n", {}, ["task.yaml", "colour", "unknown"]),
    "missing-name": (EXAMPLES, {}, ["task.yaml", "name", "missing"]),
    "name-uppercase": (GOOD_HEAD.replace("name: t", "name: MyTask"), {}, ["task.yaml: name"]),
    "name-space": (GOOD_HEAD.replace("name: t", "name: my task"), {}, ["task.yaml: name"]),
    "name-not-string": (GOOD_HEAD.replace("name: t", "name: [t]"), {}, ["task.yaml: name"]),
    "both-data-and-examples": (
        GOOD_HEAD + "data: {path: d.jsonl}\n",
        {"d.jsonl": JSONL10},
        ["task.yaml", "'data'", "'examples'"],
    ),
    "neither-data-nor-examples": ("name: t\n", {}, ["task.yaml", "'data'", "'examples'"]),
    "examples-empty": ("name: t\nexamples: []\n", {}, ["task.yaml: examples"]),
    "example-missing-target": (
        "name: t\nexamples:\n  - {input: a, target: b}\n  - {input: c}\n",
        {},
        ["task.yaml: examples[1]", "'target'"],
    ),
    "data-not-mapping": ("name: t\ndata: d.jsonl\n", {}, ["task.yaml: data"]),
    "unknown-data-field": (
        "name: t\ndata: {path: d.jsonl, format: jsonl}\n",
        {"d.jsonl": JSONL10},
        ["task.yaml: data.format", "unknown"],
    ),
    "data-path-missing-field": ("name: t\ndata: {input: q}\n", {}, ["task.yaml: data.path"]),
    "data-path-no-such-file": (
        "name: t\ndata: {path: nope.jsonl}\n",
        {},
        ["task.yaml: data.path", "nope.jsonl"],
    ),
    "unsupported-extension": (
        "name: t\ndata: {path: d.txt}\n",
        {"d.txt": "q,a\n"},
        ["task.yaml: data.path", "'.txt'"],
    ),
    "no-extension": ("name: t\ndata: {path: d}\n", {"d": "x"}, ["task.yaml: data.path"]),
    "records-on-non-json": (
        "name: t\ndata: {path: d.jsonl, records: items}\n",
        {"d.jsonl": JSONL10},
        ["task.yaml: data.records"],
    ),
    "records-key-missing": (
        "name: t\ndata: {path: d.json, records: items}\n",
        {"d.json": json.dumps({"rows": _records(10)})},
        ["task.yaml: data.records", "'items'"],
    ),
    "json-not-a-list": (
        "name: t\ndata: {path: d.json}\n",
        {"d.json": json.dumps({"rows": _records(10)})},
        ["d.json", "list", "data.records"],
    ),
    "invalid-json": (
        "name: t\ndata: {path: d.json}\n",
        {"d.json": '[\n  {"input": "a", "target": "b"},\n  {"input": \n'},
        ["d.json", "line 4", "invalid JSON"],
    ),
    "invalid-jsonl-line": (
        "name: t\ndata: {path: d.jsonl}\n",
        {"d.jsonl": JSONL10.replace('{"input": "q2"', '{"input" "q2"')},
        ["d.jsonl", "line 3", "invalid JSON"],
    ),
    "record-missing-input": (
        "name: t\ndata: {path: d.jsonl, input: [input, extra]}\n",
        {"d.jsonl": JSONL10},
        ["d.jsonl: record[0]", "'extra'"],
    ),
    "record-missing-target": (
        "name: t\ndata: {path: d.jsonl}\n",
        {"d.jsonl": JSONL10.replace('"target": "a6"', '"answer": "a6"')},
        ["d.jsonl: record[6]", "'target'"],
    ),
    "csv-missing-column": (
        "name: t\ndata: {path: d.csv, input: question, target: answer}\n",
        {"d.csv": "question,solution\nq,a\n"},
        ["d.csv: record[0]", "'answer'"],
    ),
    "record-not-a-mapping": (
        "name: t\ndata: {path: d.json}\n",
        {"d.json": json.dumps([{"input": "a", "target": "b"}, "oops"])},
        ["d.json: record[1]", "mapping"],
    ),
    "value-is-a-dict": (
        "name: t\ndata: {path: d.jsonl}\n",
        {"d.jsonl": JSONL10.replace('"q5"', '{"text": "q5"}')},
        ["d.jsonl: record[5]", "'input'", "text or a number"],
    ),
    "value-is-null": (
        "name: t\ndata: {path: d.jsonl}\n",
        {"d.jsonl": JSONL10.replace('"a0"', "null")},
        ["d.jsonl: record[0]", "'target'"],
    ),
    "no-records": ("name: t\ndata: {path: d.json}\n", {"d.json": "[]"}, ["d.json", "no examples"]),
    "invalid-input-field-name": (
        "name: t\ndata: {path: d.jsonl, input: 'my field'}\n",
        {"d.jsonl": JSONL10},
        ["task.yaml: data.input", "'my field'"],
    ),
    "input-fields-empty-list": (
        "name: t\ndata: {path: d.jsonl, input: []}\n",
        {"d.jsonl": JSONL10},
        ["task.yaml: data.input"],
    ),
    "target-not-a-name": (
        "name: t\ndata: {path: d.jsonl, target: [a]}\n",
        {"d.jsonl": JSONL10},
        ["task.yaml: data.target"],
    ),
    "unknown-metric": (GOOD_HEAD + "metric: f1\n", {}, ["task.yaml: metric", "'f1'"]),
    "unknown-metric-field": (
        GOOD_HEAD + "metric: {name: regex, flags: i}\n",
        {},
        ["task.yaml: metric.flags"],
    ),
    "metric-not-name-or-mapping": (GOOD_HEAD + "metric: [boolean]\n", {}, ["task.yaml: metric"]),
    "regex-without-pattern": (GOOD_HEAD + "metric: regex\n", {}, ["task.yaml: metric.pattern"]),
    "regex-invalid-pattern": (
        GOOD_HEAD + "metric: {name: regex, pattern: '(unclosed'}\n",
        {},
        ["task.yaml: metric.pattern"],
    ),
    "python-metric-bad-spec": (
        GOOD_HEAD + "metric: {name: python, function: 'not a spec'}\n",
        {},
        ["task.yaml: metric.function", "'not a spec'"],
    ),
    "python-metric-without-function": (
        GOOD_HEAD + "metric: python\n",
        {},
        ["task.yaml: metric.function"],
    ),
    "python-metric-missing-module": (
        GOOD_HEAD + "metric: {name: python, function: 'no_such_module_xyz:score'}\n",
        {},
        ["task.yaml: metric.function", "no_such_module_xyz"],
    ),
    "bad-instruction-position": (
        GOOD_HEAD + "instruction_position: middle\n",
        {},
        ["task.yaml: instruction_position", "'middle'"],
    ),
    "initial-instructions-not-list": (
        GOOD_HEAD + "initial_instructions: Think.\n",
        {},
        ["task.yaml: initial_instructions"],
    ),
    "initial-instructions-not-strings": (
        GOOD_HEAD + "initial_instructions: [Think., 3]\n",
        {},
        ["task.yaml: initial_instructions"],
    ),
    "description-not-string": (GOOD_HEAD + "description: [a]\n", {}, ["task.yaml: description"]),
    "split-not-mapping": (GOOD_HEAD + "split: [3, 2]\n", {}, ["task.yaml: split"]),
    "unknown-split-field": (
        GOOD_HEAD + "split: {train: 3, dev: 2}\n",
        {},
        ["task.yaml: split.dev", "unknown"],
    ),
    "negative-split": (GOOD_HEAD + "split: {train: -1}\n", {}, ["task.yaml: split.train"]),
    "split-not-number": (GOOD_HEAD + "split: {validation: many}\n", {}, ["split.validation"]),
    "split-bool": (GOOD_HEAD + "split: {test: true}\n", {}, ["task.yaml: split.test"]),
    "split-seed-not-int": (GOOD_HEAD + "split: {seed: 1.5}\n", {}, ["task.yaml: split.seed"]),
    "fraction-above-one": (GOOD_HEAD + "split: {train: 1.5}\n", {}, ["task.yaml: split.train"]),
    "counts-exceed-data": (
        GOOD_HEAD + "split: {train: 5, validation: 3, test: 5}\n",
        {},
        ["task.yaml: split", "13", "only 10"],
    ),
    "empty-train-split": (
        GOOD_HEAD + "split: {train: 0, validation: 2}\n",
        {},
        ["task.yaml: split.train", "empty"],
    ),
    "train-fraction-rounds-to-zero": (
        GOOD_HEAD + "split: {train: 0.01}\n",
        {},
        ["task.yaml: split.train", "empty"],
    ),
    "answer-max-tokens-zero": (GOOD_HEAD + "answer_max_tokens: 0\n", {}, ["answer_max_tokens"]),
    "answer-max-tokens-negative": (
        GOOD_HEAD + "answer_max_tokens: -5\n",
        {},
        ["answer_max_tokens"],
    ),
    "answer-max-tokens-text": (GOOD_HEAD + "answer_max_tokens: many\n", {}, ["answer_max_tokens"]),
    "answer-max-tokens-bool": (GOOD_HEAD + "answer_max_tokens: true\n", {}, ["answer_max_tokens"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_config_error_naming_file_and_field(
    tmp_path: Path, case: str
) -> None:
    task_text, files, fragments = BAD_INPUTS[case]
    _write(tmp_path, files)
    if task_text is not None:
        _write(tmp_path, {"task.yaml": task_text})

    with pytest.raises(ConfigError) as caught:
        Task.from_yaml(tmp_path / "task.yaml")

    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_config_error_for_task_file_names_its_full_path(tmp_path: Path) -> None:
    _write(tmp_path, {"task.yaml": GOOD_HEAD + "metric: f1\n"})
    with pytest.raises(ConfigError) as caught:
        Task.from_yaml(tmp_path / "task.yaml")
    assert caught.value.source == str(tmp_path / "task.yaml")
    assert caught.value.field == "metric"


def test_python_metric_from_the_task_folder(tmp_path: Path) -> None:
    module = f"metric_{tmp_path.name.replace('-', '_')}"
    _write(
        tmp_path,
        {
            f"{module}.py": "def score(prediction, target):\n    return prediction == target\n",
            "task.yaml": GOOD_HEAD + f"metric: {{name: python, function: '{module}:score'}}\n",
        },
    )
    task = Task.from_yaml(tmp_path / "task.yaml")
    assert task.metric_name == "python"
    assert (task.metric("a", "a", "q"), task.metric("a", "b", "q")) == (1.0, 0.0)


# -- regressions of bugs found in review ------------------------------------------------------


def test_target_field_among_input_fields_is_rejected(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {"d.jsonl": JSONL10, "task.yaml": "name: t\ndata: {path: d.jsonl, input: target}\n"},
    )
    try:
        task = Task.from_yaml(tmp_path / "task.yaml")
    except ConfigError as exc:
        assert "task.yaml" in str(exc) and "data." in str(exc)
        return
    task.question(task.examples[0])  # KeyError: 'target'
    pytest.fail("accepted a target that is also an input field")


def test_csv_quoted_multiline_field_keeps_its_newline(tmp_path: Path) -> None:
    rows = [{"question": "Q?", "options": "(A) x\n(B) y", "answer": "A"}] * 3
    _write(tmp_path, {"d.csv": _delimited(rows, ","), "task.yaml": _task_yaml("  path: d.csv\n")})
    task = Task.from_yaml(tmp_path / "task.yaml")
    assert task.examples[0].inputs["options"] == "(A) x\n(B) y"


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "d.csv": "\ufeff" + _delimited(RECORDS, ","),
            "task.yaml": _task_yaml("  path: d.csv\n"),
        },
    )
    assert len(Task.from_yaml(tmp_path / "task.yaml").examples) == 5


def test_jsonl_string_with_unicode_line_separator(tmp_path: Path) -> None:
    rows = [{"input": "first\u2028second", "target": "x"}] * 3
    _write(
        tmp_path,
        {
            "d.jsonl": "\n".join(json.dumps(r, ensure_ascii=False) for r in rows),
            "task.yaml": "name: t\ndata: {path: d.jsonl}\nsplit: {train: 1, validation: 1}\n",
        },
    )
    task = Task.from_yaml(tmp_path / "task.yaml")
    assert task.question(task.examples[0]) == "first\u2028second"


def test_the_fingerprint_tells_regex_patterns_and_python_metrics_apart(tmp_path: Path) -> None:
    """A resumed run must not mix scores of two different metrics of the same kind."""
    (tmp_path / "data.jsonl").write_text('{"input": "q", "target": "yes"}\n' * 4)

    def fingerprint(metric: str, name: str) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"name: t\ndata: {{path: data.jsonl}}\nmetric: {metric}\nsplit: {{train: 2}}\n"
        )
        return Task.from_yaml(path).fingerprint()

    (tmp_path / "strict_metric.py").write_text("def score(p, t):\n    return p == t\n")
    (tmp_path / "loose_metric.py").write_text("def score(p, t):\n    return t in p\n")
    fingerprints = {
        fingerprint("{name: regex, pattern: '(yes|no)'}", "a"),
        fingerprint("{name: regex, pattern: '(y|n)'}", "b"),
        fingerprint("{name: python, function: 'strict_metric:score'}", "c"),
        fingerprint("{name: python, function: 'loose_metric:score'}", "d"),
        fingerprint("boolean", "e"),
    }
    assert len(fingerprints) == 5
    assert fingerprint("{name: regex, pattern: '(y|n)'}", "f") in fingerprints  # stable
