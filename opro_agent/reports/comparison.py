"""Several stored runs side by side: one row per run, computed from the store (no plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opro_agent.reports.data import RunReport, StepBest
from opro_agent.stats import Interval
from opro_agent.store import RunStore

__all__ = ["RunRow", "RunsComparison"]


@dataclass(frozen=True)
class RunRow:
    """One run: its winner's scores (with intervals), the gain over its best baseline on
    test (paired), what it spent, and its best-so-far train curve."""

    run_id: str
    task: str
    strategy: str
    seed: Any
    status: str
    stop_reason: str | None
    steps: int  # the last step reached
    best_instruction: str | None
    train: Interval | None
    validation: Interval | None
    test: Interval | None
    baseline_test: float | None  # the best starting instruction's test score
    gain: float | None
    gain_low: float | None
    gain_high: float | None
    p_value: float | None
    calls: int
    tokens: int
    cost: float | None
    seconds: float
    curve: tuple[StepBest, ...]

    @classmethod
    def from_report(cls, report: RunReport) -> RunRow:
        winner = report.winner_stats()
        head = report.headline()
        totals = report.totals()
        return cls(
            run_id=report.run_id,
            task=report.task,
            strategy=report.strategy,
            seed=report.settings.get("seed"),
            status=report.status,
            stop_reason=report.stop_reason,
            steps=max(report.steps, default=0),
            best_instruction=report.winner,
            train=None if winner is None else winner.train,
            validation=None if winner is None else winner.validation,
            test=None if head is None else head.winner_test,
            baseline_test=None if head is None else head.baseline_test.mean,
            gain=None if head is None else head.paired.gain,
            gain_low=None if head is None else head.paired.low,
            gain_high=None if head is None else head.paired.high,
            p_value=None if head is None else head.paired.p_value,
            calls=totals.calls,
            tokens=totals.tokens,
            cost=totals.cost,
            seconds=report.session_seconds,
            curve=report.best_so_far,
        )

    def to_dict(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "run_id": self.run_id,
            "task": self.task,
            "strategy": self.strategy,
            "seed": self.seed,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "steps": self.steps,
            "best_instruction": self.best_instruction,
            "train": None if self.train is None else self.train.to_dict(),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "test": None if self.test is None else self.test.to_dict(),
            "baseline_test": rounded(self.baseline_test),
            "test_gain": (
                None
                if self.gain is None
                else {
                    "gain": rounded(self.gain),
                    "low": rounded(self.gain_low),
                    "high": rounded(self.gain_high),
                    "p_value": None if self.p_value is None else float(f"{self.p_value:.4g}"),
                }
            ),
            "calls": self.calls,
            "tokens": self.tokens,
            "cost": None if self.cost is None else round(self.cost, 6),
            "seconds": round(self.seconds, 3),
            "best_so_far": [{"step": p.step, "score": round(p.score, 4)} for p in self.curve],
        }


@dataclass(frozen=True)
class RunsComparison:
    rows: tuple[RunRow, ...]

    @classmethod
    def from_store(cls, store: RunStore, run_ids: Sequence[str]) -> RunsComparison:
        """One row per run id (unique prefixes will do), in the order given.

        Raises:
            RunStoreError: a run that does not exist, or a store that cannot be read.
        """
        return cls(tuple(RunRow.from_report(RunReport.from_store(store, r)) for r in run_ids))

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.task for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "runs": [r.to_dict() for r in self.rows]}

    def table(self) -> str:
        """A plain-text table, one line per run, then each run's best instruction."""
        header = (
            f"{'RUN':<24} {'STRATEGY':<9} {'SEED':>4} {'VALID':>6} {'TEST (95% CI)':<22} "
            f"{'BASE':>6} {'GAIN':>7} {'P':>6} {'CALLS':>6} {'TOKENS':>8} {'SECONDS':>8}"
        )
        lines = [header]
        for r in self.rows:
            test = (
                "-"
                if r.test is None
                else f"{r.test.mean:.3f} [{r.test.low:.3f}, {r.test.high:.3f}]"
            )
            lines.append(
                f"{r.run_id:<24} {r.strategy:<9} {_text(r.seed):>4} "
                f"{_text(None if r.validation is None else r.validation.mean):>6} {test:<22} "
                f"{_text(r.baseline_test):>6} {_text(r.gain, '+.3f'):>7} "
                f"{_text(r.p_value, '.2g'):>6} {r.calls:>6} {r.tokens:>8} {r.seconds:>8.1f}"
            )
        lines += [f"best {r.run_id}: {r.best_instruction!r}" for r in self.rows]
        return "\n".join(lines)


def _text(value: object, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)
