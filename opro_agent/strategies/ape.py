"""APE (Zhou et al., 2022): instructions induced from input-output demonstrations.

Step 1 proposes candidates from random demonstrations of the training split, in forward
mode (the model continues "The instruction was to") and/or reverse mode (it is asked for
the missing instruction). Every step races its candidates (multi-stage evaluation: scored on
a few examples, the better half go on to twice as many, ...). Each later step is a round of
iterative Monte Carlo resampling: variations of the best instructions so far that keep
their meaning, raced the same way; the pool keeps the best.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from typing import ClassVar, Literal

import structlog

from opro_agent.errors import ConfigError
from opro_agent.logprobs import MIN_LOGPROB
from opro_agent.prompts import Message
from opro_agent.scorer import InstructionScore
from opro_agent.strategies.base import Proposal, Rejected, SearchContext, StepCost, Strategy
from opro_agent.strategies.replies import parse_reply
from opro_agent.strategies.templates import load_templates
from opro_agent.task import Example, Task, TaskSplits

__all__ = ["Ape", "ApeTemplates"]

log = structlog.get_logger()

Mode = Literal["forward", "reverse", "both"]
_TIE_BREAK = 1e-6  # accuracy's weight next to log probability: it only breaks ties
Score = Literal["accuracy", "logprob"]
_TEMPLATE_FIELD = "strategy.templates"


@cache
def _warn_no_logprobs() -> None:
    log.warning(
        "ape.no_logprobs",
        reason="the scorer returned no log probabilities; ranking by accuracy instead",
    )


@dataclass(frozen=True)
class ApeTemplates:
    """APE's prompts, files in a folder (built-in: `meta_prompts/ape/`)."""

    forward: str  # {demos}
    reverse: str  # {demos}
    demo: str  # {input}, {output}
    resample: str  # {instruction}
    tag: str

    @classmethod
    def load(cls, name_or_path: str) -> ApeTemplates:
        return cls(
            **load_templates(
                name_or_path,
                ("forward", "reverse", "demo", "resample", "tag"),
                field=_TEMPLATE_FIELD,
                samples={
                    "forward": {"demos": ""},
                    "reverse": {"demos": ""},
                    "demo": {"input": "q", "output": "a"},
                    "resample": {"instruction": "x"},
                },
            )
        )

    def induce(self, mode: str, demos: list[tuple[str, str]]) -> list[Message]:
        text = "".join(self.demo.format(input=q, output=a) for q, a in demos)
        template = self.forward if mode == "forward" else self.reverse
        return [("human", template.format(demos=text).strip())]


@dataclass(frozen=True)
class Ape(Strategy):
    """APE's settings: `proposals` induced at step 1 from `demos` demonstrations each;
    later steps resample `variations` of each of the `resample_top` best instructions."""

    name: ClassVar[str] = "ape"

    proposals: int = 8
    mode: Mode = "both"
    demos: int = 5
    first_stage: int = 5  # examples of the first racing stage
    resample_top: int = 3
    variations: int = 2
    templates: str = "ape"
    # What candidates are raced and ranked by: execution accuracy, or (APE's alternative)
    # the scorer's mean log probability of the gold answers, where the scorer returns log
    # probabilities. Reported scores and the choice on validation stay accuracy.
    score: Score = "accuracy"

    def __post_init__(self) -> None:
        for name in ("proposals", "demos", "first_stage", "resample_top", "variations"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)
        if self.mode not in ("forward", "reverse", "both"):
            raise ConfigError("must be forward, reverse or both", field="mode")
        if self.score not in ("accuracy", "logprob"):
            raise ConfigError("must be accuracy or logprob", field="score")
        self.prompts  # noqa: B018 - a missing or broken template fails here, before a run

    @cached_property
    def prompts(self) -> ApeTemplates:
        return ApeTemplates.load(self.templates)

    @property
    def needs_logprobs(self) -> bool:
        return self.score == "logprob"

    def fitness(self, scored: InstructionScore) -> float:
        if self.score == "accuracy":
            return scored.score
        # One scale for every candidate: log probability, the floor where the scorer gave
        # none, with accuracy to break ties (all candidates tie when it never gives any).
        logprob = scored.mean_logprob
        if logprob is None:
            _warn_no_logprobs()
            logprob = MIN_LOGPROB
        return logprob + scored.score * _TIE_BREAK

    def step_cost(self, step: int, splits: TaskSplits) -> StepCost:
        asks = self.proposals if step == 1 else self.resample_top * self.variations
        return StepCost(asks, asks * len(splits.train))

    def sample_prompt(self, task: Task) -> list[Message]:
        demos = [(task.question(e), e.target) for e in task.splits().train[: self.demos]]
        return self.prompts.induce("reverse", demos)

    async def step(self, ctx: SearchContext, step: int) -> None:
        if step == 1:
            pending = [self._induce(ctx, step, kind, idx) for kind, idx in self._modes()]
        else:
            parents = [c.text for c in ctx.pool.ranked()[: self.resample_top]]
            pending = [
                self._resample(ctx, step, parent, n * self.variations + v)
                for n, parent in enumerate(parents)
                for v in range(self.variations)
            ]
        await ctx.evaluate(pending, step=step, first_stage=self.first_stage)

    def _modes(self) -> list[tuple[str, int]]:
        """(kind, idx) of each step-1 proposal; `both` alternates forward and reverse."""
        if self.mode != "both":
            return [(self.mode, idx) for idx in range(self.proposals)]
        kinds = ("forward", "reverse")
        return [(kinds[n % 2], n // 2) for n in range(self.proposals)]

    async def _induce(
        self, ctx: SearchContext, step: int, kind: str, idx: int
    ) -> Proposal | Rejected | None:
        train = list(ctx.splits.train)
        picked: list[Example] = ctx.rng(step, kind, idx).sample(train, min(self.demos, len(train)))
        demos = [(ctx.task.question(e), e.target) for e in picked]
        output = await ctx.ask(self.prompts.induce(kind, demos), step=step, kind=kind, idx=idx)
        if output is None:
            return None
        return parse_reply(output, self.prompts.tag, kind=kind, questions=[q for q, _ in demos])

    async def _resample(
        self, ctx: SearchContext, step: int, parent: str, idx: int
    ) -> Proposal | Rejected | None:
        messages: list[Message] = [
            ("human", self.prompts.resample.format(instruction=parent).strip())
        ]
        output = await ctx.ask(messages, step=step, kind="resample", idx=idx)
        if output is None:
            return None
        return parse_reply(output, self.prompts.tag, kind="resample", parent=parent)
