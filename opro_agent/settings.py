"""What a run is told: the search settings every strategy shares (plain data), and the live
resources it may use besides its models. Each strategy's own settings live on the strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opro_agent.budget import Budget, RunObserver
from opro_agent.cache import ResponseCache
from opro_agent.errors import ConfigError
from opro_agent.llm_calls import RateLimits, RetryPolicy
from opro_agent.pricing import Price

__all__ = ["RESULT_NEUTRAL", "RunResources", "SearchSettings"]

# Settings that cannot change what a run computes; a resumed run may use other values
# (a larger budget lets a run that stopped on its budget go on).
RESULT_NEUTRAL = frozenset({"concurrency", "retry", "budget"})


@dataclass(frozen=True)
class SearchSettings:
    """How the search runs, whatever the strategy."""

    steps: int = 10
    patience: int | None = None  # stop after this many steps without a better train score
    target_score: float | None = None  # stop once the best train score reaches this
    validate_top: int = 3  # best-on-train instructions compared on validation
    # Do no harm: a new instruction wins only if it beats the best initial instruction on
    # validation (where the initial ones are always scored beside the finalists).
    keep_initial_unless_better: bool = True
    max_instruction_chars: int = 500  # longer candidates are skipped (as OPRO does)
    concurrency: int = 8
    seed: int = 0
    failure_threshold: float = 0.2
    budget: Budget = field(default_factory=Budget)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for name in ("steps", "max_instruction_chars"):
            if getattr(self, name) < 0:
                raise ConfigError("must not be negative", field=name)
        for name in ("validate_top", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)
        if self.patience is not None and self.patience < 1:
            raise ConfigError("must be at least 1", field="patience")
        if self.target_score is not None and not 0 <= self.target_score <= 1:
            raise ConfigError("must be between 0 and 1", field="target_score")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_affecting(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in RESULT_NEUTRAL}

    def replace(self, **changes: Any) -> SearchSettings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SearchSettings:
        values = dict(raw)
        values["retry"] = RetryPolicy(**values.get("retry", {}))
        values["budget"] = Budget(**values.get("budget", {}))
        return cls(**values)


@dataclass
class RunResources:
    """What a run may use besides its models; everything is optional.

    `identities` (role -> text) name what the answers of each role's model depend on, for
    cache keys; by default it is derived from serializable LangChain models. `prices` (role ->
    Price) turn token counts into cost. `rate_limit_errors` are the exception types that mean
    HTTP 429, retried patiently instead of counted as failures.
    """

    cache: ResponseCache | None = None
    rate_limits: RateLimits | None = None
    observer: RunObserver | None = None
    prices: Mapping[str, Price] = field(default_factory=dict)
    identities: Mapping[str, str] = field(default_factory=dict)
    rate_limit_errors: tuple[type[BaseException], ...] = ()
