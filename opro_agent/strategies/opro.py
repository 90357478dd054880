"""OPRO (Yang et al., 2023): the optimizer reads past instructions sorted by score plus a few
task exemplars, and proposes new instructions; each is scored on the whole training split
(or raced, with early rejection)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

from opro_agent.candidates import parse_instruction
from opro_agent.errors import ConfigError
from opro_agent.meta_prompt import Exemplar, MetaPromptTemplate, ScoredInstruction, exemplar_prompt
from opro_agent.prompts import Message
from opro_agent.strategies.base import (
    Proposal,
    Rejected,
    SearchContext,
    StepCost,
    Strategy,
)
from opro_agent.task import Example, Task, TaskSplits

__all__ = ["ExemplarSelection", "Opro"]

ExemplarSelection = Literal["random", "constant", "most_wrong"]


@dataclass(frozen=True)
class Opro(Strategy):
    """OPRO's settings; defaults follow the paper's ablations."""

    name: ClassVar[str] = "opro"

    candidates_per_step: int = 8
    max_history: int = 20
    score_buckets: int = 100
    exemplars: int = 3
    exemplar_selection: ExemplarSelection = "random"
    meta_prompt: str = "chat"
    # Racing (APE's multi-stage evaluation): see benchmarks/README.md, it saved calls but
    # did not match full scoring's accuracy on every seed, so it is off by default.
    early_rejection: bool = False
    first_stage: int = 5

    def __post_init__(self) -> None:
        for name in ("exemplars", "max_history"):
            if getattr(self, name) < 0:
                raise ConfigError("must not be negative", field=name)
        for name in ("candidates_per_step", "score_buckets", "first_stage"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)
        if self.exemplar_selection not in ("random", "constant", "most_wrong"):
            raise ConfigError("must be random, constant or most_wrong", field="exemplar_selection")
        self.template  # noqa: B018 - a missing or broken template fails here, before a run

    @cached_property
    def template(self) -> MetaPromptTemplate:
        return MetaPromptTemplate.load(self.meta_prompt)

    def step_cost(self, step: int, splits: TaskSplits) -> StepCost:
        n = self.candidates_per_step
        return StepCost(n, n * len(splits.train))

    def sample_prompt(self, task: Task) -> list[Message]:
        longest = max(task.initial_instructions, key=len, default="") or "instruction"
        train = task.splits().train
        history = [ScoredInstruction(longest, 0.5)] * self.max_history
        exemplars = [
            Exemplar(task.question(e), task.question(e), e.target) for e in train[: self.exemplars]
        ]
        return self.template.render(history, exemplars)

    async def step(self, ctx: SearchContext, step: int) -> None:
        template = self.template
        exemplars = [
            Exemplar(
                question=ctx.task.question(e),
                prompt=exemplar_prompt(
                    e,
                    ctx.task.instruction_position,
                    ctx.task.input_fields,
                    placeholder=f"<{template.tag}>",
                ),
                answer=e.target,
            )
            for e in self._exemplars(ctx, step)
        ]
        meta_prompt = template.render(
            [ScoredInstruction(c.text, c.train) for c in ctx.pool],
            exemplars,
            max_history=self.max_history,
            buckets=self.score_buckets,
        )

        async def propose(idx: int) -> Proposal | Rejected | None:
            output = await ctx.ask(meta_prompt, step=step, kind="proposal", idx=idx)
            if output is None:
                return None
            text = parse_instruction(output, template.tag)
            if text is None:
                return Rejected("unparseable", output)
            # Small optimizers often copy a shown problem instead of writing an instruction.
            if any(e.question.strip() and e.question.strip() in text for e in exemplars):
                return Rejected("echoes_exemplar", output)
            return Proposal(text, "proposal")

        await ctx.evaluate(
            [propose(idx) for idx in range(self.candidates_per_step)],
            step=step,
            first_stage=self.first_stage if self.early_rejection else None,
        )

    def _exemplars(self, ctx: SearchContext, step: int) -> list[Example]:
        train = ctx.splits.train
        count = min(self.exemplars, len(train))
        selection = self.exemplar_selection
        # Seeded per step (not a running RNG) so a resumed run picks the same exemplars.
        rng = ctx.rng(0 if selection == "constant" else step)
        shuffled = rng.sample(list(train), len(train))
        if selection != "most_wrong":
            return shuffled[:count]
        wrong = Counter(
            example_id
            for candidate in ctx.pool
            for example_id, result in candidate.scored.results.items()
            if result.score < 1.0
        )
        return sorted(shuffled, key=lambda e: -wrong[e.id])[:count]
