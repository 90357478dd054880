"""What a run will cost before it spends anything (`optimize --dry-run`).

Calls are counted from the settings and the splits; tokens are estimated offline (tiktoken
when its encoding is on disk, otherwise a character heuristic) from the prompts the run
would send: the scorer prompt for every training question, and a meta-prompt with a full
history. Upper bounds: early rejection, the cache and early stopping only lower them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opro_agent.meta_prompt import Exemplar, MetaPromptTemplate, ScoredInstruction
from opro_agent.pricing import Price
from opro_agent.prompts import scorer_prompt
from opro_agent.settings import OproSettings
from opro_agent.task import Task, TaskSplits
from opro_agent.tokens import count_message_tokens

__all__ = ["RunEstimate", "estimate_run", "final_calls", "step_calls"]


def step_calls(settings: OproSettings, splits: TaskSplits) -> int:
    """Calls one step can take at most: every candidate fully scored (no racing savings)."""
    n = settings.candidates_per_step
    return n + n * len(splits.train)


def final_calls(settings: OproSettings, splits: TaskSplits, initial: int) -> int:
    """Calls to pick the winner on validation and score it and the `initial` ones on test."""
    return settings.validate_top * len(splits.validation) + (1 + initial) * len(splits.test)


@dataclass(frozen=True)
class RunEstimate:
    optimizer_calls: int
    scorer_calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None  # USD; None when a role's price is unknown

    @property
    def calls(self) -> int:
        return self.optimizer_calls + self.scorer_calls


def estimate_run(
    task: Task,
    settings: OproSettings,
    *,
    optimizer_max_tokens: int,
    prices: Mapping[str, Price | None],
) -> RunEstimate:
    splits = task.splits()
    initial = list(dict.fromkeys(task.initial_instructions))
    longest = max(initial, key=len, default="")
    prompt = scorer_prompt(longest, task.instruction_position, task.input_fields)
    per_answer = [count_message_tokens(prompt.format_messages(**e.inputs)) for e in task.examples]
    mean_answer_prompt = sum(per_answer) / max(len(per_answer), 1)

    optimizer_calls = settings.steps * settings.candidates_per_step
    scorer_calls = len(initial) * len(splits.train) + final_calls(settings, splits, len(initial))
    scorer_calls += settings.steps * step_calls(settings, splits) - optimizer_calls

    template = MetaPromptTemplate.load(settings.meta_prompt)
    history = [ScoredInstruction(longest or "instruction", 0.5)] * settings.max_history
    exemplars = [
        Exemplar(task.question(e), task.question(e), e.target)
        for e in splits.train[: settings.exemplars]
    ]
    meta_tokens = count_message_tokens(template.render(history, exemplars))

    scorer_prompt_tokens = round(scorer_calls * mean_answer_prompt)
    scorer_completion = scorer_calls * task.answer_max_tokens
    optimizer_prompt_tokens = optimizer_calls * meta_tokens
    optimizer_completion = optimizer_calls * optimizer_max_tokens
    cost: float | None = None
    optimizer_price, scorer_price = prices.get("optimizer"), prices.get("scorer")
    if optimizer_price is not None and scorer_price is not None:
        cost = optimizer_price.cost(optimizer_prompt_tokens, optimizer_completion)
        cost += scorer_price.cost(scorer_prompt_tokens, scorer_completion)
    return RunEstimate(
        optimizer_calls=optimizer_calls,
        scorer_calls=scorer_calls,
        prompt_tokens=scorer_prompt_tokens + optimizer_prompt_tokens,
        completion_tokens=scorer_completion + optimizer_completion,
        cost=cost,
    )
