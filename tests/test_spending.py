"""Spending: the response cache, budgets, early rejection (racing), rate limits, the run
observer and the run store's schema migrations, with scripted models (no sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage, HumanMessage

from opro_agent import (
    Budget,
    BudgetExceededError,
    ConfigError,
    LLMCallsFailingError,
    OproOptimizer,
    OptimizationResult,
    Price,
    RateLimits,
    ResponseCache,
    RetryPolicy,
    RunResources,
    RunStore,
    RunStoreError,
    SearchSettings,
    SplitSpec,
    Strategy,
    Task,
)
from opro_agent.candidates import instruction_key
from opro_agent.llm_calls import Caller, CallPolicy
from opro_agent.search import racing_survivors
from opro_agent.store import MIGRATIONS
from tests.conftest import FACTS, FAST_OPRO, optimizer_reply, scorer_reply
from tests.fakes import Responder, ScriptedChatModel

IDS = {"optimizer": "o", "scorer": "s"}
TRAIN, VALIDATION, TEST = 20, 10, 30
RACING = dataclasses.replace(FAST_OPRO, early_rejection=True)
WINNER = "Answer with yes or no."
INITIAL = "Let's solve the problem."


@dataclass
class Outcome:
    result: OptimizationResult
    optimizer: ScriptedChatModel
    scorer: ScriptedChatModel
    store: RunStore


def _optimize(
    task: Task,
    settings: SearchSettings,
    *,
    resources: RunResources | None = None,
    store: RunStore | None = None,
    run_id: str | None = None,
    seed: bool = False,
    strategy: Strategy = FAST_OPRO,
    optimizer: Responder = optimizer_reply,
    scorer: Responder = scorer_reply,
) -> Outcome:
    store = store or RunStore(":memory:")
    optimizer_model = ScriptedChatModel(respond=optimizer, name_for_usage="o")
    scorer_model = ScriptedChatModel(respond=scorer, name_for_usage="s")
    result = OproOptimizer(
        optimizer_model,
        scorer_model,
        settings=settings,
        strategy=strategy,
        resources=resources,
        store=store,
        seed_optimizer_calls=seed,
    ).invoke(task, run_id=run_id)
    return Outcome(result, optimizer_model, scorer_model, store)


def _with(settings: SearchSettings, **changes: Any) -> SearchSettings:
    return dataclasses.replace(settings, **changes)


def _paid(result: OptimizationResult) -> int:
    return sum(result.calls.values())


def _train_counts(store: RunStore, run_id: str) -> Counter[str]:
    """Training examples each instruction was scored on, by instruction key."""
    return Counter(key for key, ev in store.iter_evaluations(run_id) if ev.split == "train")


def _evaluated(store: RunStore, run_id: str) -> dict[str, set[tuple[str, str]]]:
    seen: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for key, ev in store.iter_evaluations(run_id):
        seen[key].add((ev.split, ev.example_id))
    return dict(seen)


def _history(result: OptimizationResult) -> list[tuple[Any, ...]]:
    return [
        (h.step, h.origin, h.instruction, h.train, h.validation, h.test) for h in result.history
    ]


# -- response cache --------------------------------------------------------------------------------


def test_an_identical_second_run_is_answered_by_the_cache(
    yes_no_task: Task, fast_settings: SearchSettings, tmp_path: Path
) -> None:
    path = tmp_path / "cache" / "responses.db"
    first = _optimize(
        yes_no_task,
        fast_settings,
        resources=RunResources(cache=ResponseCache(path), identities=IDS),
    )
    assert first.result.cache_hits == 0
    assert first.result.calls["scorer"] == len(first.scorer.calls) > 0

    # A new optimizer, a new run store, the same cache file (reopened, as a new process would).
    second = _optimize(
        yes_no_task,
        fast_settings,
        resources=RunResources(cache=ResponseCache(path), identities=IDS),
    )
    assert second.scorer.calls == []
    assert second.result.calls["scorer"] == 0
    assert second.result.cache_hits == first.result.calls["scorer"]
    assert second.result.tokens["prompt"] < first.result.tokens["prompt"]  # cached: not paid
    assert second.result.best_instruction == first.result.best_instruction == WINNER
    assert second.result.scores == first.result.scores
    assert second.result.baselines == first.result.baselines
    assert _history(second.result) == _history(first.result)
    # Unseeded optimizer samples must stay random: they are paid for every time.
    assert second.result.calls["optimizer"] == len(second.optimizer.calls) == 12
    # The run store says which answers came from the cache.
    evaluations = list(second.store.iter_evaluations(second.result.run_id))
    assert evaluations and all(ev.cached for _, ev in evaluations)


@pytest.mark.parametrize(
    "resources",
    [
        pytest.param(lambda: RunResources(cache=None, identities=IDS), id="no-cache"),
        pytest.param(lambda: RunResources(cache=ResponseCache(":memory:")), id="no-identities"),
    ],
)
def test_nothing_is_cached_without_a_cache_or_a_model_identity(
    yes_no_task: Task, fast_settings: SearchSettings, resources: Any
) -> None:
    shared = resources()  # the same cache (if any) for both runs
    first = _optimize(yes_no_task, fast_settings, resources=shared, seed=True)
    second = _optimize(yes_no_task, fast_settings, resources=shared, seed=True)
    assert second.result.cache_hits == 0
    assert second.result.calls == first.result.calls
    assert len(second.scorer.calls) == len(first.scorer.calls) > 0
    assert len(second.optimizer.calls) == 12


@pytest.mark.parametrize(("seeded", "paid_again"), [(True, 0), (False, 12)])
def test_optimizer_calls_are_cached_only_when_seeded(
    yes_no_task: Task, fast_settings: SearchSettings, seeded: bool, paid_again: int
) -> None:
    resources = RunResources(cache=ResponseCache(":memory:"), identities=IDS)
    first = _optimize(yes_no_task, fast_settings, resources=resources, seed=seeded)
    second = _optimize(yes_no_task, fast_settings, resources=resources, seed=seeded)
    assert first.result.calls["optimizer"] == 12
    assert second.result.calls["optimizer"] == len(second.optimizer.calls) == paid_again
    assert second.result.calls["scorer"] == 0
    assert second.result.cache_hits == first.result.calls["scorer"] + (12 - paid_again)
    assert second.result.best_instruction == WINNER
    assert second.result.scores == first.result.scores


def test_a_different_model_identity_misses_the_cache(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    cache = ResponseCache(":memory:")
    first = _optimize(
        yes_no_task, fast_settings, resources=RunResources(cache=cache, identities=IDS)
    )
    other = {"optimizer": "o", "scorer": "another scorer"}
    second = _optimize(
        yes_no_task, fast_settings, resources=RunResources(cache=cache, identities=other)
    )
    assert second.result.cache_hits == 0
    assert len(second.scorer.calls) == first.result.calls["scorer"]
    # ... and the first identity's entries are still there.
    third = _optimize(
        yes_no_task, fast_settings, resources=RunResources(cache=cache, identities=IDS)
    )
    assert third.scorer.calls == []


def test_the_cache_key_includes_per_call_arguments() -> None:
    messages = [HumanMessage("Is 4 an even number?")]
    keys = {
        ResponseCache.key("m", messages, {}),
        ResponseCache.key("m", messages, {"seed": 1}),
        ResponseCache.key("m", messages, {"seed": 2}),
        ResponseCache.key("other", messages, {"seed": 1}),
        ResponseCache.key("m", [HumanMessage("Is 5 an even number?")], {"seed": 1}),
    }
    assert len(keys) == 5
    assert ResponseCache.key("m", messages, {"seed": 1}) == ResponseCache.key(
        "m", [HumanMessage("Is 4 an even number?")], {"seed": 1}
    )

    model = ScriptedChatModel(respond=lambda messages, metadata: "Yes.")
    caller = Caller(
        model,
        role="optimizer",
        policy=CallPolicy(cache=ResponseCache(":memory:"), identity="m"),
    )

    async def call(**kwargs: Any) -> bool:
        result = await caller(messages, config=None, metadata={}, **kwargs)
        assert result.text == "Yes."
        return result.cached

    cached = [asyncio.run(call(seed=s)) for s in (1, 1, 2, 2)]
    assert cached == [False, True, False, True]
    assert len(model.calls) == 2


# -- budgets ---------------------------------------------------------------------------------------


# fast_settings: initial scoring 20 calls; a step at most 4 + 4 * 20 = 84; the final
# evaluation at most (3 + 1) * 10 + 2 * 30 = 100. A step starts only if it and the final fit.
@pytest.mark.parametrize(
    ("max_calls", "best"),
    [(150, INITIAL), (250, WINNER)],  # 250: steps 1 and 2 fit, step 3 does not
)
def test_a_call_budget_stops_the_run_cleanly_and_keeps_the_final_evaluation(
    yes_no_task: Task, fast_settings: SearchSettings, max_calls: int, best: str
) -> None:
    out = _optimize(yes_no_task, _with(fast_settings, budget=Budget(max_calls=max_calls)))
    result = out.result
    assert result.stop_reason == "budget"
    assert _paid(result) <= max_calls
    assert _paid(result) == len(out.optimizer.calls) + len(out.scorer.calls)
    assert result.best_instruction == best
    assert result.scores["validation"] is not None
    assert result.scores["test"] is not None
    assert result.baselines.keys() == {INITIAL}
    assert out.store.get_run(result.run_id).status == "done"
    assert out.store.get_run(result.run_id).summary["stop_reason"] == "budget"  # type: ignore[index]


def test_a_budget_that_runs_out_in_the_final_evaluation_still_returns_a_result(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    out = _optimize(yes_no_task, _with(fast_settings, budget=Budget(max_calls=50)))
    assert out.result.stop_reason == "budget"
    # Calls still in flight when the budget runs out are cancelled: at most 50 are made.
    assert 50 - fast_settings.concurrency <= _paid(out.result) <= 50
    assert len(out.scorer.calls) <= 50
    assert out.result.best_instruction == INITIAL
    assert out.result.scores["validation"] == 0.0
    assert out.result.scores["test"] is None  # 20 + 10 + 30 > 50
    assert out.store.get_run(out.result.run_id).status == "done"


def test_a_budget_too_small_for_the_initial_instructions_is_an_error(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    store = RunStore(":memory:")
    scorer = ScriptedChatModel(respond=scorer_reply)
    optimizer = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        scorer,
        settings=_with(fast_settings, budget=Budget(max_calls=10)),
        strategy=FAST_OPRO,
        store=store,
    )
    run_id = optimizer.prepare_run(yes_no_task)
    with pytest.raises(
        BudgetExceededError, match="budget ran out before any instruction was scored"
    ):
        optimizer.invoke(yes_no_task, run_id=run_id)
    assert 0 < len(scorer.calls) <= 10
    assert run_id is not None
    assert store.usage(run_id)["scorer_calls"] <= 10
    assert store.get_run(run_id).status == "failed"


def test_a_resumed_run_counts_earlier_sessions_against_the_budget(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    store = RunStore(":memory:")
    first = _optimize(
        yes_no_task,
        _with(fast_settings, budget=Budget(max_calls=150)),
        store=store,
    )
    assert first.result.stop_reason == "budget"
    assert _paid(first.result) == 20 + 10 + 30  # initial scoring and the final evaluation

    # Step 1 and the final evaluation (84 + 90 calls) fit 200 calls, but not 200 - 60.
    second = _optimize(
        yes_no_task,
        _with(fast_settings, budget=Budget(max_calls=200)),
        store=store,
        run_id=first.result.run_id,
    )
    assert second.result.stop_reason == "budget"
    assert second.optimizer.calls == second.scorer.calls == []
    assert second.result.calls == first.result.calls
    assert second.result.best_instruction == first.result.best_instruction
    assert second.result.scores == first.result.scores


def test_resuming_a_budget_stopped_run_with_the_same_budget_reproduces_its_result(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    store = RunStore(":memory:")
    first = _optimize(
        yes_no_task,
        _with(fast_settings, budget=Budget(max_calls=250)),
        store=store,
    )
    assert first.result.best_instruction == WINNER  # steps 1 and 2 ran, step 3 did not fit
    run_id = first.result.run_id

    again = _optimize(
        yes_no_task,
        _with(fast_settings, budget=Budget(max_calls=250)),
        store=store,
        run_id=run_id,
    )
    # Replaying steps 1 and 2 from the store costs nothing: the same result, no new calls.
    assert again.scorer.calls == again.optimizer.calls == []
    assert again.result.best_instruction == WINNER
    assert again.result.scores == first.result.scores
    assert store.get_run(run_id).summary["best_instruction"] == WINNER  # type: ignore[index]


def test_a_budget_stopped_run_resumes_to_completion_with_a_bigger_budget(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    reference = _optimize(yes_no_task, fast_settings).result
    store = RunStore(":memory:")
    stopped = _optimize(
        yes_no_task,
        _with(fast_settings, budget=Budget(max_calls=150)),
        store=store,
    )
    assert stopped.result.stop_reason == "budget"
    resumed = _optimize(
        yes_no_task,
        _with(fast_settings, budget=Budget(max_calls=1000)),
        store=store,
        run_id=stopped.result.run_id,
    )
    assert resumed.result.stop_reason == "steps"
    assert resumed.result.best_instruction == reference.best_instruction
    assert resumed.result.scores == reference.scores
    # Nothing the first session paid for was paid again.
    new_calls = len(resumed.scorer.calls) + len(resumed.optimizer.calls)
    assert new_calls == _paid(resumed.result) - _paid(stopped.result)


PRICES = {"scorer": Price(100.0, 200.0), "optimizer": Price(300.0, 400.0)}


def _tokens(model: ScriptedChatModel) -> tuple[int, int]:
    """Prompt and completion tokens as the fake model reports them."""
    return (
        sum(len(c["prompt"].split()) for c in model.calls),
        sum(len(c["reply"].split()) for c in model.calls),
    )


@pytest.mark.parametrize(
    "budget",
    [
        pytest.param(Budget(max_tokens=2000), id="tokens"),
        pytest.param(Budget(max_cost=0.5), id="cost"),
        pytest.param(None, id="unlimited"),
    ],
)
def test_token_and_cost_budgets_and_the_reported_cost(
    yes_no_task: Task, fast_settings: SearchSettings, budget: Budget | None
) -> None:
    out = _optimize(
        yes_no_task,
        _with(fast_settings, budget=budget or Budget()),
        resources=RunResources(prices=PRICES),
    )
    result = out.result
    scorer_tokens, optimizer_tokens = _tokens(out.scorer), _tokens(out.optimizer)
    assert result.tokens == {
        "prompt": scorer_tokens[0] + optimizer_tokens[0],
        "completion": scorer_tokens[1] + optimizer_tokens[1],
    }
    expected = PRICES["scorer"].cost(*scorer_tokens) + PRICES["optimizer"].cost(*optimizer_tokens)
    assert result.cost == pytest.approx(expected, abs=1e-6)
    if budget is None:
        assert result.stop_reason == "steps"
        assert result.cost > 0.5 and sum(result.tokens.values()) > 2000  # type: ignore[operator]
        return
    assert result.stop_reason == "budget"
    assert result.scores["test"] is not None
    assert out.store.get_run(result.run_id).status == "done"
    if budget.max_cost is not None:
        assert result.cost <= budget.max_cost  # type: ignore[operator]
    if budget.max_tokens is not None:
        assert sum(result.tokens.values()) <= budget.max_tokens


def test_no_cost_is_reported_without_prices(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    assert _optimize(yes_no_task, fast_settings).result.cost is None


@pytest.mark.parametrize(
    ("limits", "flag"),
    [
        ({"max_calls": 0}, "--max-calls"),
        ({"max_tokens": -5}, "--max-tokens"),
        ({"max_cost": 0.0}, "--max-cost"),
    ],
)
def test_a_budget_must_be_positive(limits: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag) as caught:
        Budget(**limits)
    assert caught.value.field == flag


# -- early rejection (racing) --------------------------------------------------------------------


def test_racing_saves_scorer_calls_and_picks_the_same_winner(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    assert not FAST_OPRO.early_rejection and FAST_OPRO.first_stage == 5  # the defaults
    raced = _optimize(yes_no_task, fast_settings, strategy=RACING)
    full = _optimize(yes_no_task, fast_settings)

    assert raced.result.saved_by_early_rejection > 0
    assert full.result.saved_by_early_rejection == 0
    assert len(raced.scorer.calls) < len(full.scorer.calls)
    # Every call saved is one the full run made.
    assert (
        full.result.calls["scorer"] - raced.result.calls["scorer"]
        == raced.result.saved_by_early_rejection
    )
    assert raced.result.best_instruction == full.result.best_instruction == WINNER
    assert raced.result.scores == full.result.scores
    assert raced.result.baselines == full.result.baselines


def test_candidates_rejected_early_are_in_the_history_with_a_partial_train_score(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    out = _optimize(yes_no_task, fast_settings, strategy=RACING)
    run_id = out.result.run_id
    counts = _train_counts(out.store, run_id)
    rejected = {key: n for key, n in counts.items() if n < TRAIN}
    assert rejected, "some candidate should have been rejected early"
    assert set(rejected.values()) <= {5, 10}  # the racing stages before the whole split
    assert out.result.saved_by_early_rejection == sum(TRAIN - n for n in rejected.values())

    by_key = {instruction_key(h.instruction): h for h in out.result.history}
    assert set(counts) == set(by_key)  # every scored instruction is in the history
    for key in rejected:
        entry = by_key[key]
        assert entry.origin == "optimizer" and entry.step > 0
        train = [ev.score for k, ev in out.store.iter_evaluations(run_id) if k == key]
        assert entry.train == pytest.approx(sum(train) / len(train))
        assert entry.validation is None and entry.test is None
    assert counts[instruction_key(WINNER)] == TRAIN


def test_racing_keeps_the_better_half_and_ties_at_the_cut(
    fast_settings: SearchSettings,
) -> None:
    task = Task.from_records(
        "even_numbers",
        [{"input": q, "target": a} for q, a in FACTS],
        metric="boolean",
        initial_instructions=("Think about it.",),  # about half right: a non-zero incumbent
        split=SplitSpec(train=TRAIN, validation=VALIDATION, test=TEST, seed=1),
    )
    perfect = [f"Answer with yes or no, version {v}." for v in "ABC"]

    def propose(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        texts = [*perfect, "Say anything, version D."]  # the last one rambles: scores 0
        return f"<INS>{texts[metadata['opro_candidate']]}</INS>"

    out = _optimize(task, _with(fast_settings, steps=1), strategy=RACING, optimizer=propose)
    counts = _train_counts(out.store, out.result.run_id)
    incumbent = next(h.train for h in out.result.history if h.step == 0)
    assert incumbent is not None and 0 < incumbent < 1
    # The better half is two of the four; the third perfect one ties with them at the cut and
    # goes on too; the rambling one is dropped after the first stage.
    assert [counts[instruction_key(p)] for p in perfect] == [TRAIN] * 3
    assert counts[instruction_key("Say anything, version D.")] == 5
    assert out.result.saved_by_early_rejection == TRAIN - 5


def test_racing_is_deterministic(yes_no_task: Task, fast_settings: SearchSettings) -> None:
    first = _optimize(yes_no_task, fast_settings, strategy=RACING)
    second = _optimize(yes_no_task, fast_settings, strategy=RACING)
    assert _history(first.result) == _history(second.result)
    assert first.result.saved_by_early_rejection == second.result.saved_by_early_rejection
    assert _evaluated(first.store, first.result.run_id) == _evaluated(
        second.store, second.result.run_id
    )
    assert sorted(c["prompt"] for c in first.scorer.calls) == sorted(
        c["prompt"] for c in second.scorer.calls
    )


# -- rate limits ---------------------------------------------------------------------------------


class FakeRateLimit(Exception):
    """What a provider raises for HTTP 429."""


class _RateLimited:
    """A scorer that is rate limited on the first `times` calls of each prompt."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.attempts: Counter[str] = Counter()

    def __call__(self, messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        prompt = "\n".join(m.text for m in messages)
        self.attempts[prompt] += 1
        if self.attempts[prompt] <= self.times:
            raise FakeRateLimit("429 Too Many Requests")
        return scorer_reply(messages, metadata)


PATIENT = RetryPolicy(
    attempts=2,
    initial_wait=0.001,
    max_wait=0.002,
    rate_limit_attempts=6,
    rate_limit_max_wait=0.002,
)


def test_rate_limit_errors_are_retried_patiently_and_are_not_failures(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    settings = _with(fast_settings, retry=PATIENT)
    reference = _optimize(yes_no_task, settings).result
    limited = _RateLimited(times=3)  # more than `attempts`, fewer than `rate_limit_attempts`
    out = _optimize(
        yes_no_task,
        settings,
        resources=RunResources(rate_limit_errors=(FakeRateLimit,)),
        scorer=limited,
    )
    assert out.store.failed_evaluations(out.result.run_id) == 0
    assert set(limited.attempts.values()) == {4}  # three 429s, then the answer
    assert out.result.best_instruction == reference.best_instruction
    assert out.result.scores == reference.scores
    assert out.result.calls == reference.calls  # retried 429s are not extra calls


def test_without_rate_limit_errors_the_same_429s_are_failures(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    store = RunStore(":memory:")
    optimizer = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=_RateLimited(times=3)),
        settings=_with(fast_settings, retry=PATIENT),
        store=store,
    )
    run_id = optimizer.prepare_run(yes_no_task)
    with pytest.raises(LLMCallsFailingError, match="FakeRateLimit"):
        optimizer.invoke(yes_no_task, run_id=run_id)
    assert run_id is not None
    assert store.failed_evaluations(run_id) >= 5


def test_generous_rate_limits_do_not_change_the_result(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    reference = _optimize(yes_no_task, fast_settings).result
    limited = _optimize(
        yes_no_task,
        fast_settings,
        resources=RunResources(rate_limits=RateLimits(rpm=1_000_000, tpm=1_000_000_000)),
    ).result
    assert limited.best_instruction == reference.best_instruction
    assert limited.scores == reference.scores
    assert limited.calls == reference.calls
    assert _history(limited) == _history(reference)


@pytest.mark.parametrize(
    ("rpm", "tpm", "tokens"),
    [
        (None, None, 10),
        (None, 5, 10_000),  # a request larger than the minute's allowance does not raise
        (1_000, None, 10),
    ],
)
def test_rate_limits_acquire_at_once_when_there_is_capacity(
    rpm: float | None, tpm: float | None, tokens: int
) -> None:
    limits = RateLimits(rpm=rpm, tpm=tpm)

    async def acquire() -> float:
        started = time.perf_counter()
        await asyncio.wait_for(limits.acquire(tokens), timeout=2)
        return time.perf_counter() - started

    assert asyncio.run(acquire()) < 0.5


# -- observer ------------------------------------------------------------------------------------


@dataclass
class Recorder:
    plans: list[int] = field(default_factory=list)
    calls: list[tuple[str, bool, int, float]] = field(default_factory=list)
    steps: list[tuple[int, float]] = field(default_factory=list)

    def on_plan(self, calls: int) -> None:
        self.plans.append(calls)

    def on_call(self, role: str, *, cached: bool, tokens: int, cost: float) -> None:
        self.calls.append((role, cached, tokens, cost))

    def on_step(self, step: int, best_train: float) -> None:
        self.steps.append((step, best_train))


def test_the_observer_hears_every_call_step_and_plan(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    cache = ResponseCache(":memory:")
    runs = []
    for _ in range(2):  # the second run is answered by the cache
        recorder = Recorder()
        resources = RunResources(cache=cache, identities=IDS, observer=recorder, prices=PRICES)
        runs.append((recorder, _optimize(yes_no_task, fast_settings, resources=resources)))

    for recorder, out in runs:
        result = out.result
        paid = [c for c in recorder.calls if not c[1]]
        cached = [c for c in recorder.calls if c[1]]
        assert len(paid) == _paid(result)
        assert len(cached) == result.cache_hits
        assert sum(c[2] for c in paid) == sum(result.tokens.values())
        assert sum(c[3] for c in recorder.calls) == pytest.approx(result.cost, abs=1e-6)
        assert all(c[3] == 0.0 for c in cached)  # a cache hit costs nothing
        roles = Counter("scorer" if "scorer" in c[0] else "optimizer" for c in paid)
        assert roles == {k: v for k, v in result.calls.items() if v}

        assert [s for s, _ in recorder.steps] == [0, 1, 2, 3]
        assert [b for _, b in recorder.steps] == [0.0, 0.5, 1.0, 1.0]
        # (1 initial + 3 steps * 4) * 20 train + 4 * 10 validation + 2 * 30 test + 12 proposals
        assert recorder.plans[0] == 13 * TRAIN + 4 * VALIDATION + 2 * TEST + 12
        assert all(p > 0 for p in recorder.plans)

    (_, first), (_, second) = runs
    assert first.result.cache_hits == 0
    assert second.result.cache_hits == first.result.calls["scorer"] > 0


# -- run store migrations ------------------------------------------------------------------------


def _version_1_store(path: Path, user_version: int = 1) -> None:
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO runs (id, task, created_at, status, config) VALUES (?, ?, ?, ?, ?)",
        ("run-1", "even_numbers", 1.0, "done", "{}"),
    )
    db.execute(
        "INSERT INTO instructions VALUES (?, ?, ?, ?, ?)",
        ("run-1", instruction_key(WINNER), WINNER, 0, "initial"),
    )
    db.execute(
        "INSERT INTO evaluations (run_id, instruction_key, split, example_id, prediction, score,"
        " prompt_tokens, completion_tokens, latency, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("run-1", instruction_key(WINNER), "train", "ex-1", "Yes.", 1.0, 12, 2, 0.1, 1.0),
    )
    db.execute(
        "INSERT INTO optimizer_calls (run_id, step, idx, output, prompt_tokens,"
        " completion_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("run-1", 1, 0, "<INS>x</INS>", 100, 5, 1.0),
    )
    db.execute(f"PRAGMA user_version = {user_version}")
    db.commit()
    db.close()


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "opro.db"
    _version_1_store(path)
    store = RunStore(path)

    assert store.get_run("run-1").task == "even_numbers"
    evaluations = store.evaluations("run-1", instruction_key(WINNER))
    assert list(evaluations) == ["ex-1"]
    assert evaluations["ex-1"].score == 1.0 and evaluations["ex-1"].cached is False
    assert store.usage("run-1") == {
        "cache_hits": 0,
        "optimizer_calls": 1,
        "optimizer_prompt_tokens": 100,
        "optimizer_completion_tokens": 5,
        "scorer_calls": 1,
        "scorer_prompt_tokens": 12,
        "scorer_completion_tokens": 2,
        "prompt_tokens": 112,
        "completion_tokens": 7,
    }
    store.close()

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("SELECT cached FROM evaluations").fetchall() == [(0,)]
    assert db.execute("SELECT cached FROM optimizer_calls").fetchall() == [(0,)]
    db.close()

    store = RunStore(path)  # opening a current store again changes nothing
    assert list(store.evaluations("run-1", instruction_key(WINNER))) == ["ex-1"]
    store.close()


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "opro.db"
    _version_1_store(path, user_version=len(MIGRATIONS) + 1)
    with pytest.raises(RunStoreError, match="newer"):
        RunStore(path)


def test_a_file_that_is_not_a_run_store_is_refused_with_a_run_store_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "opro.db"
    path.write_text("not a database\n" * 100)
    with pytest.raises(RunStoreError, match=str(path)):
        RunStore(path)


@pytest.mark.parametrize(
    ("scores", "incumbent", "survivors"),
    [
        # the better half go on
        ({"a": 1.0, "b": 0.8, "c": 0.4, "d": 0.2}, 0.9, {"a", "b"}),
        # ties at the cut go on too
        ({"a": 1.0, "b": 0.6, "c": 0.6, "d": 0.2}, 0.9, {"a", "b", "c"}),
        # a worse-half candidate at or above the incumbent is still a contender
        ({"a": 1.0, "b": 0.8, "c": 0.4, "d": 0.2}, 0.4, {"a", "b", "c"}),
        # an odd cohort keeps the larger half
        ({"a": 0.2, "b": 0.4, "c": 0.0}, 1.0, {"a", "b"}),
        ({"a": 0.0}, 1.0, {"a"}),
    ],
)
def test_racing_survivors(scores: dict[str, float], incumbent: float, survivors: set[str]) -> None:
    assert racing_survivors(scores, incumbent) == survivors
