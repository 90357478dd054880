"""The CLI's strategy choice (flag, task file, run config), `compare`, and their errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from opro_agent import cli
from opro_agent.providers import Models
from opro_agent.store import RunStore
from tests.fakes import ScriptedChatModel
from tests.test_error_driven import any_reply


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ape_models(
    fake_models: dict[str, list[ScriptedChatModel]], monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[ScriptedChatModel]]:
    """The scripted models; the optimizer answers every strategy's prompts, by kind."""
    original = Models.chat_model

    def chat_model(self: Models, spec: Any, options: Any, *, flag: str) -> Any:
        model = original(self, spec, options, flag=flag)
        if flag == "--optimizer":
            model.respond = any_reply
        return model

    monkeypatch.setattr(Models, "chat_model", chat_model)
    return fake_models


def test_strategy_flag_and_settings(
    task_file: Path,
    tmp_path: Path,
    ape_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "runs"
    code, out, _ = _run(
        capsys,
        "optimize",
        str(task_file),
        "--strategy",
        "ape",
        "-S",
        "proposals=4",
        "-S",
        "mode=reverse",
        "--steps",
        "2",
        "--run-dir",
        str(run_dir),
        "--json",
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["strategy"] == "ape"
    stored = RunStore.open(run_dir).get_run(summary["run_id"]).config["strategy"]
    assert (stored["name"], stored["proposals"], stored["mode"]) == ("ape", 4, "reverse")
    # Resuming a finished run replays it: nothing new is paid for.
    code, out, _ = _run(
        capsys, "optimize", "--resume", summary["run_id"], "--run-dir", str(run_dir), "--json"
    )
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["calls"] == summary["calls"]
    assert not ape_models["--scorer"][-1].calls


def test_strategy_from_the_task_file_and_a_run_config(
    task_file: Path,
    tmp_path: Path,
    ape_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    task_file.write_text(
        task_file.read_text() + "strategy: {name: ape, proposals: 2, mode: forward}\n"
    )
    code, out, _ = _run(
        capsys, "optimize", str(task_file), "--steps", "1", "--run-dir", str(tmp_path), "--json"
    )
    assert code == 0
    run = RunStore.open(tmp_path).get_run(json.loads(out.splitlines()[-1])["run_id"])
    assert (run.config["strategy"]["name"], run.config["strategy"]["proposals"]) == ("ape", 2)

    config = tmp_path / "run.yaml"
    config.write_text("strategy: {name: opro, candidates_per_step: 2}\nsteps: 1\nseed: 3\n")
    code, out, _ = _run(
        capsys, "optimize", str(task_file), "--config", str(config), "--run-dir", str(tmp_path)
    )
    assert code == 0
    run = RunStore.open(tmp_path).list_runs()[-1]
    assert run.config["strategy"]["candidates_per_step"] == 2
    assert (run.config["settings"]["steps"], run.config["settings"]["seed"]) == (1, 3)


def test_compare_takes_settings_per_strategy(
    task_file: Path,
    tmp_path: Path,
    ape_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["compare", str(task_file), "--strategies", "protegi,pe2", "--steps", "1"]
    argv += ["-S", "protegi.beam=1", "-S", "protegi.gradients=1", "-S", "pe2.step_size=5"]
    code, out, _ = _run(capsys, *argv, "--run-dir", str(tmp_path), "--json")
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    store = RunStore.open(tmp_path)
    configs = {
        s["strategy"]: store.get_run(s["runs"][0]).config["strategy"] for s in report["strategies"]
    }
    assert (configs["protegi"]["beam"], configs["protegi"]["gradients"]) == (1, 1)
    assert configs["pe2"]["step_size"] == 5


def test_compare_runs_every_strategy_and_seed(
    task_file: Path,
    tmp_path: Path,
    ape_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "runs"
    argv = ["compare", str(task_file), "--strategies", "opro,ape", "--seeds", "0,1"]
    argv += ["--steps", "2", "--max-calls", "400", "--run-dir", str(run_dir)]
    code, out, _ = _run(capsys, *argv, "--json")
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["seeds"] == [0, 1]
    by_name = {s["strategy"]: s for s in report["strategies"]}
    assert set(by_name) == {"opro", "ape"}
    store = RunStore.open(run_dir)
    runs = {r.id: r for r in store.list_runs()}
    assert len(runs) == 4
    for name, summary in by_name.items():
        assert len(summary["runs"]) == 2
        stored = [runs[r] for r in summary["runs"]]
        assert {r.config["strategy"]["name"] for r in stored} == {name}
        assert sorted(r.config["settings"]["seed"] for r in stored) == [0, 1]
        assert all(r.config["settings"]["budget"]["max_calls"] == 400 for r in stored)
        tests = [r.summary["scores"]["test"] for r in stored]  # type: ignore[index]
        assert summary["test"]["mean"] == pytest.approx(sum(tests) / 2, abs=1e-4)
        assert summary["test"]["low"] <= summary["test"]["mean"] <= summary["test"]["high"]
        assert summary["calls"] == pytest.approx(
            sum(sum(r.summary["calls"].values()) for r in stored) / 2  # type: ignore[index]
        )
        assert summary["best_instruction"]

    code, out, _ = _run(capsys, *argv)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["STRATEGY", "TEST"]
    assert [line.split()[0] for line in lines[2:4]] == ["opro", "ape"]
    assert any(line.startswith("best ape: ") for line in lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "{task}", "--strategies", ""], "--strategies: give at least one strategy"),
        (["compare", "{task}", "--strategies", "opro,nope"], "--strategies: no strategy 'nope'"),
        (["compare", "{task}"], "the following arguments are required: --strategies"),
        (["compare", "{task}", "--strategies", "ape", "--seeds", "x"], "--seeds"),
        (["optimize", "{task}", "--strategy", "nope"], "--strategy: no strategy 'nope'"),
        (
            ["optimize", "{task}", "--strategy", "ape", "--candidates", "3"],
            "--candidates: strategy ape has no setting 'candidates_per_step'",
        ),
        (["optimize", "{task}", "--strategy", "ape", "-S", "mode"], "expected KEY=VALUE"),
        (
            ["optimize", "{task}", "--strategy", "ape", "-S", "mode=sideways"],
            "--strategy-setting: strategy ape: mode must be one of 'forward', 'reverse', 'both'",
        ),
        (["optimize", "{task}", "--strategy", "ape", "-S", "speed=3"], "has no setting 'speed'"),
        (
            ["optimize", "{task}", "--strategy", "protegi", "-S", "beam=2.5"],
            "strategy protegi: beam must be a whole number, got 2.5",
        ),
        (
            ["optimize", "{task}", "--strategy", "protegi", "-S", "exploration=-1"],
            "--strategy-setting.exploration: must not be negative",
        ),
        (["optimize", "{task}", "--config", "{config}"], "run.yaml: stepz: unknown setting"),
        (
            ["compare", "{task}", "--strategies", "opro,ape", "-S", "pe2.step_size=3"],
            "--strategy-setting: expected STRATEGY.KEY=VALUE for one of opro, ape",
        ),
        (
            ["compare", "{task}", "--strategies", "ape", "-S", "ape.beam=3"],
            "--strategy-setting: strategy ape has no setting 'beam'",
        ),
    ],
)
def test_bad_strategy_input_is_one_line_and_exit_2(
    argv: list[str],
    message: str,
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("stepz: 3\n")
    argv = [a.format(task=task_file, config=config) for a in argv]
    try:
        code = cli.main([*argv, "--run-dir", str(tmp_path / "runs")])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not fake_models["--scorer"], "nothing ran"
