"""PE2 (Ye et al., 2023): prompt engineering a prompt engineer.

Each step shows the optimizer a rich meta-prompt: a short prompt-engineering tutorial, a
two-step task (inspect the failures, then propose), a step-by-step reasoning template (is
the output correct? is the prompt describing the task correctly? is an edit necessary?),
how the prompt and an input are combined, a batch of failures of the current best prompt,
and its history (the prompts it was derived from, with their scores: momentum). A proposal
that changes more words of the prompt than the step size allows is rejected.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from opro_agent.errors import ConfigError
from opro_agent.meta_prompt import exemplar_prompt, score_bucket
from opro_agent.prompts import Message
from opro_agent.strategies.base import (
    Candidate,
    Pool,
    Proposal,
    Rejected,
    SearchContext,
    StepCost,
    Strategy,
)
from opro_agent.strategies.replies import parse_reply
from opro_agent.strategies.templates import load_templates
from opro_agent.task import Example, Task, TaskSplits

__all__ = ["Pe2", "words_changed"]

_FIELD = "strategy.templates"


def words_changed(before: str, after: str) -> int:
    """How many words an edit inserts, deletes or replaces (a word-level diff)."""
    matcher = difflib.SequenceMatcher(a=before.split(), b=after.split(), autojunk=False)
    changed = 0
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            changed += max(i2 - i1, j2 - j1)
    return changed


@dataclass(frozen=True)
class Pe2(Strategy):
    """PE2's settings: `batch_size` failures shown, at most `step_size` words changed per
    edit, `history` earlier prompts shown (momentum)."""

    name: ClassVar[str] = "pe2"

    candidates_per_step: int = 4
    batch_size: int = 4
    step_size: int = 20
    history: int = 3
    early_rejection: bool = False
    first_stage: int = 5
    templates: str = "pe2"

    def __post_init__(self) -> None:
        for name in ("candidates_per_step", "batch_size", "step_size", "first_stage"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)
        if self.history < 0:
            raise ConfigError("must not be negative", field="history")
        self.prompts  # noqa: B018 - a missing or broken template fails here, before a run

    @cached_property
    def prompts(self) -> dict[str, str]:
        return load_templates(
            self.templates,
            ("opening", "failure", "history_item", "tag"),
            field=_FIELD,
            samples={
                "opening": {
                    "combination": "",
                    "instruction": "x",
                    "score": 0,
                    "history": "",
                    "failures": "",
                    "step_size": 1,
                },
                "failure": {"question": "q", "prediction": "p", "answer": "a"},
                "history_item": {"instruction": "x", "score": 0},
            },
        )

    def check(self, task: Task) -> None:
        if not task.initial_instructions:
            raise ConfigError(
                "pe2 edits the best instruction so far: give at least one",
                source=task.source,
                field="initial_instructions",
            )

    def step_cost(self, step: int, splits: TaskSplits) -> StepCost:
        n = self.candidates_per_step
        return StepCost(n, n * len(splits.train))

    def sample_prompt(self, task: Task) -> list[Message]:
        train = task.splits().train
        longest = max(task.initial_instructions, key=len, default="")
        shown = train[: self.batch_size]
        return self._meta_prompt(task, longest, 0.5, [], shown, {e.id: e.target for e in shown})

    async def step(self, ctx: SearchContext, step: int) -> None:
        current = ctx.pool.ranked()[0]
        results = current.scored.results
        failures = [e for e in ctx.splits.train if e.id in results and results[e.id].score < 1]
        shown = ctx.rng(step, "failures").sample(failures, min(self.batch_size, len(failures)))
        predictions = {e.id: results[e.id].prediction or "" for e in shown}
        meta_prompt = self._meta_prompt(
            ctx.task, current.text, current.train, _lineage(ctx.pool, current), shown, predictions
        )
        questions = [ctx.task.question(e) for e in shown]

        async def propose(idx: int) -> Proposal | Rejected | None:
            reply = await ctx.ask(meta_prompt, step=step, kind="pe2", idx=idx)
            if reply is None:
                return None
            edit = parse_reply(
                reply, self.prompts["tag"], kind="pe2", parent=current.text, questions=questions
            )
            if (
                isinstance(edit, Proposal)
                and words_changed(current.text, edit.text) > self.step_size
            ):
                return Rejected(f"step_size: changes more than {self.step_size} words", reply)
            return edit

        await ctx.evaluate(
            [propose(idx) for idx in range(self.candidates_per_step)],
            step=step,
            first_stage=self.first_stage if self.early_rejection else None,
        )

    def _meta_prompt(
        self,
        task: Task,
        instruction: str,
        score: float,
        lineage: list[Candidate],
        failures: list[Example] | tuple[Example, ...],
        predictions: dict[str, str],
    ) -> list[Message]:
        prompts = self.prompts
        history = (
            "".join(
                prompts["history_item"].format(instruction=c.text, score=score_bucket(c.train))
                for c in lineage[-self.history :]
            )
            if self.history
            else ""
        )
        shown = "".join(
            prompts["failure"].format(
                question=task.question(e), prediction=predictions[e.id], answer=e.target
            )
            for e in failures
        )
        example = task.splits().train[0]
        combination = exemplar_prompt(
            example, task.instruction_position, task.input_fields, placeholder="<INS>"
        )
        text = prompts["opening"].format(
            combination=combination,
            instruction=instruction,
            score=score_bucket(score),
            history=history or "(none yet)\n",
            failures=shown or "(none: every example shown was answered correctly)\n",
            step_size=self.step_size,
        )
        return [("human", text.strip())]


def _lineage(pool: Pool, candidate: Candidate) -> list[Candidate]:
    """The instructions `candidate` was derived from, oldest first (not itself)."""
    by_text = {c.text: c for c in pool}
    chain: list[Candidate] = []
    parent = candidate.parent
    while parent is not None and parent in by_text and len(chain) < len(by_text):
        chain.append(by_text[parent])
        parent = by_text[parent].parent
    return chain[::-1]
