"""The error-driven strategies with scripted models: ProTeGi (gradient -> edit ->
paraphrase -> bandit) and PE2 (failures, step size, momentum)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import structlog
from langchain_core.messages import BaseMessage

from opro_agent import ConfigError, OproOptimizer, Pe2, ProTeGi, RunStore, SearchSettings, Task
from opro_agent.strategies import Proposal, Rejected
from opro_agent.strategies.pe2 import words_changed
from opro_agent.strategies.replies import parse_reply
from tests.conftest import optimizer_reply, scorer_reply
from tests.fakes import ScriptedChatModel
from tests.test_strategies import ape_reply

LONG_REWRITE = " ".join(f"word{n}" for n in range(30))


def protegi_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    """Gradients name the problem; even edits fix it, odd ones ramble; paraphrases keep
    whatever the edit said."""
    kind, idx, step = metadata["opro_kind"], metadata["opro_candidate"], metadata["opro_step"]
    prompt = messages[0].text
    if kind == "gradient":
        return "Sure. <START>The instruction never asks for a yes or no answer.<END>"
    if kind == "edit":
        if idx % 2:
            return f"<INS>Talk about numbers at length, edit {step}.{idx}.</INS>"
        return f"<INS>Answer with yes or no, edit {step}.{idx}.</INS>"
    assert kind == "paraphrase"
    if "yes or no" in prompt:
        return f"<INS>Reply yes or no please, paraphrase {step}.{idx}.</INS>"
    return f"<INS>Keep talking about numbers, paraphrase {step}.{idx}.</INS>"


def pe2_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    idx = metadata["opro_candidate"]
    current = messages[0].text.split("## Current prompt\n")[1].splitlines()[0].strip('"')
    return [
        f"<INS>{current} Answer with yes or no.</INS>",
        f"<INS>{LONG_REWRITE}</INS>",  # rewrites everything: over the step size
        "Let me think. <INS>Think about it.</INS>",
    ][idx % 3]


def any_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    """Answers every strategy's optimizer calls, by their kind."""
    kind = metadata["opro_kind"]
    if kind == "proposal":
        return optimizer_reply(messages, metadata)
    if kind in ("forward", "reverse", "resample"):
        return ape_reply(messages, metadata)
    if kind == "pe2":
        return pe2_reply(messages, metadata)
    return protegi_reply(messages, metadata)


def _run(task: Task, strategy: Any, store: RunStore, steps: int = 2) -> tuple[Any, Any]:
    optimizer = ScriptedChatModel(respond=any_reply)
    result = OproOptimizer(
        optimizer,
        ScriptedChatModel(respond=scorer_reply),
        strategy=strategy,
        settings=SearchSettings(steps=steps, concurrency=4),
        store=store,
    ).invoke(task)
    return result, optimizer


@pytest.mark.parametrize("bandit", ["ucb", "successive_rejects"])
def test_protegi_gradient_edit_paraphrase_bandit(yes_no_task: Task, bandit: str) -> None:
    store = RunStore(":memory:")
    strategy = ProTeGi(beam=2, gradients=2, paraphrases=1, bandit=bandit, bandit_pulls=2)  # type: ignore[arg-type]
    result, optimizer = _run(yes_no_task, strategy, store)

    assert result.strategy == "protegi"
    assert result.best_instruction.startswith(("Answer with yes or no", "Reply yes or no"))
    assert result.scores["test"] == 1.0
    step1 = [h for h in result.history if h.step == 1]
    initial = "Let's solve the problem."
    edits = [h for h in step1 if h.kind == "edit"]
    paraphrases = [h for h in step1 if h.kind == "paraphrase"]
    assert len(edits) == 2 and {h.parent for h in edits} == {initial}
    assert {h.parent for h in paraphrases} == {h.instruction for h in edits}
    # The bandit fully scored the beam's worth of good successors, not the rambling ones.
    good = [h for h in step1 if "yes or no" in h.instruction]
    bad = [h for h in step1 if "numbers" in h.instruction]
    assert len(good) == len(bad) == 2
    assert all(h.train == 1.0 for h in good)
    assert all(h.train == 0.0 and h.validation is None for h in bad)
    trained = {key: n for key, n in _train_counts(store, result.run_id).items()}
    assert sorted(trained.values())[:2] < [20, 20]  # the rejected arms: a few examples each
    assert result.saved_by_early_rejection == sum(20 - n for n in trained.values())
    # Every gradient, edit and paraphrase call is stored with its kind.
    kinds = store._db.execute(
        "SELECT kind, COUNT(*) FROM optimizer_calls WHERE step = 1 GROUP BY kind ORDER BY kind"
    ).fetchall()
    assert [tuple(k) for k in kinds] == [("edit", 2), ("gradient", 2), ("paraphrase", 2)]
    gradients = [c for c in optimizer.calls if c["metadata"]["opro_kind"] == "edit"]
    assert all("never asks for a yes or no answer" in c["prompt"] for c in gradients)
    # Step 2: the beam answers everything right, so there are no errors to learn from.
    assert not [h for h in result.history if h.step == 2]


def _train_counts(store: RunStore, run_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key, ev in store.iter_evaluations(run_id):
        if ev.split == "train":
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_pe2_shows_failures_rejects_big_steps_and_carries_momentum(yes_no_task: Task) -> None:
    with structlog.testing.capture_logs() as logs:
        result, optimizer = _run(
            yes_no_task, Pe2(candidates_per_step=3, step_size=10), RunStore(":memory:"), steps=2
        )
    skipped = [e["reason"] for e in logs if e["event"] == "candidate.skipped"]
    assert skipped.count("step_size: changes more than 10 words") == 2  # once a step

    first, second = [c["prompt"] for c in optimizer.calls if c["metadata"]["opro_candidate"] == 0]
    train = {e.inputs["input"] for e in yes_no_task.splits().train}
    held_out = {
        e.inputs["input"] for e in (*yes_no_task.splits().validation, *yes_no_task.splits().test)
    }
    assert "Q: <INS>\n" in first  # how the prompt and an input are combined (Q_begin)
    assert "is the prompt describing the task correctly" in first.lower()
    assert first.count("Correct output:") == 4  # batch_size failures
    assert any(q in first for q in train) and not any(q in first for q in held_out)
    assert "Output: That is an interesting question." in first  # the failing prediction
    assert "(none yet)" in first
    # Momentum: step 2 improves on step 1's best and shows where it came from.
    best_1 = "Let's solve the problem. Answer with yes or no."
    assert f'## Current prompt\n"{best_1}"' in second
    assert '- "Let\'s solve the problem." (score 0/100)' in second
    assert result.best_instruction == best_1
    by_text = {h.instruction: h for h in result.history}
    assert by_text[best_1].kind == "pe2" and by_text[best_1].parent == "Let's solve the problem."


def test_words_changed() -> None:
    assert words_changed("Answer the question.", "Answer the question.") == 0
    assert words_changed("Answer the question.", "Answer this question.") == 1
    assert words_changed("a b c", "a b c d e") == 2
    assert words_changed("a b c d", "x") == 4


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Here is the improved instruction:\nAnswer yes or no.", "Answer yes or no."),
        ("Here's a new prompt: reply briefly.", "Reply briefly."),
        ("The instruction was to add the numbers", "Add the numbers"),
        ("The instruction was to: add the numbers", "Add the numbers"),
        ("The instruction is: answer briefly.", "Answer briefly."),
        ("Sure!\n<INS>Say yes or no.</INS>", "Say yes or no."),
        ("New instruction: be terse.\n\nThis helps because...", "Be terse."),
    ],
)
def test_replies_are_read_tolerantly(reply: str, expected: str) -> None:
    parsed = parse_reply(reply, "INS", kind="edit")
    assert isinstance(parsed, Proposal) and parsed.text == expected


def test_an_empty_or_copying_reply_is_rejected() -> None:
    assert parse_reply("   ", "INS", kind="edit") == Rejected("unparseable", "   ")
    copied = parse_reply(
        "<INS>Is 4 an even number?</INS>", "INS", kind="edit", questions=["Is 4 an even number?"]
    )
    assert isinstance(copied, Rejected) and copied.reason == "echoes_exemplar"


@pytest.mark.parametrize("strategy", [ProTeGi(), Pe2()])
def test_error_driven_strategies_need_an_initial_instruction(
    strategy: Any, yes_no_task: Task
) -> None:
    task = dataclasses.replace(yes_no_task, initial_instructions=())
    optimizer = OproOptimizer(
        ScriptedChatModel(respond=any_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=strategy,
    )
    with pytest.raises(ConfigError, match=r"initial_instructions: .* give at least one"):
        optimizer.invoke(task)


def test_a_bandit_arm_scored_on_every_example_counts_as_fully_scored(yes_no_task: Task) -> None:
    # Enough pulls to score every arm on the whole (20-example) split: nothing is saved,
    # and no arm is left out of the final choice for lack of a full score.
    strategy = ProTeGi(beam=1, gradients=2, bandit_batch=10, bandit_pulls=4)
    result, _ = _run(yes_no_task, strategy, RunStore(":memory:"), steps=1)
    step1 = [h for h in result.history if h.step == 1]
    assert len(step1) == 4 and result.saved_by_early_rejection == 0
