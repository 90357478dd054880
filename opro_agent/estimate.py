"""What a run will cost before it spends anything (`optimize --dry-run`).

Calls are counted from the strategy's per-step bound, the settings and the splits; tokens
are estimated offline (tiktoken when its encoding is on disk, otherwise a character
heuristic) from the prompts the run would send: the scorer prompt for every training
question, and a typical optimizer prompt of the strategy. Upper bounds: early rejection,
the cache and early stopping only lower them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opro_agent.pricing import Price
from opro_agent.prompts import scorer_prompt
from opro_agent.search import final_calls
from opro_agent.settings import SearchSettings
from opro_agent.strategies.base import Strategy
from opro_agent.task import Task
from opro_agent.tokens import count_message_tokens

__all__ = ["RunEstimate", "estimate_run"]


@dataclass(frozen=True)
class RunEstimate:
    optimizer_calls: int
    scorer_calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None  # USD; None when a role's price is unknown


def estimate_run(
    task: Task,
    settings: SearchSettings,
    strategy: Strategy,
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

    costs = [strategy.step_cost(step, splits) for step in range(1, settings.steps + 1)]
    optimizer_calls = sum(c.optimizer_calls for c in costs)
    scorer_calls = len(initial) * len(splits.train) + final_calls(settings, splits, len(initial))
    scorer_calls += sum(c.scorer_calls for c in costs)
    meta_tokens = count_message_tokens(strategy.sample_prompt(task))

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
