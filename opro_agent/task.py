"""Tasks: examples with ground truth, a metric, and how to split them.

A task comes from a YAML file (`Task.from_yaml`) or is built in code (`Task.from_records`).
Splits are disjoint and deterministic for a seed; the test split is only for the final report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from opro_agent.errors import ConfigError
from opro_agent.files import read_yaml
from opro_agent.metrics import (
    METRIC_NAMES,
    Metric,
    get_metric,
    metric_from_callable,
    metric_identity,
)
from opro_agent.prompts import INSTRUCTION_POSITIONS, InstructionPosition, render_question

__all__ = ["Example", "SplitSpec", "Task", "TaskSplits"]

_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOP_FIELDS = frozenset(
    {
        "name",
        "description",
        "data",
        "examples",
        "metric",
        "instruction_position",
        "initial_instructions",
        "split",
        "answer_max_tokens",
        "strategy",
    }
)
_DATA_FIELDS = frozenset({"path", "records", "input", "target"})
_METRIC_FIELDS = frozenset({"name", "pattern", "function"})
_SPLIT_FIELDS = frozenset({"train", "validation", "test", "seed"})
DEFAULT_INITIAL_INSTRUCTIONS = ("Let's solve the problem.",)
_CODED = frozenset({"regex", "python"})  # metrics whose behaviour is not fixed by their name


@dataclass(frozen=True)
class Example:
    """One question (its input fields) with its ground-truth answer."""

    id: str
    inputs: Mapping[str, str]
    target: str


@dataclass(frozen=True)
class SplitSpec:
    """Sizes of the splits: counts (int) or fractions of the data (float in (0, 1])."""

    train: int | float = 0.3
    validation: int | float = 0.2
    test: int | float | None = None  # None: all that is left
    seed: int = 0


@dataclass(frozen=True)
class TaskSplits:
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]

    def get(self, name: str) -> tuple[Example, ...]:
        splits = {"train": self.train, "validation": self.validation, "test": self.test}
        return splits[name]


@dataclass(frozen=True)
class Task:
    """Everything opro-agent needs to know about a task."""

    name: str
    examples: tuple[Example, ...]
    metric: Metric
    metric_name: str = "custom"
    input_fields: tuple[str, ...] = ("input",)
    description: str = ""
    instruction_position: InstructionPosition = "Q_begin"
    initial_instructions: tuple[str, ...] = DEFAULT_INITIAL_INSTRUCTIONS
    split: SplitSpec = field(default_factory=SplitSpec)
    answer_max_tokens: int = 64
    # The search strategy the task file asks for: {"name": ..., settings...}; checked
    # against the known strategies where a run is built.
    strategy: Mapping[str, Any] | None = None
    source: str | None = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_records(
        cls,
        name: str,
        records: Iterable[Mapping[str, Any]],
        *,
        metric: str | Metric | Callable[..., float | bool] = "exact_match",
        input: str | Sequence[str] = "input",
        target: str = "target",
        **settings: Any,
    ) -> Task:
        """Build a task in code from dicts; `metric` is a built-in name or any callable."""
        fields = _input_fields(input, target=target, source=None, field_name="input")
        examples = _examples(list(records), fields, target, source=None)
        if isinstance(metric, str):
            metric_fn, metric_name = get_metric(metric), metric
        else:
            metric_fn, metric_name = metric_from_callable(metric), "custom"
        task = cls(
            name=name,
            examples=examples,
            metric=metric_fn,
            metric_name=metric_name,
            input_fields=fields,
            **settings,
        )
        task.check()
        return task

    @classmethod
    def from_yaml(cls, path: str | Path) -> Task:
        """Load and validate a task file; every problem is a ConfigError naming the field."""
        path = Path(path)
        src = str(path)
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError("a task file must be a mapping of fields", source=src)
        _reject_unknown(raw, _TOP_FIELDS, src, "")
        name = _require(raw, "name", str, src)
        if not _NAME_RE.match(name):
            raise ConfigError(f"{name!r} must match [a-z0-9_-]+", source=src, field="name")

        if ("data" in raw) == ("examples" in raw):
            raise ConfigError("give exactly one of 'data' or 'examples'", source=src)
        if "data" in raw:
            fields, examples = _load_data(raw["data"], path.parent, src)
        else:
            records = raw["examples"]
            if not isinstance(records, list) or not records:
                raise ConfigError("must be a non-empty list", source=src, field="examples")
            fields = ("input",)
            examples = _examples(records, fields, "target", source=src, field_prefix="examples")

        metric_fn, metric_name = _load_metric(raw.get("metric", "exact_match"), path.parent, src)
        position = raw.get("instruction_position", "Q_begin")
        if position not in INSTRUCTION_POSITIONS:
            raise ConfigError(
                f"{position!r} is not one of {', '.join(INSTRUCTION_POSITIONS)}",
                source=src,
                field="instruction_position",
            )
        initial = raw.get("initial_instructions", list(DEFAULT_INITIAL_INSTRUCTIONS))
        if not isinstance(initial, list) or not all(isinstance(i, str) for i in initial):
            raise ConfigError("must be a list of strings", source=src, field="initial_instructions")
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise ConfigError("must be a string", source=src, field="description")
        max_tokens = raw.get("answer_max_tokens", 64)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ConfigError("must be a positive integer", source=src, field="answer_max_tokens")
        task = cls(
            name=name,
            examples=examples,
            metric=metric_fn,
            metric_name=metric_name,
            input_fields=fields,
            description=description,
            instruction_position=cast(InstructionPosition, position),
            initial_instructions=tuple(initial),
            split=_load_split(raw.get("split", {}), src),
            answer_max_tokens=max_tokens,
            strategy=_load_strategy(raw.get("strategy"), src),
            source=str(path.resolve()),
        )
        task.check()
        return task

    # -- use --------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ConfigError if the splits cannot be made from the examples."""
        self.splits()

    def question(self, example: Example) -> str:
        return render_question(example.inputs, self.input_fields)

    def splits(self) -> TaskSplits:
        """Disjoint train/validation/test splits, the same for the same seed and data."""
        src = self.source
        n = len(self.examples)
        order = list(range(n))
        random.Random(self.split.seed).shuffle(order)
        sizes = []
        for part in ("train", "validation", "test"):
            value = getattr(self.split, part)
            sizes.append(None if value is None else _size(value, n, src, f"split.{part}"))
        train, validation, test = sizes
        assert train is not None and validation is not None
        if train < 1:
            raise ConfigError("the train split is empty", source=src, field="split.train")
        if test is None:
            test = max(0, n - train - validation)
        if train + validation + test > n:
            raise ConfigError(
                f"train+validation+test = {train + validation + test} but the task has "
                f"only {n} examples",
                source=src,
                field="split",
            )
        picked = [self.examples[i] for i in order]
        return TaskSplits(
            train=tuple(picked[:train]),
            validation=tuple(picked[train : train + validation]),
            test=tuple(picked[train + validation : train + validation + test]),
        )

    def fingerprint(self) -> str:
        """A digest of the data and settings a run depends on (to refuse a stale resume)."""
        payload = json.dumps(
            {
                "examples": [[e.id, dict(e.inputs), e.target] for e in self.examples],
                "fields": self.input_fields,
                "metric": self.metric_name,
                # A regex or python metric is identified by what it computes too; built-in
                # ones by name alone, so runs stored before this keep their fingerprint.
                **(
                    {}
                    if self.metric_name in METRIC_NAMES and self.metric_name not in _CODED
                    else {"metric_code": metric_identity(self.metric)}
                ),
                "position": self.instruction_position,
                "initial": self.initial_instructions,
                "split": [
                    self.split.train,
                    self.split.validation,
                    self.split.test,
                    self.split.seed,
                ],
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- helpers -------------------------------------------------------------------------------


def _reject_unknown(raw: Mapping[str, Any], known: frozenset[str], src: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"unknown field (expected one of: {', '.join(sorted(known))})",
                source=src,
                field=f"{prefix}{key}",
            )


def _require(raw: Mapping[str, Any], key: str, kind: type, src: str, prefix: str = "") -> Any:
    if key not in raw:
        raise ConfigError("missing required field", source=src, field=f"{prefix}{key}")
    value = raw[key]
    if not isinstance(value, kind):
        raise ConfigError(f"must be a {kind.__name__}", source=src, field=f"{prefix}{key}")
    return value


def _input_fields(
    value: Any, *, target: str, source: str | None, field_name: str
) -> tuple[str, ...]:
    fields = [value] if isinstance(value, str) else value
    if not isinstance(fields, list | tuple) or not fields:
        raise ConfigError("must be a field name or a list of them", source=source, field=field_name)
    for name in fields:
        if not isinstance(name, str) or not _FIELD_RE.match(name):
            raise ConfigError(
                f"{name!r} is not a valid field name (letters, digits, underscore)",
                source=source,
                field=field_name,
            )
    if target in fields:
        raise ConfigError(
            f"{target!r} is the target; it cannot also be an input", source=source, field=field_name
        )
    return tuple(fields)


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


def _examples(
    records: Sequence[Any],
    fields: Sequence[str],
    target: str,
    *,
    source: str | None,
    field_prefix: str = "record",
) -> tuple[Example, ...]:
    out = []
    for index, record in enumerate(records):
        where = f"{field_prefix}[{index}]"
        if not isinstance(record, Mapping):
            raise ConfigError("must be a mapping of fields", source=source, field=where)
        inputs = {}
        for name in (*fields, target):
            if name not in record:
                raise ConfigError(f"missing field {name!r}", source=source, field=where)
            text = _as_text(record[name])
            if text is None:
                raise ConfigError(
                    f"field {name!r} must be text or a number", source=source, field=where
                )
            inputs[name] = text
        answer = inputs.pop(target)
        out.append(Example(id=str(index), inputs=inputs, target=answer))
    if not out:
        raise ConfigError("the data holds no examples", source=source)
    return tuple(out)


def _load_data(raw: Any, base: Path, src: str) -> tuple[tuple[str, ...], tuple[Example, ...]]:
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping with path, input, target", source=src, field="data")
    _reject_unknown(raw, _DATA_FIELDS, src, "data.")
    rel = _require(raw, "path", str, src, "data.")
    target = raw.get("target", "target")
    if not isinstance(target, str):
        raise ConfigError("must be a field name", source=src, field="data.target")
    fields = _input_fields(
        raw.get("input", "input"), target=target, source=src, field_name="data.input"
    )
    data_path = (base / rel).resolve()
    data_src = str(data_path)
    suffix = data_path.suffix.lower()
    if suffix not in {".json", ".jsonl", ".csv", ".tsv"}:
        raise ConfigError(
            f"unsupported data format {suffix or '(none)'!r}: use .json .jsonl .csv .tsv",
            source=src,
            field="data.path",
        )
    if "records" in raw and suffix != ".json":
        raise ConfigError("only applies to .json files", source=src, field="data.records")
    try:
        text = data_path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports
    except FileNotFoundError:
        raise ConfigError(f"no such file {data_src}", source=src, field="data.path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=data_src) from None
    records = _parse_records(text, suffix, raw.get("records"), data_src, src)
    return fields, _examples(records, fields, target, source=data_src)


def _parse_records(text: str, suffix: str, records_key: Any, data_src: str, src: str) -> list[Any]:
    if suffix == ".jsonl":
        records = []
        # Only "\n" ends a JSON line; str.splitlines() would also split at U+2028 inside strings.
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"line {number}: invalid JSON: {exc.msg}", source=data_src
                    ) from None
        return records
    if suffix in {".csv", ".tsv"}:
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","
        )
        try:
            return list(reader)
        except csv.Error as exc:
            raise ConfigError(f"line {reader.line_num}: {exc}", source=data_src) from None
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"line {exc.lineno}: invalid JSON: {exc.msg}", source=data_src) from None
    if records_key is not None:
        if not isinstance(records_key, str):
            raise ConfigError("must be a key name", source=src, field="data.records")
        if not isinstance(loaded, dict) or records_key not in loaded:
            raise ConfigError(
                f"the file has no top-level key {records_key!r}", source=src, field="data.records"
            )
        loaded = loaded[records_key]
    if not isinstance(loaded, list):
        raise ConfigError(
            "expected a list of records (set data.records for a list inside an object)",
            source=data_src,
        )
    return loaded


def _load_metric(raw: Any, base: Path, src: str) -> tuple[Metric, str]:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"must be a name ({' | '.join(METRIC_NAMES)}) or a mapping", source=src, field="metric"
        )
    _reject_unknown(raw, _METRIC_FIELDS, src, "metric.")
    name = _require(raw, "name", str, src, "metric.")
    try:
        metric = get_metric(
            name, pattern=raw.get("pattern"), function=raw.get("function"), base_dir=base
        )
    except ConfigError as exc:
        raise ConfigError(exc.message, source=src, field=exc.field or "metric") from None
    return metric, name


def _load_strategy(raw: Any, src: str) -> Mapping[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return {"name": raw}
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return dict(raw)
    raise ConfigError(
        "must be a strategy name, or a mapping with a name and its settings",
        source=src,
        field="strategy",
    )


def _load_split(raw: Any, src: str) -> SplitSpec:
    if not isinstance(raw, dict):
        raise ConfigError(
            "must be a mapping of train/validation/test/seed", source=src, field="split"
        )
    _reject_unknown(raw, _SPLIT_FIELDS, src, "split.")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("must be an integer", source=src, field="split.seed")
    defaults = SplitSpec()
    values: dict[str, int | float | None] = {}
    for part in ("train", "validation", "test"):
        value = raw.get(part, getattr(defaults, part))
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise ConfigError("must be a count or a fraction", source=src, field=f"split.{part}")
        values[part] = value
    train, validation = values["train"], values["validation"]
    assert train is not None and validation is not None
    return SplitSpec(train=train, validation=validation, test=values["test"], seed=seed)


def _size(value: int | float, n: int, src: str | None, field_name: str) -> int:
    if isinstance(value, float):
        if not 0 <= value <= 1:
            raise ConfigError("a fraction must be between 0 and 1", source=src, field=field_name)
        return round(value * n)
    return value
