"""The OPRO loop: meta-prompt -> optimizer LLM -> candidates -> scorer -> history -> result.

`OproOptimizer` is a LangChain Runnable (task in, result out). Every call it makes is stored
in a `RunStore` as it happens; running it again on a stored run replays the loop from the
store and pays only for calls that were never made, so it reaches the same result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig

from opro_agent.candidates import (
    dedupe_key,
    instruction_key,
    normalise_instruction,
    parse_instruction,
)
from opro_agent.errors import ConfigError, LLMCallsFailingError, RunStoreError
from opro_agent.llm_calls import Caller, RetryPolicy
from opro_agent.meta_prompt import (
    Exemplar,
    MetaPromptTemplate,
    Message,
    ScoredInstruction,
    exemplar_prompt,
)
from opro_agent.prompts import InstructionPosition, scorer_prompt
from opro_agent.scorer import InstructionScore, Scorer, TargetKind, gather_all
from opro_agent.store import OptimizerCall, RunStore
from opro_agent.task import Example, Task, TaskSplits

__all__ = [
    "ExemplarSelection",
    "HistoryEntry",
    "OproOptimizer",
    "OproSettings",
    "OptimizationResult",
    "evaluate_instruction",
]

log = structlog.get_logger()
ExemplarSelection = Literal["random", "constant", "most_wrong"]


@dataclass(frozen=True)
class OproSettings:
    """How the search runs. Defaults follow the OPRO paper's ablations."""

    steps: int = 10
    candidates_per_step: int = 8
    max_history: int = 20
    score_buckets: int = 100
    exemplars: int = 3
    exemplar_selection: ExemplarSelection = "random"
    max_instruction_chars: int = 500
    patience: int | None = None  # stop after this many steps without a better train score
    target_score: float | None = None  # stop once the best train score reaches this
    validate_top: int = 3  # best-on-train instructions compared on validation
    concurrency: int = 8
    seed: int = 0
    meta_prompt: str = "chat"
    failure_threshold: float = 0.2
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for name in ("steps", "exemplars", "max_history", "max_instruction_chars"):
            if getattr(self, name) < 0:
                raise ConfigError("must not be negative", field=name)
        for name in ("candidates_per_step", "validate_top", "concurrency", "score_buckets"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)
        if self.patience is not None and self.patience < 1:
            raise ConfigError("must be at least 1", field="patience")
        if self.target_score is not None and not 0 <= self.target_score <= 1:
            raise ConfigError("must be between 0 and 1", field="target_score")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> OproSettings:
        values = dict(raw)
        values["retry"] = RetryPolicy(**values.get("retry", {}))
        return cls(**values)


@dataclass(frozen=True)
class HistoryEntry:
    step: int
    origin: str  # "initial" or "optimizer"
    instruction: str
    train: float | None
    validation: float | None
    test: float | None


@dataclass(frozen=True)
class OptimizationResult:
    run_id: str
    task: str
    best_instruction: str
    scores: Mapping[str, float | None]  # the winner's train / validation / test scores
    baselines: Mapping[str, float]  # initial instruction -> test score
    history: tuple[HistoryEntry, ...]
    calls: Mapping[str, int]
    tokens: Mapping[str, int]
    wall_seconds: float
    stop_reason: str
    instruction_position: InstructionPosition
    input_fields: tuple[str, ...]

    @property
    def test_gain(self) -> float | None:
        """Winner's test score minus the best initial instruction's."""
        test = self.scores.get("test")
        if test is None or not self.baselines:
            return None
        return test - max(self.baselines.values())

    def to_prompt_template(self) -> ChatPromptTemplate:
        """The exact prompt the scorer saw for the winner; its variables are the input fields."""
        return scorer_prompt(self.best_instruction, self.instruction_position, self.input_fields)

    def summary(self) -> dict[str, Any]:
        """The JSON summary the CLI prints."""
        return {
            "run_id": self.run_id,
            "task": self.task,
            "best_instruction": self.best_instruction,
            "scores": dict(self.scores),
            "baselines": dict(self.baselines),
            "test_gain": self.test_gain,
            "calls": dict(self.calls),
            "tokens": dict(self.tokens),
            "wall_seconds": round(self.wall_seconds, 3),
            "stop_reason": self.stop_reason,
        }


@dataclass
class _Candidate:
    text: str
    step: int
    order: int
    train: float


class OproOptimizer(Runnable[Task, OptimizationResult]):
    """Finds the instruction that makes the scorer answer a task best (OPRO).

    Give `scorer` (a chat model, possibly wrapped with retries or fallbacks: it receives the
    scorer prompt's messages) or `target` (any Runnable taking a dict with `instruction` and
    the task's input fields, returning text or a message). With `store` and `run_id` naming
    a stored run, the run is resumed.
    """

    def __init__(
        self,
        optimizer: Runnable[Any, Any],
        scorer: Runnable[Any, Any] | None = None,
        *,
        target: Runnable[Any, Any] | None = None,
        settings: OproSettings | None = None,
        store: RunStore | None = None,
        run_id: str | None = None,
        run_metadata: Mapping[str, Any] | None = None,
        seed_optimizer_calls: bool = False,
    ) -> None:
        if (scorer is None) == (target is None):
            raise ConfigError("give exactly one of scorer (a chat model) or target (a chain)")
        self.optimizer = optimizer
        self.target: Runnable[Any, Any] = scorer if scorer is not None else target  # type: ignore[assignment]
        self.target_kind: TargetKind = "chat_model" if scorer is not None else "chain"
        self.settings = settings or OproSettings()
        self.template = MetaPromptTemplate.load(self.settings.meta_prompt)
        self.store = store
        self.run_id = run_id
        self.last_run_id: str | None = None  # the run the latest invoke made or resumed
        self.run_metadata = dict(run_metadata or {})
        self.seed_optimizer_calls = seed_optimizer_calls

    def compile(self, task: Task) -> OptimizationResult:
        """DSPy-style alias of `invoke`."""
        return self.invoke(task)

    def invoke(
        self, input: Task, config: RunnableConfig | None = None, **kwargs: Any
    ) -> OptimizationResult:
        return asyncio.run(self.ainvoke(input, config, **kwargs))

    async def ainvoke(
        self, input: Task, config: RunnableConfig | None = None, **kwargs: Any
    ) -> OptimizationResult:
        store = self.store or RunStore(":memory:")
        run_id = self._open_run(store, input)
        session = store.start_session(run_id)
        status = "failed"
        try:
            result = await _Run(self, input, store, run_id, config).execute()
            status = "done"
            store.set_status(run_id, status, result.summary())
            return result
        except (KeyboardInterrupt, asyncio.CancelledError):
            status = "interrupted"
            raise
        finally:
            store.end_session(session, status)
            if status != "done":
                store.set_status(run_id, status)

    def _open_run(self, store: RunStore, task: Task) -> str:
        fingerprint = task.fingerprint()
        if self.run_id is not None:
            run = store.get_run(self.run_id)
            if run.config.get("task_fingerprint") != fingerprint:
                raise RunStoreError(
                    f"run {run.id} was made with different task data or settings; "
                    "start a new run instead of resuming"
                )
            if run.config.get("settings") != self.settings.to_dict():
                raise RunStoreError(f"run {run.id} was made with different optimizer settings")
            self.last_run_id = run.id
            return run.id
        config = {
            "task_path": task.source,
            "task_fingerprint": fingerprint,
            "settings": self.settings.to_dict(),
            "target_kind": self.target_kind,
            **self.run_metadata,
        }
        self.last_run_id = store.create_run(task.name, config)
        return self.last_run_id


class _Run:
    """One execution (or resumption) of the loop for one task."""

    def __init__(
        self,
        owner: OproOptimizer,
        task: Task,
        store: RunStore,
        run_id: str,
        config: RunnableConfig | None,
    ) -> None:
        self.settings = owner.settings
        self.template = owner.template
        self.task = task
        self.store = store
        self.run_id = run_id
        self.config = config
        self.started = time.perf_counter()
        retry = self.settings.retry
        self.proposer = Caller(owner.optimizer, tag="opro:optimizer", retry=retry)
        self.seed_calls = owner.seed_optimizer_calls
        self.scorer = Scorer(
            task,
            Caller(owner.target, tag="opro:scorer", retry=retry),
            owner.target_kind,
            store=store,
            run_id=run_id,
            concurrency=self.settings.concurrency,
            failure_threshold=self.settings.failure_threshold,
            config=config,
        )
        self.candidates: dict[str, _Candidate] = {}  # scored, by dedupe key
        self.seen: set[str] = set()  # dedupe keys of scored and accepted candidates
        self.train_results: list[InstructionScore] = []

    async def execute(self) -> OptimizationResult:
        splits = self.task.splits()
        initial = [normalise_instruction(i) for i in self.task.initial_instructions]
        await self._score_new(list(dict.fromkeys(initial)), splits.train, step=0, origin="initial")
        best = self._best_train()
        stale, stop_reason = 0, "steps"
        log.info("step.done", step=0, best_train=best)
        for step in range(1, self.settings.steps + 1):
            if self._reached_target(best):
                stop_reason = "target_score"
                break
            texts = await self._propose(step, splits.train)
            await self._score_new(texts, splits.train, step=step, origin="optimizer")
            new_best = self._best_train()
            stale = 0 if new_best > best else stale + 1
            best = new_best
            log.info("step.done", step=step, candidates=len(texts), best_train=best, stale=stale)
            if self.settings.patience is not None and stale >= self.settings.patience:
                stop_reason = "patience"
                break
        else:
            if self._reached_target(best):
                stop_reason = "target_score"
        return await self._finish(splits, stop_reason)

    # -- proposing ------------------------------------------------------------------------------

    async def _propose(self, step: int, train: Sequence[Example]) -> list[str]:
        history = [ScoredInstruction(c.text, c.train) for c in self.candidates.values()]
        exemplars = [
            Exemplar(
                question=self.task.question(e),
                prompt=exemplar_prompt(
                    e,
                    self.task.instruction_position,
                    self.task.input_fields,
                    placeholder=f"<{self.template.tag}>",
                ),
                answer=e.target,
            )
            for e in self._exemplars(step, train)
        ]
        meta_prompt = self.template.render(
            history,
            exemplars,
            max_history=self.settings.max_history,
            buckets=self.settings.score_buckets,
        )
        calls = await gather_all(
            self._optimizer_call(step, idx, meta_prompt)
            for idx in range(self.settings.candidates_per_step)
        )
        if all(call.error is not None for call in calls):
            raise LLMCallsFailingError(
                f"all {len(calls)} optimizer calls of step {step} failed after retries "
                f"(last: {calls[-1].error}); everything done so far is saved"
            )
        texts = []
        for idx, call in enumerate(calls):
            if call.output is None:
                continue
            text = parse_instruction(call.output, self.template.tag)
            reason = self._reject(text, exemplars)
            if reason is not None:
                log.info(
                    "candidate.skipped", step=step, idx=idx, reason=reason, output=call.output[:200]
                )
                continue
            assert text is not None
            texts.append(text)
            self.seen.add(dedupe_key(text))
        return texts

    def _reject(self, text: str | None, exemplars: Sequence[Exemplar]) -> str | None:
        if text is None:
            return "unparseable"
        if len(text) > self.settings.max_instruction_chars:
            return "too_long"
        # Small optimizers often copy a shown problem instead of writing an instruction.
        if any(e.question.strip() and e.question.strip() in text for e in exemplars):
            return "echoes_exemplar"
        if dedupe_key(text) in self.seen:
            return "duplicate"
        return None

    async def _optimizer_call(
        self, step: int, idx: int, meta_prompt: list[Message]
    ) -> OptimizerCall:
        stored = self.store.optimizer_call(self.run_id, step, idx)
        if stored is not None:
            return stored
        metadata = {"opro_run_id": self.run_id, "opro_step": step, "opro_candidate": idx}
        # Servers like llama.cpp derive unseeded samples from a running seed, so a sample would
        # depend on the order requests arrive in; a seed per (step, candidate) pins it.
        extra = {"seed": zlib.crc32(f"{self.settings.seed}:{step}:{idx}".encode())}
        try:
            result = await self.proposer(
                meta_prompt,
                config=self.config,
                metadata=metadata,
                **(extra if self.seed_calls else {}),
            )
            call = OptimizerCall(result.text, None, result.prompt_tokens, result.completion_tokens)
        except Exception as exc:  # provider errors: recorded, the step goes on without it
            call = OptimizerCall(None, f"{type(exc).__name__}: {exc}"[:300])
            log.warning("optimizer.call_failed", step=step, idx=idx, error=call.error)
        self.store.record_optimizer_call(self.run_id, step, idx, call)
        return call

    def _exemplars(self, step: int, train: Sequence[Example]) -> list[Example]:
        count = min(self.settings.exemplars, len(train))
        selection = self.settings.exemplar_selection
        # Seeded per step (not a running RNG) so a resumed run picks the same exemplars.
        rng = random.Random(f"{self.settings.seed}:{0 if selection == 'constant' else step}")
        shuffled = rng.sample(list(train), len(train))
        if selection != "most_wrong":
            return shuffled[:count]
        wrong = Counter(
            example_id
            for scored in self.train_results
            for example_id, result in scored.results.items()
            if result.score < 1.0
        )
        return sorted(shuffled, key=lambda e: -wrong[e.id])[:count]

    # -- scoring ---------------------------------------------------------------------------------

    async def _score_new(
        self, texts: Sequence[str], train: Sequence[Example], *, step: int, origin: str
    ) -> None:
        for text in texts:
            self.store.add_instruction(self.run_id, instruction_key(text), text, step, origin)
        scored = await self.scorer.score_many(texts, train, "train", step=step)
        for text, result in zip(texts, scored, strict=True):
            self.train_results.append(result)
            self.candidates[dedupe_key(text)] = _Candidate(
                text, step, len(self.candidates), result.score
            )
            self.seen.add(dedupe_key(text))
            log.info("candidate.scored", step=step, instruction=text, train=round(result.score, 4))

    def _best_train(self) -> float:
        return max((c.train for c in self.candidates.values()), default=0.0)

    def _reached_target(self, best: float) -> bool:
        target = self.settings.target_score
        return target is not None and best >= target

    async def _finish(self, splits: TaskSplits, stop_reason: str) -> OptimizationResult:
        ranked = sorted(self.candidates.values(), key=lambda c: (-c.train, c.order))
        finalists = ranked[: self.settings.validate_top]
        validation: dict[str, float] = {}
        if splits.validation:
            scored = await self.scorer.score_many(
                [c.text for c in finalists], splits.validation, "validation", step=-1
            )
            validation = {s.instruction: s.score for s in scored}
            winner = max(finalists, key=lambda c: (validation[c.text], c.train, -c.order))
        else:
            winner = finalists[0]
        # Only now, with the winner fixed, is the test split used.
        initial = [c.text for c in self.candidates.values() if c.step == 0]
        test: dict[str, float] = {}
        if splits.test:
            scored = await self.scorer.score_many(
                list(dict.fromkeys([winner.text, *initial])), splits.test, "test", step=-1
            )
            test = {s.instruction: s.score for s in scored}
        usage = self.store.usage(self.run_id)
        history = tuple(
            HistoryEntry(r.step, r.origin, r.instruction, r.train, r.validation, r.test)
            for r in self.store.history(self.run_id)
        )
        result = OptimizationResult(
            run_id=self.run_id,
            task=self.task.name,
            best_instruction=winner.text,
            scores={
                "train": winner.train,
                "validation": validation.get(winner.text),
                "test": test.get(winner.text),
            },
            baselines={text: test[text] for text in initial if text in test},
            history=history,
            calls={"optimizer": usage["optimizer_calls"], "scorer": usage["scorer_calls"]},
            tokens={"prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"]},
            wall_seconds=time.perf_counter() - self.started,
            stop_reason=stop_reason,
            instruction_position=self.task.instruction_position,
            input_fields=self.task.input_fields,
        )
        log.info(
            "run.done",
            run_id=self.run_id,
            best_instruction=winner.text,
            scores=dict(result.scores),
            test_gain=result.test_gain,
        )
        return result


async def evaluate_instruction(
    task: Task,
    instruction: str,
    *,
    scorer: Runnable[Any, Any] | None = None,
    target: Runnable[Any, Any] | None = None,
    split: str = "test",
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    config: RunnableConfig | None = None,
) -> InstructionScore:
    """Score one instruction on one split of a task, without optimizing."""
    if (scorer is None) == (target is None):
        raise ConfigError("give exactly one of scorer (a chat model) or target (a chain)")
    runnable: Runnable[Any, Any] = scorer if scorer is not None else target  # type: ignore[assignment]
    store = RunStore(":memory:")
    run_id = store.create_run(task.name, {"evaluate": instruction})
    evaluator = Scorer(
        task,
        Caller(runnable, tag="opro:scorer", retry=retry or RetryPolicy()),
        "chat_model" if scorer is not None else "chain",
        store=store,
        run_id=run_id,
        concurrency=concurrency,
        config=config,
    )
    return await evaluator.score(
        normalise_instruction(instruction), task.splits().get(split), split, step=-1
    )
