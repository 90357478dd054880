"""Spending: budgets on calls, tokens and cost, the meter that enforces them, and the
observer that hears about every call (for progress displays).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from opro_agent.errors import BudgetExceededError, ConfigError
from opro_agent.pricing import Price

__all__ = ["Budget", "Meter", "RunObserver", "Spend", "spend_from_usage"]


@dataclass(frozen=True)
class Budget:
    """Limits for one run (all its sessions together); None means no limit."""

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None  # USD

    def __post_init__(self) -> None:
        for name in ("max_calls", "max_tokens", "max_cost"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError("must be positive", field=f"--{name.replace('_', '-')}")


@dataclass
class Spend:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    cache_hits: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def spend_from_usage(usage: Mapping[str, int], prices: Mapping[str, Price]) -> Spend:
    """What a run has spent, from its stored usage (`RunStore.usage`) and per-role prices."""
    cost = 0.0
    for role in ("optimizer", "scorer"):
        price = prices.get(role)
        if price is not None:
            cost += price.cost(usage[f"{role}_prompt_tokens"], usage[f"{role}_completion_tokens"])
    return Spend(
        calls=usage["optimizer_calls"] + usage["scorer_calls"],
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        cost=cost,
    )


class RunObserver(Protocol):
    """Hears about a run as it goes; every method must be cheap."""

    def on_plan(self, calls: int) -> None:
        """The run expects about this many more calls (for an ETA)."""

    def on_call(self, role: str, *, cached: bool, tokens: int, cost: float) -> None:
        """One call finished (paid, or served by the cache)."""

    def on_step(self, step: int, best_train: float) -> None:
        """A step finished."""


class Meter:
    """Counts what a run spends and refuses a call the budget cannot pay for.

    Calls in flight count against `max_calls` when they start, so concurrency cannot
    overshoot it; tokens and cost are known only when a call returns.
    """

    def __init__(
        self,
        budget: Budget | None = None,
        *,
        spent: Spend | None = None,
        observer: RunObserver | None = None,
    ) -> None:
        self.budget = budget or Budget()
        self.spent = spent or Spend()
        self.observer = observer
        self._in_flight = 0

    def begin(self) -> None:
        """Reserve one paid call; raises BudgetExceededError when the budget is spent."""
        reason = self._exhausted(self.spent.calls + self._in_flight)
        if reason:
            raise BudgetExceededError(reason)
        self._in_flight += 1

    def end(
        self, role: str, prompt_tokens: int, completion_tokens: int, cost: float, *, paid: bool
    ) -> None:
        """A call finished; `paid` False for a cache hit (and then no begin() was made)."""
        if paid:
            self._in_flight -= 1
            self.spent.calls += 1
            self.spent.prompt_tokens += prompt_tokens
            self.spent.completion_tokens += completion_tokens
            self.spent.cost += cost
        else:
            self.spent.cache_hits += 1
        if self.observer is not None:
            self.observer.on_call(
                role, cached=not paid, tokens=prompt_tokens + completion_tokens, cost=cost
            )

    def abort(self) -> None:
        """A reserved call raised before it could be counted."""
        self._in_flight -= 1

    def affordable(self, calls: int) -> bool:
        """Whether `calls` more calls fit the budget, judging tokens and cost by the average
        call so far."""
        scale = (self.spent.calls + calls) / max(self.spent.calls, 1)
        return not self._exhausted(
            self.spent.calls + calls,
            round(self.spent.tokens * scale),
            self.spent.cost * scale,
            strict=True,
        )

    def _exhausted(
        self,
        calls: int,
        tokens: int | None = None,
        cost: float | None = None,
        *,
        strict: bool = False,
    ) -> str | None:
        tokens = self.spent.tokens if tokens is None else tokens
        cost = self.spent.cost if cost is None else cost
        b = self.budget

        def over(value: float, limit: float | None) -> bool:
            return limit is not None and (value > limit if strict else value >= limit)

        if over(calls, b.max_calls):
            return f"the call budget ({b.max_calls}) is spent"
        if over(tokens, b.max_tokens):
            return f"the token budget ({b.max_tokens}) is spent"
        if over(cost, b.max_cost):
            return f"the cost budget (${b.max_cost}) is spent"
        return None
