"""The OPRO loop: meta-prompt -> optimizer LLM -> candidates -> scorer -> history -> result.

`OproOptimizer` is a LangChain Runnable (task in, result out). Every call it makes is stored
in a `RunStore` as it happens; running it again on a stored run replays the loop from the
store and pays only for calls that were never made, so it reaches the same result.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from langchain_core.load import dumpd
from langchain_core.runnables import Runnable, RunnableConfig

from opro_agent.budget import Meter, Spend
from opro_agent.candidates import (
    dedupe_key,
    instruction_key,
    normalise_instruction,
    parse_instruction,
)
from opro_agent.errors import BudgetExceededError, ConfigError, LLMCallsFailingError, RunStoreError
from opro_agent.estimate import final_calls, step_calls
from opro_agent.llm_calls import Caller, CallPolicy, RetryPolicy
from opro_agent.meta_prompt import (
    Exemplar,
    Message,
    MetaPromptTemplate,
    ScoredInstruction,
    exemplar_prompt,
)
from opro_agent.result import HistoryEntry, OptimizationResult
from opro_agent.scorer import InstructionScore, Scorer, TargetKind, gather_all
from opro_agent.settings import OproSettings, RunResources
from opro_agent.store import OptimizerCall, RunStore
from opro_agent.task import Example, Task, TaskSplits

__all__ = ["OproOptimizer", "evaluate_instruction", "model_identity", "racing_survivors"]

log = structlog.get_logger()


def model_identity(runnable: Runnable[Any, Any]) -> str | None:
    """What a LangChain model's answers depend on (class, model, parameters, endpoint), from
    its serialized form; None when it is not serializable, so nothing is cached for it."""
    try:
        serialized = dumpd(runnable)
    except Exception:  # serialization is best effort for arbitrary Runnables
        return None
    text = json.dumps(serialized, sort_keys=True, default=str)
    return None if '"not_implemented"' in text else text


def racing_survivors(scores: Mapping[str, float], incumbent: float) -> set[str]:
    """Successive halving that never drops a contender: the better half go on (ties at the
    cut too), and so does any candidate scoring at or above `incumbent` (the best full-train
    score so far)."""
    ranked = sorted(scores.values(), reverse=True)
    cut = min(ranked[math.ceil(len(ranked) / 2) - 1], incumbent)
    return {text for text, score in scores.items() if score >= cut}


@dataclass
class _Candidate:
    text: str
    step: int
    order: int
    train: float
    full: bool  # scored on every training example (not rejected early)


class OproOptimizer(Runnable[Task, OptimizationResult]):
    """Finds the instruction that makes the scorer answer a task best (OPRO).

    Give `scorer` (a chat model, possibly wrapped with retries or fallbacks: it receives the
    scorer prompt's messages) or `target` (any Runnable taking a dict with `instruction` and
    the task's input fields, returning text or a message). With `store` and `run_id` naming
    a stored run, the run is resumed. `seed_optimizer_calls` passes each optimizer call its
    own `seed` (for OpenAI-compatible models), so sampling is reproducible call by call.
    """

    def __init__(
        self,
        optimizer: Runnable[Any, Any],
        scorer: Runnable[Any, Any] | None = None,
        *,
        target: Runnable[Any, Any] | None = None,
        settings: OproSettings | None = None,
        resources: RunResources | None = None,
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
        self.resources = resources or RunResources()
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
            stored = OproSettings.from_dict(run.config["settings"]).result_affecting()
            if stored != self.settings.result_affecting():
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
        res = self.resources = owner.resources
        self.observer = res.observer
        self.meter = Meter(res.budget, spent=self._spent_before(), observer=res.observer)
        self.seed_calls = owner.seed_optimizer_calls

        def policy(role: str, runnable: Runnable[Any, Any], cacheable: bool) -> CallPolicy:
            identity = None
            if res.cache is not None and cacheable:
                identity = res.identities.get(role) or model_identity(runnable)
            return CallPolicy(
                retry=self.settings.retry,
                rate_limit_errors=res.rate_limit_errors,
                cache=res.cache,
                identity=identity,
                meter=self.meter,
                limits=res.rate_limits,
                price=res.prices.get(role),
            )

        # Unseeded samples must stay random: only seeded optimizer calls are cacheable.
        self.proposer = Caller(
            owner.optimizer,
            role="optimizer",
            policy=policy("optimizer", owner.optimizer, self.seed_calls),
        )
        self.scorer = Scorer(
            task,
            Caller(owner.target, role="scorer", policy=policy("scorer", owner.target, True)),
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
        self.saved_calls = 0

    def _spent_before(self) -> Spend:
        """What this run has spent so far (all sessions): the budget covers the whole run."""
        usage = self.store.usage(self.run_id)
        cost = 0.0
        for role in ("optimizer", "scorer"):
            price = self.resources.prices.get(role)
            if price is not None:
                cost += price.cost(
                    usage[f"{role}_prompt_tokens"], usage[f"{role}_completion_tokens"]
                )
        return Spend(
            calls=usage["optimizer_calls"] + usage["scorer_calls"],
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            cost=cost,
        )

    async def execute(self) -> OptimizationResult:
        splits = self.task.splits()
        initial = [normalise_instruction(i) for i in self.task.initial_instructions]
        stop_reason = "steps"
        try:
            self._plan(splits, self.settings.steps)
            await self._score_initial(list(dict.fromkeys(initial)), splits.train)
            stop_reason = await self._search(splits)
        except BudgetExceededError as exc:
            log.warning("budget.spent", reason=str(exc))
            stop_reason = "budget"
        if not any(c.full for c in self.candidates.values()):
            raise BudgetExceededError(
                "the budget ran out before the initial instructions were scored; raise it"
            )
        return await self._finish(splits, stop_reason)

    async def _search(self, splits: TaskSplits) -> str:
        best, stale = self._best_train(), 0
        log.info("step.done", step=0, best_train=best)
        self._notify_step(0, best)
        for step in range(1, self.settings.steps + 1):
            if self._reached_target(best):
                return "target_score"
            # A step an earlier session began replays from the store; it is not charged again.
            replayed = self.store.optimizer_call(self.run_id, step, 0) is not None
            needed = self._step_calls(splits) + self._final_calls(splits)
            if not replayed and not self.meter.affordable(needed):
                log.warning("budget.stop", step=step, spent=self.meter.spent.calls)
                return "budget"
            texts = await self._propose(step, splits.train)
            await self._score_candidates(texts, splits.train, step)
            new_best = self._best_train()
            stale = 0 if new_best > best else stale + 1
            best = new_best
            log.info("step.done", step=step, candidates=len(texts), best_train=best, stale=stale)
            self._notify_step(step, best)
            self._plan(splits, self.settings.steps - step)
            if self.settings.patience is not None and stale >= self.settings.patience:
                return "patience"
        return "target_score" if self._reached_target(best) else "steps"

    # -- planning --------------------------------------------------------------------------------

    def _step_calls(self, splits: TaskSplits) -> int:
        return step_calls(self.settings, splits)

    def _final_calls(self, splits: TaskSplits) -> int:
        return final_calls(self.settings, splits, len(set(self.task.initial_instructions)))

    def _plan(self, splits: TaskSplits, steps_left: int) -> None:
        if self.observer is not None:
            initial = 0 if self.candidates else len(set(self.task.initial_instructions))
            self.observer.on_plan(
                initial * len(splits.train)
                + steps_left * self._step_calls(splits)
                + self._final_calls(splits)
            )

    def _notify_step(self, step: int, best: float) -> None:
        if self.observer is not None:
            self.observer.on_step(step, best)

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
                    "candidate.skipped",
                    step=step,
                    idx=idx,
                    reason=reason,
                    output=call.output[:200],
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
            call = OptimizerCall(
                result.text,
                None,
                result.prompt_tokens,
                result.completion_tokens,
                cached=result.cached,
            )
        except BudgetExceededError:
            raise
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

    async def _score_initial(self, texts: Sequence[str], train: Sequence[Example]) -> None:
        for text in texts:
            self.store.add_instruction(self.run_id, instruction_key(text), text, 0, "initial")
        for result in await self.scorer.score_many(texts, train, "train", step=0):
            self._add(result, 0, full=True)

    async def _score_candidates(
        self, texts: Sequence[str], train: Sequence[Example], step: int
    ) -> None:
        """Score new candidates on the training set, racing them if early rejection is on."""
        for text in texts:
            self.store.add_instruction(self.run_id, instruction_key(text), text, step, "optimizer")
        # One fixed order for the whole run: stages are nested prefixes of it, and a resumed
        # run races on the same examples.
        order = random.Random(f"{self.settings.seed}:race").sample(list(train), len(train))
        size = self.settings.first_stage if self.settings.early_rejection else len(order)
        alive = list(texts)
        while alive:
            size = min(size, len(order))
            scored = await self.scorer.score_many(alive, order[:size], "train", step=step)
            if size == len(order):
                for result in scored:
                    self._add(result, step, full=True)
                return
            keep = racing_survivors({r.instruction: r.score for r in scored}, self._best_train())
            for result in scored:
                if result.instruction not in keep:
                    self._add(result, step, full=False)
                    self.saved_calls += len(order) - size
                    log.info(
                        "candidate.rejected_early",
                        step=step,
                        instruction=result.instruction,
                        train_subset=round(result.score, 4),
                        examples=size,
                    )
            alive = [r.instruction for r in scored if r.instruction in keep]
            size *= 2

    def _add(self, result: InstructionScore, step: int, *, full: bool) -> None:
        key = dedupe_key(result.instruction)
        self.train_results.append(result)
        self.candidates[key] = _Candidate(
            result.instruction, step, len(self.candidates), result.score, full
        )
        self.seen.add(key)
        if full:
            log.info(
                "candidate.scored",
                step=step,
                instruction=result.instruction,
                train=round(result.score, 4),
            )

    def _best_train(self) -> float:
        return max((c.train for c in self.candidates.values() if c.full), default=0.0)

    def _reached_target(self, best: float) -> bool:
        target = self.settings.target_score
        return target is not None and best >= target

    async def _finish(self, splits: TaskSplits, stop_reason: str) -> OptimizationResult:
        ranked = sorted(
            (c for c in self.candidates.values() if c.full), key=lambda c: (-c.train, c.order)
        )
        finalists = ranked[: self.settings.validate_top]
        initial = [c.text for c in self.candidates.values() if c.step == 0]
        validation: dict[str, float] = {}
        test: dict[str, float] = {}
        winner = finalists[0]
        try:
            if splits.validation:
                scored = await self.scorer.score_many(
                    [c.text for c in finalists], splits.validation, "validation", step=-1
                )
                validation = {s.instruction: s.score for s in scored}
                winner = max(finalists, key=lambda c: (validation[c.text], c.train, -c.order))
            # Only now, with the winner fixed, is the test split used.
            if splits.test:
                scored = await self.scorer.score_many(
                    list(dict.fromkeys([winner.text, *initial])), splits.test, "test", step=-1
                )
                test = {s.instruction: s.score for s in scored}
        except BudgetExceededError as exc:
            log.warning("budget.spent", reason=str(exc), phase="final evaluation")
            stop_reason = "budget"
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
            cost=round(self._spent_before().cost, 6) if self.resources.prices else None,
            cache_hits=usage["cache_hits"],
            saved_by_early_rejection=self.saved_calls,
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
            stop_reason=stop_reason,
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
    resources: RunResources | None = None,
    retry: RetryPolicy | None = None,
    config: RunnableConfig | None = None,
) -> InstructionScore:
    """Score one instruction on one split of a task, without optimizing."""
    if (scorer is None) == (target is None):
        raise ConfigError("give exactly one of scorer (a chat model) or target (a chain)")
    runnable: Runnable[Any, Any] = scorer if scorer is not None else target  # type: ignore[assignment]
    res = resources or RunResources()
    store = RunStore(":memory:")
    run_id = store.create_run(task.name, {"evaluate": instruction})
    identity = res.identities.get("scorer") or model_identity(runnable) if res.cache else None
    policy = CallPolicy(
        retry=retry or RetryPolicy(),
        rate_limit_errors=res.rate_limit_errors,
        cache=res.cache,
        identity=identity,
        meter=Meter(res.budget, observer=res.observer),
        limits=res.rate_limits,
        price=res.prices.get("scorer"),
    )
    evaluator = Scorer(
        task,
        Caller(runnable, role="scorer", policy=policy),
        "chat_model" if scorer is not None else "chain",
        store=store,
        run_id=run_id,
        concurrency=concurrency,
        config=config,
    )
    return await evaluator.score(
        normalise_instruction(instruction), task.splits().get(split), split, step=-1
    )
