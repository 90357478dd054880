"""The seam between the search and a strategy.

The search (`opro_agent.search`) owns everything every strategy shares: the run store,
budget, cache, replay on resume, stop rules, the final validation and test. A strategy only
decides what to propose and which proposals deserve full scoring, through the small
`SearchContext` the search hands it each step. Strategies are frozen dataclasses whose
fields are their settings; they keep no state of their own between steps (everything they
need is in the scored pool, which a resumed run rebuilds from the store), so a resumed run
reaches the same result.
"""

from __future__ import annotations

import dataclasses
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from opro_agent.candidates import dedupe_key
from opro_agent.prompts import Message
from opro_agent.scorer import InstructionScore
from opro_agent.settings import SearchSettings
from opro_agent.task import Example, Task, TaskSplits

__all__ = [
    "Candidate",
    "Pool",
    "Proposal",
    "Rejected",
    "SearchContext",
    "StepCost",
    "Strategy",
]


@dataclass(frozen=True)
class Proposal:
    """A new instruction a strategy wants scored."""

    text: str
    kind: str  # the kind of optimizer call that made it (proposal, forward, resample, ...)
    parent: str | None = None  # the instruction it was derived from, if any


@dataclass(frozen=True)
class Rejected:
    """An optimizer output the strategy could not use, and why (logged by the search)."""

    reason: str
    output: str


@dataclass(frozen=True)
class Candidate:
    """An instruction in the scored pool."""

    text: str
    step: int
    order: int  # position in the pool: ties are broken by who came first
    kind: str
    parent: str | None
    scored: InstructionScore  # its training results, each with prediction and score
    full: bool  # scored on every training example (not rejected early)
    fitness: float  # what the strategy ranks by (by default the train accuracy)

    @property
    def train(self) -> float:
        return self.scored.score


class Pool:
    """Every scored instruction of a run, in the order they were scored."""

    def __init__(self) -> None:
        self._by_key: dict[str, Candidate] = {}

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and dedupe_key(text) in self._by_key

    def add(self, candidate: Candidate) -> None:
        self._by_key[dedupe_key(candidate.text)] = candidate

    def ranked(self) -> list[Candidate]:
        """Fully scored candidates, fittest first (earlier first on ties)."""
        return sorted((c for c in self if c.full), key=lambda c: (-c.fitness, c.order))

    def best_train(self) -> float:
        return max((c.train for c in self if c.full), default=0.0)

    def best_fitness(self) -> float:
        return max((c.fitness for c in self if c.full), default=-math.inf)


@dataclass(frozen=True)
class StepCost:
    """Upper bound of the calls one step makes (no early-rejection or cache savings)."""

    optimizer_calls: int
    scorer_calls: int

    @property
    def total(self) -> int:
        return self.optimizer_calls + self.scorer_calls


class SearchContext(Protocol):
    """What a strategy may use during a step; the search implements it."""

    @property
    def task(self) -> Task: ...

    @property
    def splits(self) -> TaskSplits: ...

    @property
    def settings(self) -> SearchSettings: ...

    @property
    def pool(self) -> Pool: ...

    def rng(self, *purpose: object) -> random.Random:
        """A generator seeded by the run's seed and `purpose` (e.g. the step): the same in a
        resumed run."""

    async def ask(
        self, messages: Sequence[Message], *, step: int, kind: str, idx: int
    ) -> str | None:
        """One optimizer-role call, identified by (step, kind, idx): replayed from the store
        when an earlier session made it, otherwise paid for (budgeted, cached, retried) and
        stored. None when it failed after retries (logged and stored)."""

    async def score(
        self, instruction: str, examples: Sequence[Example], *, step: int
    ) -> InstructionScore:
        """Score an instruction on any training examples, with each prediction and score
        (answers are stored and never paid twice). Nothing is added to the pool."""

    async def evaluate(
        self,
        proposals: Sequence[Awaitable[Proposal | Rejected | None]],
        *,
        step: int,
        first_stage: int | None = None,
    ) -> list[Candidate]:
        """Score proposals on the training split and add them to the pool.

        Each proposal's scoring starts as soon as it arrives. Too long or duplicate
        proposals are skipped. With `first_stage`, proposals race (successive halving from
        that many examples, never dropping one at or above the best full score so far);
        otherwise each is scored on the whole split. Returns the new pool entries.
        """

    def screen(
        self, outcomes: Sequence[Proposal | Rejected | None], *, step: int
    ) -> list[Proposal]:
        """The usable proposals, in order: rejected, too long and duplicate ones (of the
        pool or of an earlier proposal) are skipped and logged. Nothing is scored."""

    def add_partial(self, proposal: Proposal, scored: InstructionScore, *, step: int) -> Candidate:
        """Add a proposal scored on some training examples (`score`) to the pool: unless
        that was all of them, as not fully scored (it cannot win), the calls not made
        counting as saved."""


class Strategy(ABC):
    """A search strategy. Subclasses are frozen dataclasses; their fields are settings."""

    name: ClassVar[str]

    def check(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Raise ConfigError if this strategy cannot work on `task` (called before a run
        starts, before any model server)."""

    @abstractmethod
    def step_cost(self, step: int, splits: TaskSplits) -> StepCost:
        """The most calls step `step` (1, 2, ...) can make."""

    @abstractmethod
    def sample_prompt(self, task: Task) -> list[Message]:
        """A typical optimizer prompt of this strategy, for token estimates."""

    @abstractmethod
    async def step(self, ctx: SearchContext, step: int) -> None:
        """Propose instructions and have the promising ones scored (`ctx.evaluate`)."""

    @property
    def needs_logprobs(self) -> bool:
        """Whether the scorer should return token log probabilities (see `fitness`)."""
        return False

    def fitness(self, scored: InstructionScore) -> float:
        """What candidates are ranked and raced by; execution accuracy unless overridden.
        The reported scores and the choice on validation are always accuracy."""
        return scored.score

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Strategy:
        return cls(**settings)
