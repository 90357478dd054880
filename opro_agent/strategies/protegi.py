"""ProTeGi / APO (Pryzant et al., 2023): prompt optimization with textual "gradients" and
beam search.

Each step expands every prompt of the beam (the best instructions so far): it is run on a
minibatch of training examples; from its errors the optimizer states why the prompt failed
(a gradient), rewrites the prompt to fix it (an edit), and paraphrases the edit (Monte Carlo
successors). The next beam is chosen among the successors by a best-arm bandit over small
batches of training examples (UCB or successive rejects), so only the chosen ones are scored
on the whole training split; the calls that saves are counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

from opro_agent.errors import ConfigError
from opro_agent.prompts import Message
from opro_agent.scorer import InstructionScore, gather_all
from opro_agent.strategies.base import (
    Candidate,
    Proposal,
    Rejected,
    SearchContext,
    StepCost,
    Strategy,
)
from opro_agent.strategies.replies import parse_reply
from opro_agent.strategies.templates import load_templates
from opro_agent.task import Example, Task, TaskSplits

__all__ = ["ProTeGi"]

Bandit = Literal["ucb", "successive_rejects"]
_FIELD = "strategy.templates"
_REASON_RE = re.compile(r"<START>(.*?)(?:<END>|$)", re.IGNORECASE | re.DOTALL)
Outcome = Proposal | Rejected | None


@dataclass(frozen=True)
class ProTeGi(Strategy):
    """ProTeGi's settings; defaults follow the reference code (a 135M model is slow to run
    them all: lower `gradients` and `paraphrases` for quick runs)."""

    name: ClassVar[str] = "protegi"

    beam: int = 4
    minibatch: int = 64  # capped by the training split
    gradients: int = 4  # gradient calls per beam prompt, each one reason
    errors_per_gradient: int = 4
    paraphrases: int = 1  # Monte Carlo successors per edit
    bandit: Bandit = "ucb"
    bandit_batch: int = 5  # training examples per pull of an arm
    bandit_pulls: int = 3  # UCB's budget in pulls per arm (every arm is pulled once anyway)
    exploration: float = 2.0  # UCB's c in mean + sqrt(c ln t / n)
    templates: str = "protegi"

    def __post_init__(self) -> None:
        for name in ("beam", "minibatch", "gradients", "errors_per_gradient", "bandit_batch"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)
        for name in ("paraphrases", "bandit_pulls"):
            if getattr(self, name) < 0:
                raise ConfigError("must not be negative", field=name)
        if self.exploration < 0:
            raise ConfigError("must not be negative", field="exploration")
        if self.bandit not in ("ucb", "successive_rejects"):
            raise ConfigError("must be ucb or successive_rejects", field="bandit")
        self.prompts  # noqa: B018 - a missing or broken template fails here, before a run

    @cached_property
    def prompts(self) -> dict[str, str]:
        error = {"question": "q", "prediction": "p", "answer": "a"}
        return load_templates(
            self.templates,
            ("gradient", "edit", "paraphrase", "error", "tag"),
            field=_FIELD,
            samples={
                "gradient": {"instruction": "x", "errors": "", "reasons": 1},
                "edit": {"instruction": "x", "errors": "", "gradient": "g"},
                "paraphrase": {"instruction": "x"},
                "error": error,
            },
        )

    def check(self, task: Task) -> None:
        if not task.initial_instructions:
            raise ConfigError(
                "protegi edits the best instructions so far: give at least one",
                source=task.source,
                field="initial_instructions",
            )

    def step_cost(self, step: int, splits: TaskSplits) -> StepCost:
        per_gradient = 2 + self.paraphrases  # gradient, edit, paraphrases
        arms = self.beam * self.gradients * (1 + self.paraphrases)
        train = len(splits.train)
        # The bandit's pulls, then the chosen beam on the whole split (the minibatch of
        # errors comes from the store: the beam is fully scored already).
        phases = self.bandit_pulls if self.bandit == "ucb" else arms - self.beam + 1
        bandit = arms * max(phases, 1) * self.bandit_batch + self.beam * train
        return StepCost(self.beam * self.gradients * per_gradient, min(arms * train, bandit))

    def sample_prompt(self, task: Task) -> list[Message]:
        train = task.splits().train[: self.errors_per_gradient]
        errors = self._errors(task, train, {e.id: e.target for e in train})
        longest = max(task.initial_instructions, key=len, default="")
        text = self.prompts["edit"].format(instruction=longest, errors=errors, gradient="...")
        return [("human", text)]

    async def step(self, ctx: SearchContext, step: int) -> None:
        beam = ctx.pool.ranked()[: self.beam]
        expanded = await gather_all(self._expand(ctx, step, b, p) for b, p in enumerate(beam))
        arms = ctx.screen([o for outcomes in expanded for o in outcomes], step=step)
        if len(arms) <= self.beam:
            await ctx.evaluate([_ready(p) for p in arms], step=step)
            return
        scored = await self._bandit(ctx, step, arms)
        best = sorted(range(len(arms)), key=lambda i: (-self.fitness(scored[i]), i))
        chosen = set(best[: self.beam])
        await ctx.evaluate([_ready(arms[i]) for i in sorted(chosen)], step=step)
        for i, arm in enumerate(arms):
            if i not in chosen:
                ctx.add_partial(arm, scored[i], step=step)

    # -- expansion: gradients, edits, paraphrases ---------------------------------------------

    async def _expand(
        self, ctx: SearchContext, step: int, b: int, parent: Candidate
    ) -> list[Outcome]:
        train = list(ctx.splits.train)
        batch = ctx.rng(step, "minibatch", b).sample(train, min(self.minibatch, len(train)))
        # The beam is fully scored: these answers come from the store, not from the model.
        scored = await ctx.score(parent.text, batch, step=step)
        errors = [e for e in batch if e.id in scored.results and scored.results[e.id].score < 1]
        if not errors:
            return []
        predictions = {e.id: scored.results[e.id].prediction or "" for e in errors}
        lists = await gather_all(
            self._gradient(ctx, step, b * self.gradients + g, parent, errors, predictions)
            for g in range(self.gradients)
        )
        return [o for outcomes in lists for o in outcomes]

    async def _gradient(
        self,
        ctx: SearchContext,
        step: int,
        idx: int,
        parent: Candidate,
        errors: list[Example],
        predictions: dict[str, str],
    ) -> list[Outcome]:
        rng = ctx.rng(step, "errors", idx)
        shown = rng.sample(errors, min(self.errors_per_gradient, len(errors)))
        error_text = self._errors(ctx.task, shown, predictions)
        ask = self.prompts["gradient"].format(instruction=parent.text, errors=error_text, reasons=1)
        reply = await ctx.ask([("human", ask)], step=step, kind="gradient", idx=idx)
        if reply is None:
            return []
        gradient = _reason(reply)
        if gradient is None:
            return [Rejected("unparseable_gradient", reply)]
        edit_ask = self.prompts["edit"].format(
            instruction=parent.text, errors=error_text, gradient=gradient
        )
        reply = await ctx.ask([("human", edit_ask)], step=step, kind="edit", idx=idx)
        if reply is None:
            return []
        questions = [ctx.task.question(e) for e in shown]
        tag = self.prompts["tag"]
        edit = parse_reply(reply, tag, kind="edit", parent=parent.text, questions=questions)
        if not isinstance(edit, Proposal):
            return [edit]

        async def paraphrase(m: int) -> Outcome:
            ask = self.prompts["paraphrase"].format(instruction=edit.text)
            n = idx * self.paraphrases + m
            reply = await ctx.ask([("human", ask)], step=step, kind="paraphrase", idx=n)
            if reply is None:
                return None
            return parse_reply(reply, tag, kind="paraphrase", parent=edit.text, questions=questions)

        return [edit, *await gather_all(paraphrase(m) for m in range(self.paraphrases))]

    def _errors(
        self, task: Task, examples: Sequence[Example], predictions: Mapping[str, str]
    ) -> str:
        return "".join(
            self.prompts["error"].format(
                question=task.question(e), prediction=predictions[e.id], answer=e.target
            )
            for e in examples
        )

    # -- selection: a best-arm bandit over minibatches ---------------------------------------

    async def _bandit(
        self, ctx: SearchContext, step: int, arms: list[Proposal]
    ) -> list[InstructionScore]:
        """Each arm's results after the bandit's pulls; a pull scores an arm on its next
        `bandit_batch` training examples (its own seeded order, so a resumed run pulls the
        same examples, and answers already stored are not paid again)."""
        train = list(ctx.splits.train)
        orders = [ctx.rng(step, "bandit", i).sample(train, len(train)) for i in range(len(arms))]
        seen = [0] * len(arms)
        scored: list[InstructionScore] = [InstructionScore(a.text, "train", {}) for a in arms]

        async def pull(i: int) -> None:
            seen[i] = min(seen[i] + self.bandit_batch, len(train))
            scored[i] = await ctx.score(arms[i].text, orders[i][: seen[i]], step=step)

        alive = list(range(len(arms)))
        await gather_all(pull(i) for i in alive)
        if self.bandit == "successive_rejects":
            # One arm rejected per phase, after the survivors are pulled again.
            while len(alive) > self.beam:
                worst = min(alive, key=lambda i: (self.fitness(scored[i]), -i))
                alive.remove(worst)
                await gather_all(pull(i) for i in alive if seen[i] < len(train))
            return scored
        pulls = len(arms)
        budget = self.bandit_pulls * len(arms)
        while pulls < budget:
            # UCB1, a beam's worth of arms per round so their calls run concurrently.
            open_arms = [i for i in alive if seen[i] < len(train)]
            if not open_arms:
                break

            def bound(i: int, total: int = pulls) -> tuple[float, int]:
                n = seen[i] / self.bandit_batch
                mean = self.fitness(scored[i])
                return (mean + math.sqrt(self.exploration * math.log(total) / n), -i)

            picked = sorted(open_arms, key=bound, reverse=True)[: min(self.beam, budget - pulls)]
            await gather_all(pull(i) for i in picked)
            pulls += len(picked)
        return scored


def _reason(reply: str) -> str | None:
    """The first reason between <START> and <END>, or the reply's first paragraph."""
    found = _REASON_RE.search(reply)
    text = found.group(1) if found else re.split(r"\n\s*\n", reply.strip())[0]
    text = " ".join(text.split())
    return text or None


async def _ready(proposal: Proposal) -> Proposal:
    return proposal
