"""Everything a run report shows, computed from the run store: no plotting here.

`RunReport.from_store(store, run_id)` works for any stored run, finished or not, old or new:
scores, intervals and paired tests are recomputed from the stored per-example evaluations
with `opro_agent.stats`, so a report does not depend on what the run's summary happened to
hold when it was written.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opro_agent.candidates import instruction_key
from opro_agent.errors import ConfigError
from opro_agent.pricing import PriceTable
from opro_agent.reports.records import (
    EvaluationRow,
    OptimizerCallRow,
    RunRecords,
    read_records,
)
from opro_agent.stats import Interval, PairedTest, interval, paired_test
from opro_agent.store import RunStore
from opro_agent.task import Example, Task

__all__ = [
    "PHASES",
    "ROLES",
    "ExampleChange",
    "InstructionStats",
    "PhaseTime",
    "RunReport",
    "StepBest",
    "TestComparison",
    "Usage",
]

ROLES = ("optimizer", "scorer")
# initial: the starting instructions scored on train; search: the strategy's steps (proposals
# and their train scores); validation: the finalists compared; test: winner and baselines.
PHASES = ("initial", "search", "validation", "test")


@dataclass(frozen=True)
class InstructionStats:
    """One instruction of the run with its scores on each split it was scored on."""

    key: str
    text: str
    step: int
    origin: str  # initial | optimizer
    kind: str  # initial, proposal, forward, reverse, resample, ...
    parent: str | None  # the key of the instruction it was derived from
    train: Interval | None
    validation: Interval | None
    test: Interval | None
    fully_scored: bool  # scored on the whole train split (not stopped early by racing)

    @property
    def initial(self) -> bool:
        return self.origin == "initial"


@dataclass(frozen=True)
class StepBest:
    """The best train score among fully scored instructions found up to `step`."""

    step: int
    score: float
    instruction: str


@dataclass(frozen=True)
class ExampleChange:
    """A test example on which winner and baseline scored differently."""

    example_id: str
    question: str | None  # known when the task file is at hand
    target: str | None
    baseline_answer: str | None
    winner_answer: str | None
    baseline_score: float
    winner_score: float


@dataclass(frozen=True)
class TestComparison:
    """The winner against one starting instruction on the test split, paired by example."""

    baseline: str
    winner: str
    baseline_test: Interval
    winner_test: Interval
    paired: PairedTest
    verdict: str
    fixed: tuple[ExampleChange, ...]
    broken: tuple[ExampleChange, ...]

    @property
    def same_instruction(self) -> bool:
        return self.baseline == self.winner


@dataclass(frozen=True)
class Usage:
    """Calls, tokens, cost and time of one role in one phase.

    `calls` were paid for (failed attempts included), `cached` answered from the response
    cache. `cost` is at the built-in list prices (None when the model has none there).
    `call_seconds` adds up the latency of each scorer call; calls overlap, so it exceeds the
    wall-clock time. Optimizer calls record no latency (None).
    """

    role: str
    phase: str
    calls: int
    cached: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    call_seconds: float | None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class PhaseTime:
    """Wall-clock time of a phase: from the end of the phase before it (or the first
    session's start) to the last call of the phase that was recorded."""

    phase: str
    seconds: float


@dataclass(frozen=True)
class RunReport:
    run_id: str
    task: str
    status: str
    created_at: float
    strategy: str
    strategy_settings: Mapping[str, Any]
    settings: Mapping[str, Any]
    models: Mapping[str, str]  # role -> model spec, when the run was made by the CLI
    stop_reason: str | None
    winner: str | None  # the best instruction, once the run has finished
    instructions: tuple[InstructionStats, ...]  # in the order found
    best_so_far: tuple[StepBest, ...]
    finalists: tuple[InstructionStats, ...]  # scored on validation, best first
    comparisons: tuple[TestComparison, ...]  # winner vs each baseline, best baseline first
    usage: tuple[Usage, ...]  # by role and phase (only the pairs that made calls)
    phase_times: tuple[PhaseTime, ...]
    session_seconds: float  # the run's sessions added up (ended ones)
    train_size: int  # the most train examples any instruction was scored on
    selection: Mapping[str, Any] | None  # how the winner was kept, from a newer summary
    summary: Mapping[str, Any] | None
    task_found: bool  # whether the task file was at hand, for questions and answers

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_store(cls, store: RunStore, run_id: str, *, task: Task | None = None) -> RunReport:
        """The report of run `run_id` (a unique prefix will do) in `store`.

        `task` gives fixed/broken test examples their questions and answers; without it, the
        run's task file is read when it still exists and matches the run's data.

        Raises:
            RunStoreError: no such run, or the store cannot be read.
        """
        run = store.get_run(run_id)
        records = read_records(store, run.id)
        config = run.config
        summary = run.summary
        if task is None:
            task = _task_from_config(config)
        examples = {e.id: e for e in task.examples} if task is not None else {}

        scores = _scores_by_split(records.evaluations)
        train_size = max((len(s.get("train", {})) for s in scores.values()), default=0)
        instructions = tuple(
            InstructionStats(
                key=row.key,
                text=row.text,
                step=row.step,
                origin=row.origin,
                kind=row.kind,
                parent=row.parent,
                train=_interval(scores[row.key].get("train")),
                validation=_interval(scores[row.key].get("validation")),
                test=_interval(scores[row.key].get("test")),
                fully_scored=len(scores[row.key].get("train", {})) == train_size > 0,
            )
            for row in records.instructions
        )
        winner = summary.get("best_instruction") if summary else None
        strategy = config.get("strategy")
        strategy_name = strategy.get("name", "-") if isinstance(strategy, Mapping) else "-"
        models = {
            role: str(identity.get("spec"))
            for role, identity in (config.get("models") or {}).items()
            if isinstance(identity, Mapping) and identity.get("spec")
        }
        finalists = sorted(
            (i for i in instructions if i.validation is not None),
            key=lambda i: (-_mean(i.validation), i.text != winner),
        )
        return cls(
            run_id=run.id,
            task=run.task,
            status=run.status,
            created_at=run.created_at,
            strategy=strategy_name,
            strategy_settings=(
                {k: v for k, v in strategy.items() if k != "name"}
                if isinstance(strategy, Mapping)
                else {}
            ),
            settings=config.get("settings") or {},
            models=models,
            stop_reason=summary.get("stop_reason") if summary else None,
            winner=winner,
            instructions=instructions,
            best_so_far=_best_so_far(instructions),
            finalists=tuple(finalists),
            comparisons=_comparisons(winner, instructions, records.evaluations, examples),
            usage=_usage(records, instructions, models),
            phase_times=_phase_times(records, instructions),
            session_seconds=sum(
                s.ended_at - s.started_at for s in records.sessions if s.ended_at is not None
            ),
            train_size=train_size,
            selection=summary.get("selection") if summary else None,
            summary=summary,
            task_found=task is not None,
        )

    # -- views --------------------------------------------------------------------------------

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({i.step for i in self.instructions}))

    @property
    def baselines(self) -> tuple[InstructionStats, ...]:
        return tuple(i for i in self.instructions if i.initial)

    @property
    def has_lineage(self) -> bool:
        return any(i.parent is not None for i in self.instructions)

    def instruction(self, key: str) -> InstructionStats | None:
        return next((i for i in self.instructions if i.key == key), None)

    def winner_stats(self) -> InstructionStats | None:
        if self.winner is None:
            return None
        return self.instruction(instruction_key(self.winner))

    def top(self, n: int = 10) -> list[InstructionStats]:
        """The `n` best instructions: finalists by validation score, then the rest by train."""
        ranked = sorted(
            self.instructions,
            key=lambda i: (
                i.text != self.winner,
                -_mean(i.validation),
                not i.fully_scored,
                -_mean(i.train),
                i.step,
            ),
        )
        return ranked[:n]

    def totals(self) -> Usage:
        """All roles and phases together."""
        costs = [u.cost for u in self.usage]
        seconds = [u.call_seconds for u in self.usage if u.call_seconds is not None]
        return Usage(
            role="all",
            phase="all",
            calls=sum(u.calls for u in self.usage),
            cached=sum(u.cached for u in self.usage),
            failed=sum(u.failed for u in self.usage),
            prompt_tokens=sum(u.prompt_tokens for u in self.usage),
            completion_tokens=sum(u.completion_tokens for u in self.usage),
            cost=None if None in costs else sum(c or 0.0 for c in costs),
            call_seconds=sum(seconds) if seconds else None,
        )

    def headline(self) -> TestComparison | None:
        """The winner against the best starting instruction on test (what `test_gain` uses)."""
        return self.comparisons[0] if self.comparisons else None

    def verdict(self) -> str | None:
        """The run's own verdict when its summary has one, else the recomputed one."""
        stored = (self.summary or {}).get("test_comparison")
        if isinstance(stored, Mapping) and isinstance(stored.get("verdict"), str):
            return str(stored["verdict"])
        head = self.headline()
        return None if head is None else head.verdict


# -- helpers ----------------------------------------------------------------------------------


def _mean(value: Interval | None) -> float:
    return -1.0 if value is None else value.mean


def _interval(scores: Mapping[str, float] | None) -> Interval | None:
    if not scores:
        return None
    return interval([scores[k] for k in sorted(scores)])


def _scores_by_split(
    evaluations: Iterable[EvaluationRow],
) -> defaultdict[str, dict[str, dict[str, float]]]:
    """instruction key -> split -> example id -> score (failed calls count as stored: 0)."""
    scores: defaultdict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for row in evaluations:
        if math.isfinite(row.score):
            scores[row.instruction_key].setdefault(row.split, {})[row.example_id] = row.score
    return scores


def _best_so_far(instructions: Sequence[InstructionStats]) -> tuple[StepBest, ...]:
    curve: list[StepBest] = []
    best: InstructionStats | None = None
    for step in sorted({i.step for i in instructions}):
        for candidate in instructions:
            if candidate.step != step or not candidate.fully_scored or candidate.train is None:
                continue
            if best is None or best.train is None or candidate.train.mean > best.train.mean:
                best = candidate
        if best is not None and best.train is not None:
            curve.append(StepBest(step, best.train.mean, best.text))
    return tuple(curve)


def _task_from_config(config: Mapping[str, Any]) -> Task | None:
    """The run's task, when its file is still there and holds the same data."""
    path = config.get("task_path")
    if not isinstance(path, str) or not Path(path).is_file():
        return None
    try:
        task = Task.from_yaml(path)
    except (ConfigError, OSError):
        return None
    return task if task.fingerprint() == config.get("task_fingerprint") else None


def _comparisons(
    winner: str | None,
    instructions: Sequence[InstructionStats],
    evaluations: Sequence[EvaluationRow],
    examples: Mapping[str, Example],
) -> tuple[TestComparison, ...]:
    if winner is None:
        return ()
    test: defaultdict[str, dict[str, EvaluationRow]] = defaultdict(dict)
    for row in evaluations:
        if row.split == "test":
            test[row.instruction_key][row.example_id] = row
    winner_rows = test.get(instruction_key(winner))
    if not winner_rows:
        return ()
    out = []
    for base in instructions:
        base_rows = test.get(base.key)
        if not base.initial or not base_rows or not (base_rows.keys() & winner_rows.keys()):
            continue
        paired = paired_test(
            {k: r.score for k, r in winner_rows.items()},
            {k: r.score for k, r in base_rows.items()},
        )

        shared = sorted(base_rows.keys() & winner_rows.keys())
        out.append(
            TestComparison(
                baseline=base.text,
                winner=winner,
                baseline_test=interval([base_rows[k].score for k in shared]),
                winner_test=interval([winner_rows[k].score for k in shared]),
                paired=paired,
                verdict=paired.verdict(),
                fixed=tuple(
                    _change(i, base_rows, winner_rows, examples) for i in _by_id(paired.fixed)
                ),
                broken=tuple(
                    _change(i, base_rows, winner_rows, examples) for i in _by_id(paired.broken)
                ),
            )
        )
    # Best baseline first: the gain that `test_gain` reports is against it.
    out.sort(key=lambda c: -c.baseline_test.mean)
    return tuple(out)


def _change(
    example_id: str,
    base_rows: Mapping[str, EvaluationRow],
    winner_rows: Mapping[str, EvaluationRow],
    examples: Mapping[str, Example],
) -> ExampleChange:
    example = examples.get(example_id)
    return ExampleChange(
        example_id=example_id,
        question=_question(example),
        target=None if example is None else example.target,
        baseline_answer=base_rows[example_id].prediction,
        winner_answer=winner_rows[example_id].prediction,
        baseline_score=base_rows[example_id].score,
        winner_score=winner_rows[example_id].score,
    )


def _by_id(ids: Iterable[str]) -> list[str]:
    """Example ids in natural order: "2" before "10"."""
    return sorted(ids, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))


def _question(example: Example | None) -> str | None:
    if example is None:
        return None
    if len(example.inputs) == 1:
        return next(iter(example.inputs.values()))
    return "\n".join(f"{name}: {value}" for name, value in example.inputs.items())


def _phase_of(split: str, step: int | None) -> str:
    if split == "train":
        return "initial" if step == 0 else "search"
    return split if split in PHASES else "search"


def _usage(
    records: RunRecords, instructions: Sequence[InstructionStats], models: Mapping[str, str]
) -> tuple[Usage, ...]:
    step_of = {i.key: i.step for i in instructions}
    table = PriceTable.default()
    prices = {role: table.price(spec) for role, spec in models.items()}
    # (role, phase) -> [calls, cached, failed, prompt, completion, seconds]
    sums: dict[tuple[str, str], list[float]] = {}

    def add(role: str, phase: str, cached: bool, failed: bool, pt: int, ct: int, s: float) -> None:
        row = sums.setdefault((role, phase), [0, 0, 0, 0, 0, 0.0])
        paid = not cached
        row[0] += paid
        row[1] += cached
        row[2] += failed
        row[3] += pt * paid
        row[4] += ct * paid
        row[5] += s * paid

    for call in records.optimizer_calls:
        phase = "initial" if call.step <= 0 else "search"
        add("optimizer", phase, call.cached, call.error is not None, *_tokens(call), 0.0)
    for ev in records.evaluations:
        phase = _phase_of(ev.split, step_of.get(ev.instruction_key))
        add("scorer", phase, ev.cached, ev.error is not None, *_tokens(ev), ev.latency)
    out = []
    for role in ROLES:
        for phase in PHASES:
            row = sums.get((role, phase))
            if row is None:
                continue
            price = prices.get(role)
            prompt, completion = int(row[3]), int(row[4])
            out.append(
                Usage(
                    role=role,
                    phase=phase,
                    calls=int(row[0]),
                    cached=int(row[1]),
                    failed=int(row[2]),
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    cost=None if price is None else price.cost(prompt, completion),
                    call_seconds=row[5] if role == "scorer" else None,
                )
            )
    return tuple(out)


def _tokens(row: EvaluationRow | OptimizerCallRow) -> tuple[int, int]:
    return int(row.prompt_tokens), int(row.completion_tokens)


def _phase_times(
    records: RunRecords, instructions: Sequence[InstructionStats]
) -> tuple[PhaseTime, ...]:
    step_of = {i.key: i.step for i in instructions}
    last: dict[str, float] = {}
    for call in records.optimizer_calls:
        phase = "initial" if call.step <= 0 else "search"
        last[phase] = max(last.get(phase, 0.0), call.created_at)
    for ev in records.evaluations:
        phase = _phase_of(ev.split, step_of.get(ev.instruction_key))
        last[phase] = max(last.get(phase, 0.0), ev.created_at)
    if not last:
        return ()
    starts = [s.started_at for s in records.sessions]
    previous = min(starts) if starts else min(last.values())
    out = []
    for phase in PHASES:
        if phase not in last:
            continue
        out.append(PhaseTime(phase, max(0.0, last[phase] - previous)))
        previous = last[phase]
    return tuple(out)
