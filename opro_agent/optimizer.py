"""The optimizer as a LangChain Runnable: task in, result out.

`OproOptimizer` wires the models, the cache, the budget and the run store around a `Search`
of one strategy (OPRO by default). Every call it makes is stored in a `RunStore` as it
happens; invoking it with the `run_id` of a stored run replays the search from the store and
pays only for calls that were never made, so it reaches the same result. The object keeps no
state between invocations: a `.batch()` over several tasks gives independent runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog
from langchain_core.example_selectors import BaseExampleSelector
from langchain_core.load import dumpd
from langchain_core.runnables import Runnable, RunnableConfig

from opro_agent.budget import Meter, spend_from_usage
from opro_agent.candidates import normalise_instruction
from opro_agent.errors import ConfigError, RunStoreError
from opro_agent.llm_calls import Caller, CallPolicy, RetryPolicy
from opro_agent.prompts import Demonstrations
from opro_agent.result import OptimizationResult
from opro_agent.scorer import InstructionScore, Scorer, TargetKind
from opro_agent.search import Search
from opro_agent.settings import RunResources, SearchSettings
from opro_agent.store import RunStore
from opro_agent.strategies import Strategy, StrategySpec, make_strategy
from opro_agent.strategies.registry import split_run_config
from opro_agent.task import Task

__all__ = ["OproOptimizer", "call_policy", "evaluate_instruction", "model_identity", "run_sync"]

log = structlog.get_logger()
T = TypeVar("T")


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, also where an event loop is already
    running in this thread (Jupyter, an async application): there, in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="opro-agent") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def model_identity(runnable: Runnable[Any, Any]) -> str | None:
    """What a LangChain model's answers depend on (class, model, parameters, endpoint), from
    its serialized form; None when it is not serializable, so nothing is cached for it."""
    try:
        serialized = dumpd(runnable)
    except Exception:  # serialization is best effort for arbitrary Runnables
        return None
    text = json.dumps(serialized, sort_keys=True, default=str)
    return None if '"not_implemented"' in text else text


def _target(
    scorer: Runnable[Any, Any] | None, target: Runnable[Any, Any] | None
) -> tuple[Runnable[Any, Any], TargetKind]:
    if scorer is not None and target is None:
        return scorer, "chat_model"
    if target is not None and scorer is None:
        return target, "chain"
    raise ConfigError("give exactly one of scorer (a chat model) or target (a chain)")


def call_policy(
    role: str,
    runnable: Runnable[Any, Any],
    resources: RunResources,
    retry: RetryPolicy,
    meter: Meter,
    *,
    cacheable: bool = True,
) -> CallPolicy:
    """How a role's calls are made: retries, rate limits, cache (with the model's identity in
    its keys, so a different model never gets another's answers), budget and price."""
    identity = None
    if resources.cache is not None and cacheable:
        identity = resources.identities.get(role) or model_identity(runnable)
    return CallPolicy(
        retry=retry,
        rate_limit_errors=resources.rate_limit_errors,
        cache=resources.cache,
        identity=identity,
        meter=meter,
        limits=resources.rate_limits,
        price=resources.prices.get(role),
    )


def _demonstrations_config(demonstrations: Demonstrations | None) -> dict[str, Any]:
    """What a run's answers depend on besides the instruction: the fixed demonstrations'
    ids, or the example selector's repr (a retriever's says its index and K)."""
    if demonstrations is None:
        return {}
    if isinstance(demonstrations, BaseExampleSelector):
        return {"demonstrations": repr(demonstrations)}
    return {"demonstrations": [d.id for d in demonstrations]}


class OproOptimizer(Runnable[Task, OptimizationResult]):
    """Finds the instruction that makes the scorer answer a task best.

    Give `scorer` (a chat model, possibly wrapped with retries or fallbacks: it receives the
    scorer prompt's messages) or `target` (any Runnable taking a dict with `instruction` and
    the task's input fields, returning text or a message). `strategy` is a name (`opro`,
    `ape`, or one a plugin registers), a mapping with `name` and settings, or a strategy
    object such as `Ape(mode="reverse")`. `seed_optimizer_calls` passes each optimizer call
    its own `seed` (for OpenAI-compatible models), so sampling is reproducible call by call.
    `demonstrations` (fixed ones, or an example selector such as a trained retriever's) come
    before every question the scorer answers, so the instruction is tuned together with them.
    """

    def __init__(
        self,
        optimizer: Runnable[Any, Any],
        scorer: Runnable[Any, Any] | None = None,
        *,
        target: Runnable[Any, Any] | None = None,
        strategy: StrategySpec = "opro",
        settings: SearchSettings | None = None,
        resources: RunResources | None = None,
        store: RunStore | None = None,
        run_metadata: Mapping[str, Any] | None = None,
        seed_optimizer_calls: bool = False,
        demonstrations: Demonstrations | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.target, self.target_kind = _target(scorer, target)
        self.strategy: Strategy = make_strategy(strategy)
        self.settings = settings or SearchSettings()
        self.resources = resources or RunResources()
        self.store = store
        self.run_metadata = dict(run_metadata or {})
        self.seed_optimizer_calls = seed_optimizer_calls
        self.demonstrations = demonstrations

    def compile(self, task: Task, *, run_id: str | None = None) -> OptimizationResult:
        """DSPy-style alias of `invoke`."""
        return self.invoke(task, run_id=run_id)

    def invoke(
        self,
        input: Task,
        config: RunnableConfig | None = None,
        *,
        run_id: str | None = None,
        **kwargs: Any,
    ) -> OptimizationResult:
        return run_sync(self.ainvoke(input, config, run_id=run_id, **kwargs))

    async def ainvoke(
        self,
        input: Task,
        config: RunnableConfig | None = None,
        *,
        run_id: str | None = None,
        **kwargs: Any,
    ) -> OptimizationResult:
        """Run (or, with the `run_id` of a stored run, resume) the search on a task."""
        self.strategy.check(input)
        store = self.store or RunStore(":memory:")
        run_id = (
            self._check_resume(store, input, run_id) if run_id else self._create_run(store, input)
        )
        session = store.start_session(run_id)
        status = "failed"
        try:
            result = await self._search(input, store, run_id, config).run()
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

    def prepare_run(self, task: Task) -> str:
        """Create a stored run for `task` without running it; `invoke(task, run_id=...)`
        runs it (so a caller knows the run id before anything can fail)."""
        if self.store is None:
            raise ConfigError("prepare_run needs a store (store=RunStore.open(...))")
        return self._create_run(self.store, task)

    def _create_run(self, store: RunStore, task: Task) -> str:
        config = {
            "task_path": task.source,
            "task_fingerprint": task.fingerprint(),
            "strategy": self.strategy.to_dict(),
            "settings": self.settings.to_dict(),
            "target_kind": self.target_kind,
            **_demonstrations_config(self.demonstrations),
            **self.run_metadata,
        }
        return store.create_run(task.name, config)

    def _check_resume(self, store: RunStore, task: Task, run_id: str) -> str:
        run = store.get_run(run_id)
        if run.config.get("task_fingerprint") != task.fingerprint():
            raise RunStoreError(
                f"run {run.id} was made with different task data or settings; "
                "start a new run instead of resuming"
            )
        strategy, settings = split_run_config(run.config)
        if strategy != self.strategy.to_dict():
            raise RunStoreError(f"run {run.id} was made with a different strategy or settings")
        if run.config.get("demonstrations") != _demonstrations_config(self.demonstrations).get(
            "demonstrations"
        ):
            raise RunStoreError(f"run {run.id} was made with different demonstrations")
        if (
            SearchSettings.from_dict(settings).result_affecting()
            != self.settings.result_affecting()
        ):
            raise RunStoreError(f"run {run.id} was made with different search settings")
        return run.id

    def _search(
        self, task: Task, store: RunStore, run_id: str, config: RunnableConfig | None
    ) -> Search:
        res = self.resources
        spent = spend_from_usage(store.usage(run_id), res.prices)
        meter = Meter(self.settings.budget, spent=spent, observer=res.observer)
        retry = self.settings.retry
        # Unseeded samples must stay random: only seeded optimizer calls are cacheable.
        proposer = Caller(
            self.optimizer,
            role="optimizer",
            policy=call_policy(
                "optimizer", self.optimizer, res, retry, meter, cacheable=self.seed_optimizer_calls
            ),
        )
        scorer = Scorer(
            task,
            Caller(
                self.target,
                role="scorer",
                policy=call_policy("scorer", self.target, res, retry, meter),
            ),
            self.target_kind,
            store=store,
            run_id=run_id,
            concurrency=self.settings.concurrency,
            failure_threshold=self.settings.failure_threshold,
            config=config,
            demonstrations=self.demonstrations,
        )
        return Search(
            task=task,
            strategy=self.strategy,
            settings=self.settings,
            store=store,
            run_id=run_id,
            proposer=proposer,
            scorer=scorer,
            meter=meter,
            prices=res.prices,
            observer=res.observer,
            seed_optimizer_calls=self.seed_optimizer_calls,
            config=config,
        )


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
    demonstrations: Demonstrations | None = None,
) -> InstructionScore:
    """Score one instruction on one split of a task, without optimizing; `demonstrations`
    (fixed, or an example selector) come before each question."""
    runnable, kind = _target(scorer, target)
    res = resources or RunResources()
    store = RunStore(":memory:")
    run_id = store.create_run(task.name, {"evaluate": instruction})
    meter = Meter(observer=res.observer)
    evaluator = Scorer(
        task,
        Caller(
            runnable,
            role="scorer",
            policy=call_policy("scorer", runnable, res, retry or RetryPolicy(), meter),
        ),
        kind,
        store=store,
        run_id=run_id,
        concurrency=concurrency,
        config=config,
        demonstrations=demonstrations,
    )
    return await evaluator.score(
        normalise_instruction(instruction), task.splits().get(split), split, step=-1
    )
