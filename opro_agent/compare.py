"""Strategies side by side: the runs of each strategy (one per seed) on the same task, the
same splits and the same budget, summarised as means with intervals across seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opro_agent.stats import Interval, seed_spread

__all__ = ["RunSummary", "StrategySummary", "render_table", "summarise"]

# A finished run's figures: `OptimizationResult.summary()`, as the run store also keeps them
# (so runs made elsewhere, by a sweep's workers or earlier, summarise the same way).
RunSummary = Mapping[str, Any]


@dataclass(frozen=True)
class StrategySummary:
    """One strategy's runs: scores as mean and 95% t-interval across seeds; spending as the
    mean per run; the best instruction is the one best on validation (then train)."""

    strategy: str
    runs: tuple[str, ...]
    test: Interval | None
    validation: Interval | None
    calls: float
    tokens: float
    cost: float | None
    wall_seconds: float
    best_instruction: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "runs": list(self.runs),
            "test": None if self.test is None else self.test.to_dict(),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "calls": self.calls,
            "tokens": self.tokens,
            "cost": self.cost,
            "wall_seconds": round(self.wall_seconds, 3),
            "best_instruction": self.best_instruction,
        }


def _spread(values: Sequence[float | None]) -> Interval | None:
    known = [v for v in values if v is not None]
    return seed_spread(known) if known else None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarise(results: Mapping[str, Sequence[RunSummary]]) -> list[StrategySummary]:
    """One summary per strategy, in the order given; each needs at least one run."""
    summaries = []
    for strategy, runs in results.items():
        best = max(
            runs,
            key=lambda r: (r["scores"].get("validation") or 0.0, r["scores"]["train"] or 0.0),
        )
        costs = [r["cost"] for r in runs]
        summaries.append(
            StrategySummary(
                strategy=strategy,
                runs=tuple(r["run_id"] for r in runs),
                test=_spread([r["scores"].get("test") for r in runs]),
                validation=_spread([r["scores"].get("validation") for r in runs]),
                calls=_mean([sum(r["calls"].values()) for r in runs]),
                tokens=_mean([sum(r["tokens"].values()) for r in runs]),
                cost=None if None in costs else _mean([c or 0.0 for c in costs]),
                wall_seconds=_mean([r["wall_seconds"] for r in runs]),
                best_instruction=best["best_instruction"],
            )
        )
    return summaries


def _fmt(value: Interval | None) -> str:
    if value is None:
        return "-"
    if value.n == 1:
        return f"{value.mean:.3f}"
    return f"{value.mean:.3f} [{value.low:.3f}, {value.high:.3f}]"


def render_table(summaries: Sequence[StrategySummary]) -> str:
    """A plain-text table, then each strategy's best instruction."""
    header = (
        f"{'STRATEGY':<10} {'TEST (mean [95% CI])':<26} {'VALIDATION':<26} "
        f"{'CALLS':>8} {'TOKENS':>9} {'COST':>8} {'SECONDS':>8}"
    )
    lines = [header]
    for s in summaries:
        cost = "-" if s.cost is None else f"{s.cost:.4f}"
        lines.append(
            f"{s.strategy:<10} {_fmt(s.test):<26} {_fmt(s.validation):<26} "
            f"{s.calls:>8.0f} {s.tokens:>9.0f} {cost:>8} {s.wall_seconds:>8.1f}"
        )
    seeds = max((len(s.runs) for s in summaries), default=0)
    lines.append(f"(means over {seeds} seed(s) per strategy; calls, tokens, cost and time per run)")
    lines += [f"best {s.strategy}: {s.best_instruction!r}" for s in summaries]
    return "\n".join(lines)
