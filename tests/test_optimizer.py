"""The OPRO loop end to end with scripted models: it must find the better instruction."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import structlog
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from opro_agent import (
    LLMCallsFailingError,
    OproOptimizer,
    RunStore,
    RunStoreError,
    SearchSettings,
    Task,
    evaluate_instruction,
)
from tests.conftest import FACTS, FAST_OPRO, optimizer_reply, scorer_reply, split_settings
from tests.fakes import ScriptedChatModel


def _optimizer_prompts(model: ScriptedChatModel) -> list[str]:
    return [c["prompt"] for c in model.calls]


def test_loop_finds_the_better_instruction(
    yes_no_task: Task,
    optimizer_model: ScriptedChatModel,
    scorer_model: ScriptedChatModel,
    fast_settings: SearchSettings,
) -> None:
    store = RunStore(":memory:")
    result = OproOptimizer(
        optimizer_model, scorer_model, settings=fast_settings, strategy=FAST_OPRO, store=store
    ).invoke(yes_no_task)

    assert result.best_instruction == "Answer with yes or no."
    assert result.scores == {"train": 1.0, "validation": 1.0, "test": 1.0}
    assert result.baselines == {"Let's solve the problem.": 0.0}
    assert result.test_gain == 1.0
    # Accounting agrees with what the models actually answered.
    assert result.calls == {
        "optimizer": len(optimizer_model.calls),
        "scorer": len(scorer_model.calls),
    }
    assert result.tokens["completion"] == sum(
        len(c["reply"].split()) for c in optimizer_model.calls + scorer_model.calls
    )
    assert store.get_run(result.run_id).status == "done"


def test_candidates_are_parsed_deduped_and_filtered(
    yes_no_task: Task,
    optimizer_model: ScriptedChatModel,
    scorer_model: ScriptedChatModel,
    fast_settings: SearchSettings,
) -> None:
    with structlog.testing.capture_logs() as logs:
        result = OproOptimizer(
            optimizer_model, scorer_model, settings=fast_settings, strategy=FAST_OPRO
        ).invoke(yes_no_task)
    texts = [h.instruction for h in result.history]
    assert texts.count("Think about it.") == 1
    assert "Be brief" in texts  # an unclosed tag still yields the instruction
    assert all(len(t) <= 500 for t in texts)
    reasons = sorted(e["reason"] for e in logs if e["event"] == "candidate.skipped")
    assert reasons == ["duplicate", "too_long", "unparseable", "unparseable"]


def test_the_test_split_is_never_shown_to_the_optimizer(
    yes_no_task: Task,
    optimizer_model: ScriptedChatModel,
    scorer_model: ScriptedChatModel,
    fast_settings: SearchSettings,
) -> None:
    store = RunStore(":memory:")
    result = OproOptimizer(
        optimizer_model, scorer_model, settings=fast_settings, strategy=FAST_OPRO, store=store
    ).invoke(yes_no_task)
    splits = yes_no_task.splits()
    test_questions = {e.inputs["input"] for e in splits.test}
    for prompt in _optimizer_prompts(optimizer_model):
        assert not any(q in prompt for q in test_questions)
    test_ids = {e.id for e in splits.test}
    tested = {key for key, ev in store.iter_evaluations(result.run_id) if ev.split == "test"}
    assert len(tested) == 2  # the winner and the one initial instruction, nothing else
    for _, ev in store.iter_evaluations(result.run_id):
        assert (ev.example_id in test_ids) == (ev.split == "test")


class _Interrupt:
    """An optimizer reply function that presses Ctrl-C when step `at` begins."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        if metadata["opro_step"] == self.at:
            raise KeyboardInterrupt
        return optimizer_reply(messages, metadata)


def test_interrupted_run_resumes_to_the_same_result_without_repeating_calls(
    yes_no_task: Task, fast_settings: SearchSettings, tmp_path: Path
) -> None:
    reference_scorer = ScriptedChatModel(respond=scorer_reply, name_for_usage="s")
    reference = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply, name_for_usage="o"),
        reference_scorer,
        settings=fast_settings,
        strategy=FAST_OPRO,
    ).invoke(yes_no_task)

    store = RunStore.open(tmp_path)
    first_scorer = ScriptedChatModel(respond=scorer_reply, name_for_usage="s")
    interrupted = OproOptimizer(
        ScriptedChatModel(respond=_Interrupt(at=2), name_for_usage="o"),
        first_scorer,
        settings=fast_settings,
        strategy=FAST_OPRO,
        store=store,
    )
    run_id = interrupted.prepare_run(yes_no_task)
    with pytest.raises(KeyboardInterrupt):
        interrupted.invoke(yes_no_task, run_id=run_id)
    run_id = run_id
    assert run_id is not None
    assert store.get_run(run_id).status == "interrupted"
    store.close()

    store = RunStore.open(tmp_path)  # as a new process would
    second_scorer = ScriptedChatModel(respond=scorer_reply, name_for_usage="s")
    resumed = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply, name_for_usage="o"),
        second_scorer,
        settings=fast_settings,
        strategy=FAST_OPRO,
        store=store,
    ).invoke(yes_no_task, run_id=run_id)

    assert resumed.run_id == run_id
    assert resumed.best_instruction == reference.best_instruction
    assert resumed.scores == reference.scores
    assert [(h.step, h.instruction, h.train) for h in resumed.history] == [
        (h.step, h.instruction, h.train) for h in reference.history
    ]
    assert first_scorer.calls, "the first session scored something before stopping"
    # No scorer call was paid twice: both sessions together made exactly the reference's calls.
    paid = [(c["metadata"]["opro_example_id"], c["prompt"]) for c in first_scorer.calls]
    paid += [(c["metadata"]["opro_example_id"], c["prompt"]) for c in second_scorer.calls]
    assert len(paid) == len(set(paid)) == len(reference_scorer.calls)
    assert resumed.calls == reference.calls


def _dead(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    raise ConnectionError("connection refused")


def test_dead_scorer_stops_the_run_with_a_clear_error_and_loses_nothing(
    yes_no_task: Task, fast_settings: SearchSettings, tmp_path: Path
) -> None:
    store = RunStore.open(tmp_path)
    optimizer = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=_dead),
        settings=fast_settings,
        strategy=FAST_OPRO,
        store=store,
    )
    run_id = optimizer.prepare_run(yes_no_task)
    with pytest.raises(LLMCallsFailingError, match=r"scorer calls failed.*ConnectionError"):
        optimizer.invoke(yes_no_task, run_id=run_id)
    assert run_id is not None
    assert store.get_run(run_id).status == "failed"
    assert store.failed_evaluations(run_id) >= 5

    # The server is back: the same run completes, and failed calls are tried again.
    result = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        settings=fast_settings,
        strategy=FAST_OPRO,
        store=store,
    ).invoke(yes_no_task, run_id=run_id)
    assert result.best_instruction == "Answer with yes or no."
    assert store.failed_evaluations(run_id) == 0


def test_a_few_failed_calls_score_zero_without_stopping(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    first_question = yes_no_task.splits().train[0].inputs["input"]

    def flaky(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        if first_question in messages[-1].text:
            raise TimeoutError("slow server")
        return scorer_reply(messages, metadata)

    store = RunStore(":memory:")
    result = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=flaky),
        settings=fast_settings,
        strategy=FAST_OPRO,
        store=store,
    ).invoke(yes_no_task)
    assert result.scores["train"] == pytest.approx(19 / 20)
    assert store.failed_evaluations(result.run_id) > 0


def test_failing_optimizer_stops_the_run(yes_no_task: Task, fast_settings: SearchSettings) -> None:
    with pytest.raises(LLMCallsFailingError, match="optimizer calls of step 1 failed"):
        OproOptimizer(
            ScriptedChatModel(respond=_dead),
            ScriptedChatModel(respond=scorer_reply),
            settings=fast_settings,
            strategy=FAST_OPRO,
        ).invoke(yes_no_task)


@pytest.mark.parametrize(
    ("changes", "reason", "steps_run"),
    [({"target_score": 1.0}, "target_score", 2), ({"patience": 1, "steps": 10}, "patience", 3)],
)
def test_early_stopping(
    yes_no_task: Task,
    fast_settings: SearchSettings,
    changes: dict[str, Any],
    reason: str,
    steps_run: int,
) -> None:
    result = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        settings=fast_settings.replace(**changes),
        strategy=FAST_OPRO,
    ).invoke(yes_no_task)
    assert result.stop_reason == reason
    assert max(h.step for h in result.history) == steps_run


def _exemplar_questions(prompt: str) -> list[str]:
    return [q for q, _ in FACTS if f"{q}\n" in prompt]


@pytest.mark.parametrize("selection", ["random", "constant", "most_wrong"])
def test_exemplar_selection(
    yes_no_task: Task, fast_settings: SearchSettings, selection: str
) -> None:
    settings, strategy = split_settings(exemplar_selection=selection, candidates_per_step=1)
    optimizer_model = ScriptedChatModel(respond=optimizer_reply)
    OproOptimizer(
        optimizer_model,
        ScriptedChatModel(respond=scorer_reply),
        settings=settings,
        strategy=strategy,
    ).invoke(yes_no_task)
    per_step = [_exemplar_questions(p) for p in _optimizer_prompts(optimizer_model)]
    train = {e.inputs["input"] for e in yes_no_task.splits().train}
    assert all(len(shown) == 3 and set(shown) <= train for shown in per_step)
    if selection == "constant":
        assert per_step[0] == per_step[1] == per_step[2]
    elif selection == "random":
        assert per_step[0] != per_step[1]
    else:
        # After step 1 only "Think about it." is scored right on some questions: the shown
        # exemplars are ones it got wrong (every instruction so far got them wrong).
        think_right = {q for q, a in FACTS if scorer_reply([_human(q + " think")], {}) == a}
        assert not set(per_step[1]) & think_right


def _human(text: str) -> BaseMessage:
    from langchain_core.messages import HumanMessage

    return HumanMessage(text)


class _Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts: list[tuple[list[str], dict[str, Any]]] = []

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.starts.append((list(tags or []), dict(metadata or {})))


def test_runnable_config_reaches_every_llm_call(
    yes_no_task: Task,
    optimizer_model: ScriptedChatModel,
    scorer_model: ScriptedChatModel,
    fast_settings: SearchSettings,
) -> None:
    recorder = _Recorder()
    result = OproOptimizer(
        optimizer_model, scorer_model, settings=fast_settings, strategy=FAST_OPRO
    ).invoke(
        yes_no_task,
        {"callbacks": [recorder], "tags": ["my-app"], "metadata": {"user": "ada"}},
    )
    assert len(recorder.starts) == result.calls["optimizer"] + result.calls["scorer"]
    roles = [t for tags, _ in recorder.starts for t in tags if t.startswith("opro:")]
    assert roles.count("opro:optimizer") == result.calls["optimizer"]
    assert roles.count("opro:scorer") == result.calls["scorer"]
    for tags, metadata in recorder.starts:
        assert "my-app" in tags
        assert metadata["user"] == "ada"
        assert metadata["opro_run_id"] == result.run_id
        assert "opro_step" in metadata


def test_prompt_template_reproduces_the_optimization_time_score(
    yes_no_task: Task,
    optimizer_model: ScriptedChatModel,
    scorer_model: ScriptedChatModel,
    fast_settings: SearchSettings,
) -> None:
    result = OproOptimizer(
        optimizer_model, scorer_model, settings=fast_settings.replace(steps=1), strategy=FAST_OPRO
    ).invoke(yes_no_task)
    assert result.best_instruction == "Think about it."  # a partial score makes this telling
    chain = result.to_prompt_template() | scorer_model
    test = yes_no_task.splits().test
    answers = chain.batch([dict(e.inputs) for e in test])
    score = sum(
        yes_no_task.metric(a.text, e.target, yes_no_task.question(e))
        for a, e in zip(answers, test, strict=True)
    ) / len(test)
    assert 0 < score < 1
    assert score == result.scores["test"]


def test_a_whole_chain_can_be_the_target(
    yes_no_task: Task, optimizer_model: ScriptedChatModel, fast_settings: SearchSettings
) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "{instruction}"), ("human", "{input}")])
    model = ScriptedChatModel(respond=scorer_reply)
    chain = prompt | model | StrOutputParser()
    result = OproOptimizer(
        optimizer_model, target=chain, settings=fast_settings, strategy=FAST_OPRO
    ).invoke(yes_no_task)
    assert result.best_instruction == "Answer with yes or no."
    assert result.scores["test"] == 1.0
    assert model.calls[0]["prompt"].startswith("Let's solve the problem.\n")


def test_the_optimizer_is_a_runnable_step_sync_and_async(
    yes_no_task: Task,
    optimizer_model: ScriptedChatModel,
    scorer_model: ScriptedChatModel,
    fast_settings: SearchSettings,
) -> None:
    optimizer = OproOptimizer(
        optimizer_model, scorer_model, settings=fast_settings, strategy=FAST_OPRO
    )
    pipeline = (
        RunnableLambda(lambda name: yes_no_task)
        | optimizer
        | RunnableLambda(lambda result: result.best_instruction)
    )
    assert pipeline.invoke("even_numbers") == "Answer with yes or no."
    assert asyncio.run(pipeline.ainvoke("even_numbers")) == "Answer with yes or no."


def test_resuming_with_changed_task_data_is_refused(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    store = RunStore(":memory:")
    first = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        settings=fast_settings,
        strategy=FAST_OPRO,
        store=store,
    )
    run_id = first.invoke(yes_no_task).run_id
    changed = Task.from_records(
        "even_numbers",
        [{"input": q, "target": "yes"} for q, _ in FACTS],
        metric="boolean",
        split=yes_no_task.split,
    )
    with pytest.raises(RunStoreError, match="different task data"):
        OproOptimizer(
            ScriptedChatModel(respond=optimizer_reply),
            ScriptedChatModel(respond=scorer_reply),
            settings=fast_settings,
            strategy=FAST_OPRO,
            store=store,
        ).invoke(changed, run_id=run_id)


def test_evaluate_instruction(yes_no_task: Task, scorer_model: ScriptedChatModel) -> None:
    good = asyncio.run(
        evaluate_instruction(yes_no_task, "Answer with yes or no.", scorer=scorer_model)
    )
    bad = asyncio.run(evaluate_instruction(yes_no_task, "", scorer=scorer_model, split="train"))
    assert good.score == 1.0 and len(good.results) == 30
    assert bad.score == 0.0 and len(bad.results) == 20


def test_wrapped_models_work_in_both_roles(
    yes_no_task: Task, fast_settings: SearchSettings
) -> None:
    def broken(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        raise ConnectionError("primary is down")

    primary = ScriptedChatModel(respond=broken)
    fallback = ScriptedChatModel(respond=scorer_reply)
    result = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply).with_retry(stop_after_attempt=2),
        primary.with_fallbacks([fallback]),
        settings=fast_settings,
        strategy=FAST_OPRO,
    ).invoke(yes_no_task)
    assert result.best_instruction == "Answer with yes or no."
    assert primary.calls == [] and len(fallback.calls) == result.calls["scorer"]
