"""LangChain example selectors that pick each input's demonstrations.

They plug into `FewShotChatMessagePromptTemplate` (see `opro_agent.prompts.scorer_prompt`,
`OptimizationResult.to_prompt_template(demonstrations=...)`), so a chain built with one asks
the scorer exactly what the evaluation asked. Both return examples as `{"question",
"answer"}` dicts in prompt order: `p_K ... p_1`, the most similar one last, next to the input.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from langchain_core.example_selectors import BaseExampleSelector

from opro_agent.errors import ConfigError
from opro_agent.prompts import Demonstration, render_question
from opro_agent.retrieval.pool import PromptPool
from opro_agent.retrieval.retriever import Retriever

__all__ = ["RandomDemonstrations", "RetrievedDemonstrations"]


def _check_k(k: int, pool: PromptPool) -> None:
    if not 1 <= k <= len(pool):
        raise ConfigError(f"k must be between 1 and the pool size ({len(pool)}), not {k}")


def _new_demonstration(example: dict[str, str], n: int) -> Demonstration:
    try:
        return Demonstration(
            id=example.get("id", f"added:{n}"),
            question=example["question"],
            answer=example["answer"],
        )
    except KeyError as exc:
        raise ConfigError(f"an added example needs a {exc.args[0]!r} key") from exc


class RetrievedDemonstrations(BaseExampleSelector):
    """The `k` demonstrations a retriever ranks highest for the input."""

    def __init__(self, retriever: Retriever, input_fields: Sequence[str], k: int = 3) -> None:
        _check_k(k, retriever.pool)
        self.retriever = retriever
        self.input_fields = tuple(input_fields)
        self.k = k

    def select_examples(self, input_variables: dict[str, Any]) -> list[dict[str, str]]:
        question = render_question(input_variables, self.input_fields)
        ranked = self.retriever.top_k(question, self.k)
        return [d.as_example() for d in reversed(ranked)]

    def add_example(self, example: dict[str, str]) -> Any:
        self.retriever.add([_new_demonstration(example, len(self.retriever.pool))])

    def __repr__(self) -> str:
        return f"RetrievedDemonstrations({self.retriever!r}, k={self.k})"


class RandomDemonstrations(BaseExampleSelector):
    """`k` demonstrations drawn from the pool at random: the baseline a retriever must beat.

    The draw is seeded by `seed` and the input, so the same input always gets the same ones
    (a resumed or repeated evaluation asks the same prompts).
    """

    def __init__(
        self, pool: PromptPool, input_fields: Sequence[str], k: int = 3, *, seed: int = 0
    ) -> None:
        _check_k(k, pool)
        self.pool = pool
        self.input_fields = tuple(input_fields)
        self.k = k
        self.seed = seed

    def select_examples(self, input_variables: dict[str, Any]) -> list[dict[str, str]]:
        question = render_question(input_variables, self.input_fields)
        rng = random.Random(f"{self.seed}\n{question}")
        return [d.as_example() for d in rng.sample(self.pool.demonstrations, self.k)]

    def add_example(self, example: dict[str, str]) -> Any:
        demonstration = _new_demonstration(example, len(self.pool))
        self.pool = PromptPool((*self.pool.demonstrations, demonstration))

    def __repr__(self) -> str:
        return f"RandomDemonstrations({self.pool.fingerprint()}, k={self.k}, seed={self.seed})"
