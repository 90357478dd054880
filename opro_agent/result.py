"""What a run returns: the winner, its scores, the baselines and the whole history."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_core.prompts import ChatPromptTemplate

from opro_agent.prompts import Demonstrations, InstructionPosition, scorer_prompt
from opro_agent.stats import Interval, PairedTest

__all__ = ["HistoryEntry", "OptimizationResult"]


@dataclass(frozen=True)
class HistoryEntry:
    step: int
    origin: str  # "initial" or "optimizer"
    instruction: str
    train: float | None  # on the training examples it was scored on (all, unless rejected early)
    validation: float | None
    test: float | None
    kind: str = "proposal"  # the kind of call that made it: initial, proposal, forward, ...
    parent: str | None = None  # the instruction it was derived from


@dataclass(frozen=True)
class OptimizationResult:
    run_id: str
    task: str
    strategy: str
    best_instruction: str
    scores: Mapping[str, float | None]  # the winner's train / validation / test scores
    baselines: Mapping[str, float]  # initial instruction -> test score
    history: tuple[HistoryEntry, ...]
    calls: Mapping[str, int]  # paid calls: optimizer, scorer
    tokens: Mapping[str, int]  # prompt, completion
    cost: float | None  # USD, when prices are known
    cache_hits: int
    saved_by_early_rejection: int  # scorer calls not made: racing, or ProTeGi's bandit
    wall_seconds: float
    stop_reason: str  # steps | patience | target_score | budget
    instruction_position: InstructionPosition
    input_fields: tuple[str, ...]
    # 95% intervals of the winner's scores (Wilson for 0/1 scores, bootstrap otherwise)
    intervals: Mapping[str, Interval | None] = field(default_factory=dict)
    baseline_intervals: Mapping[str, Interval] = field(default_factory=dict)
    # The winner against the best initial instruction on the same test examples.
    test_comparison: PairedTest | None = None
    kept_initial: bool = False  # the winner is an initial instruction
    selection_reason: str | None = None  # why the initial instruction was kept, if it was

    @property
    def test_gain(self) -> float | None:
        """Winner's test score minus the best initial instruction's."""
        test = self.scores.get("test")
        if test is None or not self.baselines:
            return None
        return test - max(self.baselines.values())

    def to_prompt_template(
        self, demonstrations: Demonstrations | None = None
    ) -> ChatPromptTemplate:
        """The exact prompt the scorer saw for the winner; its variables are the input fields.

        A run that scored with demonstrations (`OproOptimizer(demonstrations=...)`) needs the
        same ones here to reproduce its prompts.
        """
        return scorer_prompt(
            self.best_instruction, self.instruction_position, self.input_fields, demonstrations
        )

    def summary(self) -> dict[str, Any]:
        """The JSON summary the CLI prints."""
        return {
            "run_id": self.run_id,
            "task": self.task,
            "strategy": self.strategy,
            "best_instruction": self.best_instruction,
            "scores": dict(self.scores),
            "baselines": dict(self.baselines),
            "test_gain": self.test_gain,
            "calls": dict(self.calls),
            "tokens": dict(self.tokens),
            "cost": self.cost,
            "cache_hits": self.cache_hits,
            "saved_by_early_rejection": self.saved_by_early_rejection,
            "wall_seconds": round(self.wall_seconds, 3),
            "stop_reason": self.stop_reason,
            "intervals": {
                split: None if value is None else value.to_dict()
                for split, value in self.intervals.items()
            },
            "baseline_intervals": {k: v.to_dict() for k, v in self.baseline_intervals.items()},
            "test_comparison": None
            if self.test_comparison is None
            else {**self.test_comparison.to_dict(), "verdict": self.test_comparison.verdict()},
            "selection": {"kept_initial": self.kept_initial, "reason": self.selection_reason},
        }
