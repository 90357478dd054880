"""The scorer: runs an instruction over examples with the target and grades the answers.

Calls run concurrently under a bound; every result is committed to the run store as it
arrives, and results already stored are reused instead of paid for again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableConfig

from opro_agent.candidates import instruction_key
from opro_agent.errors import BudgetExceededError, ConfigError, LLMCallsFailingError
from opro_agent.llm_calls import Caller
from opro_agent.logprobs import MIN_LOGPROB, gold_logprob, mean_logprob
from opro_agent.prompts import Demonstration, Demonstrations, scorer_prompt
from opro_agent.store import Evaluation, RunStore
from opro_agent.task import Example, Task

__all__ = ["InstructionScore", "Scorer", "TargetKind", "gather_all"]

log = structlog.get_logger()
T = TypeVar("T")
TargetKind = Literal["chat_model", "chain"]


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


@dataclass(frozen=True)
class InstructionScore:
    instruction: str
    split: str
    results: Mapping[str, Evaluation]  # by example id

    @property
    def score(self) -> float:
        if not self.results:
            return 0.0
        return sum(r.score for r in self.results.values()) / len(self.results)

    @property
    def mean_logprob(self) -> float | None:
        """Mean log probability of the gold answers, an answer without one (a failed call,
        an empty reply) counting as the floor; None when no answer came with one (the
        scorer does not return log probabilities)."""
        values = [r.logprob for r in self.results.values()]
        if all(v is None for v in values):
            return None
        return mean_logprob(MIN_LOGPROB if v is None else v for v in values)


class Scorer:
    """Scores instructions on a task's examples; `kind` says how the target is called.

    A chat model gets the scorer prompt's messages; a chain gets a dict with `instruction`
    and the task's input fields. `demonstrations` (fixed, or an example selector that picks
    them for each input, see `opro_agent.retrieval`) come before every question; `score`
    can add fixed `shots` of its own too (how a retriever's training labels are made).
    """

    def __init__(
        self,
        task: Task,
        caller: Caller,
        kind: TargetKind,
        *,
        store: RunStore,
        run_id: str,
        concurrency: int = 8,
        failure_threshold: float = 0.2,
        min_failures: int = 5,
        config: RunnableConfig | None = None,
        demonstrations: Demonstrations | None = None,
    ) -> None:
        if demonstrations is not None and kind != "chat_model":
            raise ConfigError("demonstrations need a chat model as the scorer, not a chain")
        self.task = task
        self._caller = caller
        self._kind = kind
        self._store = store
        self._run_id = run_id
        self._limit = asyncio.Semaphore(concurrency)
        self._failure_threshold = failure_threshold
        self._min_failures = min_failures
        self._config = config
        self._demonstrations = demonstrations
        self._templates: dict[tuple[str, tuple[Demonstration, ...]], ChatPromptTemplate] = {}
        self.attempted = 0
        self.failed = 0

    def prompt_template(
        self, instruction: str, shots: Sequence[Demonstration] = ()
    ) -> ChatPromptTemplate:
        template = self._templates.get((instruction, tuple(shots)))
        if template is None:
            demonstrations = tuple(shots) if shots else self._demonstrations
            template = scorer_prompt(
                instruction,
                self.task.instruction_position,
                self.task.input_fields,
                demonstrations,
            )
            self._templates[instruction, tuple(shots)] = template
        return template

    async def score(
        self,
        instruction: str,
        examples: Sequence[Example],
        split: str,
        *,
        step: int,
        shots: Sequence[Demonstration] = (),
    ) -> InstructionScore:
        key = instruction_key(instruction)
        if shots:
            key += "|" + ",".join(d.id for d in shots)
        stored = self._store.evaluations(self._run_id, key)
        missing = [e for e in examples if e.id not in stored]
        fresh = await gather_all(
            self._evaluate(instruction, key, example, split, step, shots) for example in missing
        )
        results = {e.id: stored[e.id] for e in examples if e.id in stored}
        results.update((r.example_id, r) for r in fresh)
        return InstructionScore(instruction, split, results)

    async def score_many(
        self, instructions: Sequence[str], examples: Sequence[Example], split: str, *, step: int
    ) -> list[InstructionScore]:
        return await gather_all(self.score(i, examples, split, step=step) for i in instructions)

    async def _evaluate(
        self,
        instruction: str,
        key: str,
        example: Example,
        split: str,
        step: int,
        shots: Sequence[Demonstration],
    ) -> Evaluation:
        payload: Any
        if self._kind == "chat_model":
            payload = self.prompt_template(instruction, shots).format_messages(**example.inputs)
        else:
            payload = {"instruction": instruction, **example.inputs}
        metadata = {
            "opro_run_id": self._run_id,
            "opro_step": step,
            "opro_split": split,
            "opro_example_id": example.id,
        }
        async with self._limit:
            self.attempted += 1
            try:
                call = await self._caller(payload, config=self._config, metadata=metadata)
            except BudgetExceededError:
                raise
            except Exception as exc:  # any provider error: recorded as a 0, counted, bounded
                result = Evaluation(example.id, split, None, 0.0, error=_describe(exc))
                self._store.record_evaluation(self._run_id, key, result)
                self._count_failure(result.error or "")
                return result
        score = self._grade(call.text, example)
        logprob = None
        if call.logprobs and example.target.strip():
            logprob = gold_logprob(call.logprobs, example.target)
        result = Evaluation(
            example.id,
            split,
            call.text,
            score,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            latency=call.latency,
            cached=call.cached,
            logprob=logprob,
        )
        self._store.record_evaluation(self._run_id, key, result)
        return result

    def _grade(self, prediction: str, example: Example) -> float:
        try:
            return float(self.task.metric(prediction, example.target, self.task.question(example)))
        except Exception as exc:  # a user's metric function failing is a task error
            raise ConfigError(
                f"the metric raised {_describe(exc)} on example {example.id}",
                source=self.task.source,
                field="metric",
            ) from exc

    def _count_failure(self, error: str) -> None:
        self.failed += 1
        log.warning("scorer.call_failed", error=error, failed=self.failed, attempted=self.attempted)
        if (
            self.failed >= self._min_failures
            and self.failed / self.attempted > self._failure_threshold
        ):
            raise LLMCallsFailingError(
                f"{self.failed} of {self.attempted} scorer calls failed after retries "
                f"(last: {error}); everything done so far is saved"
            )


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
