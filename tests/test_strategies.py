"""Strategies behind the seam: APE with scripted models, the registry and plugins, scoring
that starts where each proposal arrives, sync invoke inside a running event loop, and
independent runs from one optimizer object."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.messages import BaseMessage

from opro_agent import (
    Ape,
    ConfigError,
    Opro,
    OproOptimizer,
    RunStore,
    SearchSettings,
    Strategy,
    Task,
    make_strategy,
    strategy_types,
)
from opro_agent.candidates import instruction_key
from opro_agent.store import MIGRATIONS
from opro_agent.strategies import Proposal, SearchContext, StepCost
from opro_agent.strategies import registry as registry_module
from opro_agent.strategies.registry import split_run_config
from opro_agent.task import TaskSplits
from tests.conftest import FACTS, FAST_OPRO, optimizer_reply, scorer_reply
from tests.fakes import ScriptedChatModel

APE_REPLIES = {
    ("forward", 0): "answer the question with yes or no.",
    ("reverse", 0): "<INS>Think about it.</INS>",
    ("forward", 1): "The instruction was to ramble on.",
}


def ape_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    kind, idx = metadata["opro_kind"], metadata["opro_candidate"]
    if kind == "resample":
        if idx % 2:  # a variation that loses the meaning: it rambles, and loses the race
            return f"<INS>Say whatever, variation {metadata['opro_step']}.{idx}.</INS>"
        return f"<INS>Reply yes or no, variation {metadata['opro_step']}.{idx}.</INS>"
    if (kind, idx) == ("reverse", 1):  # copies the first demonstration it was shown
        shown = re.search(r"Input: (.*)", messages[0].text)
        assert shown is not None
        return f"Sure! <INS>{shown.group(1)}</INS>"
    return APE_REPLIES.get((kind, idx), "<INS>Reply with yes or no.</INS>")


def _ape_run(task: Task, store: RunStore, **settings: Any) -> tuple[Any, ScriptedChatModel]:
    optimizer = ScriptedChatModel(respond=ape_reply)
    strategy = Ape(proposals=4, demos=3, resample_top=2, variations=2, **settings)
    result = OproOptimizer(
        optimizer,
        ScriptedChatModel(respond=scorer_reply),
        strategy=strategy,
        settings=SearchSettings(steps=3, concurrency=4),
        store=store,
    ).invoke(task)
    return result, optimizer


def test_ape_induces_races_and_resamples(yes_no_task: Task) -> None:
    store = RunStore(":memory:")
    result, optimizer = _ape_run(yes_no_task, store)

    assert result.strategy == "ape"
    assert result.best_instruction == "Answer the question with yes or no."
    assert result.scores["test"] == 1.0
    by_text = {h.instruction: h for h in result.history}
    assert by_text["Answer the question with yes or no."].kind == "forward"
    assert by_text["Think about it."].kind == "reverse"
    assert by_text["Ramble on."].kind == "forward"  # the lead-in "The instruction was to" goes
    assert not any(q in by_text for q, _ in FACTS)  # echoes a demonstration: skipped
    # Steps 2 and 3 vary the two best instructions so far (their parents), twice each.
    for step in (2, 3):
        resampled = [h for h in result.history if h.step == step]
        assert len(resampled) == 4 and {h.kind for h in resampled} == {"resample"}
        best_before = sorted(
            (h for h in result.history if h.step < step and h.train is not None),
            key=lambda h: -h.train,  # type: ignore[operator]
        )
        assert {h.parent for h in resampled} <= {h.instruction for h in best_before[:2]}
        assert best_before[0].instruction in {h.parent for h in resampled}
    # Racing (multi-stage evaluation) is APE's selection: weak candidates stop early.
    assert result.saved_by_early_rejection > 0
    for h in result.history:
        if h.instruction.startswith("Say whatever"):
            assert h.train == 0.0 and h.validation is None
    # Every optimizer call is stored with its kind.
    db = store._db
    kinds = db.execute(
        "SELECT step, kind, COUNT(*) FROM optimizer_calls GROUP BY step, kind ORDER BY step, kind"
    ).fetchall()
    assert [tuple(k) for k in kinds] == [
        (1, "forward", 2),
        (1, "reverse", 2),
        (2, "resample", 4),
        (3, "resample", 4),
    ]
    assert result.calls["optimizer"] == len(optimizer.calls) == 12


def test_ape_shows_only_training_demonstrations(yes_no_task: Task) -> None:
    _, optimizer = _ape_run(yes_no_task, RunStore(":memory:"), mode="reverse")
    splits = yes_no_task.splits()
    held_out = {e.inputs["input"] for e in (*splits.validation, *splits.test)}
    train = {e.inputs["input"] for e in splits.train}
    induced = [c["prompt"] for c in optimizer.calls if c["metadata"]["opro_kind"] == "reverse"]
    assert len(induced) == 4
    for prompt in induced:
        assert not any(q in prompt for q in held_out)
        assert sum(q in prompt for q in train) == 3  # `demos` demonstrations each


def test_ape_reruns_identically(yes_no_task: Task) -> None:
    first, _ = _ape_run(yes_no_task, RunStore(":memory:"))
    second, _ = _ape_run(yes_no_task, RunStore(":memory:"))
    assert first.history == second.history and first.calls == second.calls


# -- choosing strategies -------------------------------------------------------------------------


def test_strategies_are_chosen_by_name_with_settings() -> None:
    assert set(strategy_types()) >= {"opro", "ape", "protegi", "pe2"}
    ape = make_strategy({"name": "ape", "mode": "reverse", "proposals": 3})
    assert isinstance(ape, Ape) and ape.mode == "reverse" and ape.proposals == 3
    assert make_strategy(ape, {"variations": 5}) == Ape(mode="reverse", proposals=3, variations=5)
    assert make_strategy("opro") == Opro()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", r"strategy: no strategy 'nope' \(known: .*ape.*opro"),
        ({"name": "ape", "candidates_per_step": 3}, "strategy ape has no setting 'candidates_"),
        ({"name": "ape", "mode": "sideways"}, "strategy ape: mode must be one of 'forward'"),
        ({"name": "ape", "proposals": 2.5}, "proposals must be a whole number, got 2.5"),
        ({"name": "ape", "proposals": True}, "proposals must be a whole number, got True"),
        ({"name": "protegi", "exploration": "high"}, "exploration must be a number"),
        ({"name": "opro", "candidates_per_step": 0}, "must be at least 1"),
        ({"name": "opro", "meta_prompt": "missing"}, "no meta-prompt 'missing'"),
        ({"mode": "reverse"}, "no strategy None"),
    ],
)
def test_bad_strategy_specs_are_one_clear_error(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_strategy(spec)


@dataclass(frozen=True)
class AskNothing(Strategy):
    """A plugin strategy: proposes the same instruction every step, without an optimizer."""

    name: ClassVar[str] = "constant"
    text: str = "Answer with yes or no."

    def step_cost(self, step: int, splits: TaskSplits) -> StepCost:
        return StepCost(0, len(splits.train))

    def sample_prompt(self, task: Task) -> list[tuple[str, str]]:
        return []

    async def step(self, ctx: SearchContext, step: int) -> None:
        async def propose() -> Proposal:
            return Proposal(f"{self.text} ({step})", "constant")

        await ctx.evaluate([propose()], step=step)


@dataclass
class _EntryPoint:
    name: str
    target: Any

    def load(self) -> Any:
        if isinstance(self.target, Exception):
            raise self.target
        return self.target


def test_a_strategy_plugin_is_found_through_its_entry_point(
    yes_no_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = [
        _EntryPoint("constant", AskNothing),
        _EntryPoint("broken", ImportError("no module named 'gone'")),
        _EntryPoint("not_a_strategy", dict),
    ]
    monkeypatch.setattr(
        registry_module,
        "entry_points",
        lambda group: plugins if group == "opro_agent.strategies" else [],
    )
    assert set(strategy_types()) == {"opro", "ape", "protegi", "pe2", "constant"}
    result = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy={"name": "constant", "text": "Reply yes or no"},
        settings=SearchSettings(steps=2),
    ).invoke(yes_no_task)
    assert result.strategy == "constant"
    assert result.best_instruction == "Reply yes or no (1)"
    assert [h.kind for h in result.history] == ["initial", "constant", "constant"]
    assert result.calls["optimizer"] == 0


# -- scoring starts where each proposal arrives --------------------------------------------------


ARRIVED: dict[int, float] = {}


class _SlowProposals(ScriptedChatModel):
    """Proposal 0 arrives at once; proposal 1 only after a delay. Records when."""

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Any:
        idx = run_manager.metadata["opro_candidate"] if run_manager else 0
        await asyncio.sleep(0.3 * idx)
        result = self._reply(messages, run_manager)
        ARRIVED[idx] = time.perf_counter()
        return result


def test_scoring_starts_before_the_last_proposal_arrives(yes_no_task: Task) -> None:
    scored_at: list[tuple[float, str]] = []

    def scorer(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        prompt = "\n".join(m.text for m in messages)
        if metadata["opro_split"] == "train":
            scored_at.append((time.perf_counter(), prompt))
        return scorer_reply(messages, metadata)

    optimizer = _SlowProposals(
        respond=lambda m, meta: f"<INS>Answer yes or no, take {meta['opro_candidate']}.</INS>"
    )
    OproOptimizer(
        optimizer,
        ScriptedChatModel(respond=scorer),
        strategy=Opro(candidates_per_step=2),
        settings=SearchSettings(steps=1),
    ).invoke(yes_no_task)
    first = [t for t, prompt in scored_at if "take 0." in prompt]
    assert len(first) == 20  # the whole training split
    assert max(first) < ARRIVED[1]  # all scored before proposal 1 came back


# -- notebooks, batches ----------------------------------------------------------------------------


def test_sync_invoke_works_inside_a_running_event_loop(yes_no_task: Task) -> None:
    optimizer = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=FAST_OPRO,
        settings=SearchSettings(steps=1),
    )

    async def notebook_cell() -> str:
        return optimizer.invoke(yes_no_task).best_instruction  # as Jupyter would call it

    assert asyncio.run(notebook_cell()) == "Think about it."


def test_batch_gives_independent_runs(yes_no_task: Task) -> None:
    store = RunStore(":memory:")
    optimizer = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=FAST_OPRO,
        settings=SearchSettings(steps=2),
        store=store,
    )
    other = Task.from_records(
        "odd_numbers",
        [{"input": q, "target": "no" if a == "yes" else "yes"} for q, a in FACTS],
        metric="boolean",
        split=yes_no_task.split,
    )
    first, second = optimizer.batch([yes_no_task, other])
    assert first.run_id != second.run_id
    assert (first.task, second.task) == ("even_numbers", "odd_numbers")
    assert {r.task for r in store.list_runs()} == {"even_numbers", "odd_numbers"}
    alone = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=FAST_OPRO,
        settings=SearchSettings(steps=2),
    ).invoke(yes_no_task)
    assert alone.history == first.history


# -- the store's lineage migration ---------------------------------------------------------------


def test_a_store_from_before_strategies_is_migrated_and_resumable(
    tmp_path: Path, yes_no_task: Task
) -> None:
    path = tmp_path / "opro.db"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    legacy_settings = {
        **SearchSettings(steps=1, concurrency=4).to_dict(),
        **{k: v for k, v in FAST_OPRO.to_dict().items() if k != "name"},
    }
    del legacy_settings["budget"]
    config = {"task_fingerprint": yes_no_task.fingerprint(), "settings": legacy_settings}
    db.execute(
        "INSERT INTO runs (id, task, created_at, status, config) VALUES (?, ?, ?, ?, ?)",
        ("old", "even_numbers", 1.0, "interrupted", __import__("json").dumps(config)),
    )
    initial = "Let's solve the problem."
    db.execute(
        "INSERT INTO instructions VALUES (?, ?, ?, ?, ?)",
        ("old", instruction_key(initial), initial, 0, "initial"),
    )
    db.execute(
        "INSERT INTO optimizer_calls (run_id, step, idx, output, created_at)"
        " VALUES ('old', 1, 0, '<INS>Answer with yes or no.</INS>', 1.0)"
    )
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()

    store = RunStore(path)
    strategy, settings = split_run_config(store.get_run("old").config)
    assert strategy == FAST_OPRO.to_dict()
    assert SearchSettings.from_dict(settings).steps == 1
    optimizer = ScriptedChatModel(respond=optimizer_reply)
    result = OproOptimizer(
        optimizer,
        ScriptedChatModel(respond=scorer_reply),
        strategy=FAST_OPRO,
        settings=SearchSettings(steps=1, concurrency=4),
        store=store,
    ).invoke(yes_no_task, run_id="old")
    # Call 0 of step 1 was replayed from the old table, as a proposal.
    assert len(optimizer.calls) == 3
    assert result.best_instruction == "Answer with yes or no."
    assert result.history[0].kind == "initial"
    assert {h.kind for h in result.history[1:]} == {"proposal"}
