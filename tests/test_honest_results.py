"""Honest results: a new instruction replaces the initial one only if it is better on
validation (unless the guard is off, and then the report says so), and every reported score
comes with its 95% interval and the gain with a paired test."""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage

from opro_agent import Opro, OproOptimizer, SearchSettings, Task, cli
from opro_agent.providers import Models, ModelSpec
from tests.conftest import TRUTH
from tests.fakes import ScriptedChatModel

OVERFIT = [f"<INS>Memorise the training questions, take {n}.</INS>" for n in range(3)]


def _overfit_proposals(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    return OVERFIT[metadata["opro_candidate"] % len(OVERFIT)]


def _scorer(train_questions: set[str]) -> Any:
    """Right on every training question under a 'memorising' instruction, wrong elsewhere;
    right on about half of all questions under any other instruction."""

    def reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        prompt = "\n".join(m.text for m in messages)
        question = next(q for q in TRUTH if q in prompt)
        truth, wrong = TRUTH[question], "no" if TRUTH[question] == "yes" else "yes"
        if "Memorise" in prompt:
            return truth if question in train_questions else wrong
        return truth if zlib.crc32(question.encode()) % 2 else wrong

    return reply


def _run(task: Task, *, guard: bool) -> Any:
    train = {e.inputs["input"] for e in task.splits().train}
    return OproOptimizer(
        ScriptedChatModel(respond=_overfit_proposals),
        ScriptedChatModel(respond=_scorer(train)),
        strategy=Opro(candidates_per_step=3),
        settings=SearchSettings(steps=1, keep_initial_unless_better=guard),
    ).invoke(task)


def test_the_initial_instruction_is_kept_unless_beaten_on_validation(yes_no_task: Task) -> None:
    result = _run(yes_no_task, guard=True)
    initial = "Let's solve the problem."
    assert result.best_instruction == initial and result.kept_initial
    assert result.selection_reason is not None
    assert result.selection_reason.startswith("no new instruction beat the best initial one")
    assert result.test_gain == 0.0
    history = {h.instruction: h for h in result.history}
    # The overfitting candidates were better on train, worse on validation.
    memorised = [h for text, h in history.items() if text.startswith("Memorise")]
    assert all(h.train == 1.0 and h.validation == 0.0 for h in memorised)
    assert history[initial].validation is not None and history[initial].validation > 0
    summary = result.summary()
    assert summary["selection"] == {"kept_initial": True, "reason": result.selection_reason}


def test_without_the_guard_a_regression_is_returned_and_said(yes_no_task: Task) -> None:
    result = _run(yes_no_task, guard=False)
    assert result.best_instruction.startswith("Memorise") and not result.kept_initial
    assert result.test_gain is not None and result.test_gain < 0
    assert result.selection_reason is not None
    assert "did not beat the best initial instruction" in result.selection_reason


@pytest.mark.parametrize("guard", [True, False])
def test_the_cli_never_prints_a_negative_gain_without_saying_why(
    guard: bool,
    task_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    train = {e.inputs["input"] for e in Task.from_yaml(task_file).splits().train}

    def chat_model(self: Models, spec: ModelSpec, options: Any, *, flag: str) -> Any:
        respond = _overfit_proposals if flag == "--optimizer" else _scorer(train)
        return ScriptedChatModel(respond=respond)

    monkeypatch.setattr(Models, "chat_model", chat_model)
    argv = ["optimize", str(task_file), "--steps", "1", "--candidates", "3"]
    argv += ["--run-dir", str(tmp_path), *([] if guard else ["--no-guard"])]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    gain = float(out.split("Held-out gain over the best initial instruction: ")[1].split()[0])
    if guard:
        assert "(kept the initial instruction: no new instruction beat" in out
        assert gain == 0.0 and "(the winner is an initial instruction)" in out
    else:
        assert gain < 0
        assert "(note: the winner did not beat the best initial instruction (0.000 against" in out
        assert "distinguishable from noise at this test size" in out
    assert "[" in out.split("Scores (95% intervals):")[1].splitlines()[0]


def test_scores_come_with_wilson_intervals_and_a_paired_test(
    yes_no_task: Task,
    optimizer_model: ScriptedChatModel,
    scorer_model: ScriptedChatModel,
    fast_settings: SearchSettings,
) -> None:
    result = OproOptimizer(
        optimizer_model, scorer_model, settings=fast_settings, strategy=Opro(candidates_per_step=4)
    ).invoke(yes_no_task)
    assert result.scores["test"] == 1.0
    test = result.intervals["test"]
    assert test is not None and test.method == "wilson" and test.n == 30
    # Wilson's lower bound for 30 of 30: n / (n + z^2) with z = 1.95996.
    assert test.low == pytest.approx(30 / (30 + 1.959964**2), abs=1e-4) and test.high == 1.0
    baseline = result.baseline_intervals["Let's solve the problem."]
    assert (baseline.mean, baseline.low) == (0.0, 0.0)
    comparison = result.test_comparison
    assert comparison is not None and comparison.method == "mcnemar"
    assert (len(comparison.fixed), len(comparison.broken), comparison.n) == (30, 0, 30)
    assert comparison.p_value == pytest.approx(2 * 0.5**30)  # exact McNemar: all 30 fixed
    assert comparison.significant()
    summary = json.loads(json.dumps(result.summary()))
    assert summary["intervals"]["test"]["low"] == pytest.approx(0.8865, abs=1e-4)
    assert summary["test_comparison"]["verdict"].startswith("the gain is distinguishable")
    assert len(summary["test_comparison"]["fixed"]) == 30
