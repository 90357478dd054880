"""What a run is told: search settings, and the resources it may use besides its models."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from opro_agent.budget import Budget, RunObserver
from opro_agent.cache import ResponseCache
from opro_agent.errors import ConfigError
from opro_agent.llm_calls import RateLimits, RetryPolicy
from opro_agent.pricing import Price

__all__ = ["ExemplarSelection", "OproSettings", "RunResources"]

ExemplarSelection = Literal["random", "constant", "most_wrong"]
# Settings that cannot change a run's result; a resumed run may use other values.
RESULT_NEUTRAL = frozenset({"concurrency", "retry"})


@dataclass(frozen=True)
class OproSettings:
    """How the search runs. Defaults follow the OPRO paper's ablations."""

    steps: int = 10
    candidates_per_step: int = 8
    max_history: int = 20
    score_buckets: int = 100
    exemplars: int = 3
    exemplar_selection: ExemplarSelection = "random"
    max_instruction_chars: int = 500
    patience: int | None = None  # stop after this many steps without a better train score
    target_score: float | None = None  # stop once the best train score reaches this
    validate_top: int = 3  # best-on-train instructions compared on validation
    # Racing (APE's multi-stage evaluation, successive halving): new candidates are scored
    # on `first_stage` training examples, then on twice as many, ...; at each stage the
    # better half go on, and so does any candidate at or above the best full-train score.
    # Only fully scored candidates can win.
    early_rejection: bool = False  # see benchmarks/README.md: it saved calls, not accuracy
    first_stage: int = 5
    concurrency: int = 8
    seed: int = 0
    meta_prompt: str = "chat"
    failure_threshold: float = 0.2
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for name in ("steps", "exemplars", "max_history", "max_instruction_chars"):
            if getattr(self, name) < 0:
                raise ConfigError("must not be negative", field=name)
        for name in (
            "candidates_per_step",
            "validate_top",
            "concurrency",
            "score_buckets",
            "first_stage",
        ):
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

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> OproSettings:
        values = dict(raw)
        values["retry"] = RetryPolicy(**values.get("retry", {}))
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
    budget: Budget | None = None
    rate_limits: RateLimits | None = None
    observer: RunObserver | None = None
    prices: Mapping[str, Price] = field(default_factory=dict)
    identities: Mapping[str, str] = field(default_factory=dict)
    rate_limit_errors: tuple[type[BaseException], ...] = ()
