"""The CLI's happy paths with scripted models in place of real providers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from opro_agent import cli
from opro_agent.providers import ModelOptions, Models, ModelSpec
from opro_agent.store import RunStore
from tests.conftest import scorer_reply
from tests.fakes import ScriptedChatModel


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_prints_a_json_summary_consistent_with_the_store(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "runs"
    code, out, _ = _run(
        capsys,
        "optimize",
        str(task_file),
        "--steps",
        "3",
        "--candidates",
        "4",
        "--run-dir",
        str(run_dir),
        "--json",
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["best_instruction"] == "Answer with yes or no."
    assert summary["scores"] == {"train": 1.0, "validation": 1.0, "test": 1.0}
    assert summary["baselines"] == {"Let's solve the problem.": 0.0}
    assert set(summary) >= {"run_id", "task", "calls", "tokens", "wall_seconds"}
    store = RunStore.open(run_dir)
    usage = store.usage(summary["run_id"])
    assert summary["calls"] == {
        "optimizer": usage["optimizer_calls"],
        "scorer": usage["scorer_calls"],
    }
    assert summary["calls"]["scorer"] == len(fake_models["--scorer"][0].calls)
    assert summary["tokens"] == {
        "prompt": usage["prompt_tokens"],
        "completion": usage["completion_tokens"],
    }
    assert store.get_run(summary["run_id"]).config["cli"]["scorer"] == "local"

    code, out, _ = _run(capsys, "runs", "list", "--run-dir", str(run_dir))
    assert code == 0 and summary["run_id"] in out and "done" in out
    code, out, _ = _run(capsys, "runs", "show", summary["run_id"][:12], "--run-dir", str(run_dir))
    assert code == 0
    assert "'Answer with yes or no.'" in out and "'Think about it.'" in out
    code, out, _ = _run(
        capsys, "runs", "show", summary["run_id"], "--run-dir", str(run_dir), "--json"
    )
    shown = json.loads(out)
    assert shown["history"][0]["instruction"] == "Let's solve the problem."
    # The test questions the winner fixed against the starting instruction, with answers.
    changes = shown["test_changes"]
    assert changes["baseline"] == "Let's solve the problem." and changes["broken"] == []
    assert len(changes["fixed"]) == 30 == len(shown["summary"]["test_comparison"]["fixed"])
    fixed = changes["fixed"][0]
    assert fixed["question"].startswith("Is ") and fixed["target"] in ("yes", "no")
    assert (fixed["winner_score"], fixed["baseline_score"]) == (1.0, 0.0)
    assert fixed["baseline_answer"] == "That is an interesting question."


def test_human_readable_report(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(
        capsys, "optimize", str(task_file), "--steps", "2", "--run-dir", str(tmp_path / "r")
    )
    assert code == 0
    assert "'Answer with yes or no.'" in out
    assert "Held-out gain over the best initial instruction: +1.000" in out


def test_ctrl_c_then_resume_from_the_cli(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "runs"
    calls = {"n": 0}

    def interrupting(messages: Any, metadata: Any) -> str:
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return scorer_reply(messages, metadata)

    original = Models.chat_model

    def chat_model(self: Models, spec: ModelSpec, options: ModelOptions, *, flag: str) -> Any:
        model = original(self, spec, options, flag=flag)
        if flag == "--scorer":
            model.respond = interrupting  # type: ignore[attr-defined]
        return model

    monkeypatch.setattr(Models, "chat_model", chat_model)
    code, _, err = _run(
        capsys, "optimize", str(task_file), "--steps", "3", "--run-dir", str(run_dir)
    )
    assert code == 130
    assert "Continue with: opro-agent optimize --resume" in err
    run_id = RunStore.open(run_dir).list_runs()[0].id
    assert RunStore.open(run_dir).get_run(run_id).status == "interrupted"
    paid_before = RunStore.open(run_dir).usage(run_id)["scorer_calls"]
    # 49 answers came back before Ctrl-C; any still in flight at that moment are not kept.
    assert 40 <= paid_before <= 49

    # The task file moved: resuming still works when TASK is given again.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(task_file, moved / "even.yaml")
    shutil.copy(task_file.parent / "facts.jsonl", moved / "facts.jsonl")
    monkeypatch.setattr(Models, "chat_model", original)
    code, out, _ = _run(
        capsys,
        "optimize",
        "--resume",
        run_id,
        str(moved / "even.yaml"),
        "--run-dir",
        str(run_dir),
        "--json",
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["run_id"] == run_id
    assert summary["best_instruction"] == "Answer with yes or no."
    new_calls = len(fake_models["--scorer"][-1].calls)
    assert new_calls == summary["calls"]["scorer"] - paid_before


def test_evaluate_scores_one_instruction(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(
        capsys,
        "evaluate",
        str(task_file),
        "--instruction",
        "Answer with yes or no.",
        "--json",
        "--run-dir",
        str(tmp_path),
    )
    assert code == 0
    result = json.loads(out)
    assert result["score"] == 1.0 and result["examples"] == 30 and result["split"] == "test"
    code, out, _ = _run(
        capsys,
        "evaluate",
        str(task_file),
        "--instruction",
        "Hello",
        "--split",
        "train",
        "--run-dir",
        str(tmp_path),
    )
    assert code == 0 and out.startswith("even_numbers train: 0.000 (20 examples")
