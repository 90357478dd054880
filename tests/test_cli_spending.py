"""The CLI's spending flags (dry run, budgets, prices, cache, racing, rate limits) with
scripted models in place of real providers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from opro_agent import cli
from opro_agent.cache import default_cache_dir
from opro_agent.providers import Models
from opro_agent.store import DB_FILENAME, RunStore
from opro_agent.task import Task
from tests.conftest import TASK_YAML
from tests.fakes import ScriptedChatModel

SMALL = ("--steps", "3", "--candidates", "4")


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a model or starting the local server fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no model may be built here")

    monkeypatch.setattr(Models, "chat_model", refuse)
    monkeypatch.setattr(Models, "_local_server", refuse)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _summary(out: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary


def _optimize(
    capsys: pytest.CaptureFixture[str], task_file: Path, run_dir: Path, *flags: str
) -> dict[str, Any]:
    code, out, err = _run(
        capsys, "optimize", str(task_file), *SMALL, "--run-dir", str(run_dir), "--json", *flags
    )
    assert code == 0, err
    return _summary(out)


# -- dry run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "initial"),
    [
        (("--steps", "3", "--candidates", "4"), None),
        (("--steps", "0"), None),
        ((), ["Let's solve the problem.", "Think step by step.", "Answer the question."]),
    ],
)
def test_dry_run_projects_calls_and_tokens_without_starting_anything(
    task_file: Path,
    tmp_path: Path,
    no_models: None,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    initial: list[str] | None,
) -> None:
    if initial is not None:
        task_file.write_text(TASK_YAML + f"initial_instructions: {json.dumps(initial)}\n")
    task = Task.from_yaml(task_file)
    run_dir = tmp_path / "runs"
    code, out, _ = _run(
        capsys, "optimize", str(task_file), "--dry-run", "--run-dir", str(run_dir), *flags
    )
    assert code == 0

    steps = int(flags[flags.index("--steps") + 1]) if "--steps" in flags else 10
    candidates = int(flags[flags.index("--candidates") + 1]) if "--candidates" in flags else 8
    n_initial = len(task.initial_instructions)
    train, validation, test, validate_top = 20, 10, 30, 3
    optimizer_calls = steps * candidates
    scorer_calls = (
        (n_initial + steps * candidates) * train
        + (validate_top + n_initial) * validation  # the initial ones too: do no harm
        + (1 + n_initial) * test
    )
    calls = re.search(r"calls:\s+optimizer (\d+), scorer (\d+)", out)
    assert calls is not None, out
    assert (int(calls[1]), int(calls[2])) == (optimizer_calls, scorer_calls)
    tokens = re.search(r"tokens: (\d+) prompt, (\d+) completion", out)
    assert tokens is not None, out
    assert int(tokens[1]) > 0
    # Every answer may use the task's answer_max_tokens; every proposal 200 tokens.
    assert int(tokens[2]) == scorer_calls * task.answer_max_tokens + optimizer_calls * 200
    assert "cost:   $0.0000" in out  # local models are free
    assert not run_dir.exists()
    assert not (default_cache_dir() / "responses.db").exists()


def test_dry_run_json_is_one_object(
    task_file: Path, tmp_path: Path, no_models: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "runs"
    code, out, _ = _run(
        capsys, "optimize", str(task_file), *SMALL, "--dry-run", "--json", "--run-dir", str(run_dir)
    )
    assert code == 0
    assert len(out.strip().splitlines()) == 1
    figures = json.loads(out)
    assert figures["task"] == "even_numbers"
    assert figures["calls"] == {"optimizer": 12, "scorer": 13 * 20 + 4 * 10 + 2 * 30}
    assert figures["tokens"]["prompt"] > 0
    assert figures["tokens"]["completion"] == figures["calls"]["scorer"] * 64 + 12 * 200
    assert figures["cost"] == 0.0
    assert not run_dir.exists()


# -- budgets and prices --------------------------------------------------------------------------


@pytest.mark.parametrize("max_calls", [150, 250])
def test_max_calls_stops_the_run_cleanly(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
    max_calls: int,
) -> None:
    run_dir = tmp_path / "runs"
    summary = _optimize(capsys, task_file, run_dir, "--max-calls", str(max_calls))
    assert summary["stop_reason"] == "budget"
    assert sum(summary["calls"].values()) <= max_calls
    made = sum(len(m.calls) for models in fake_models.values() for m in models)
    assert made == sum(summary["calls"].values())
    assert summary["scores"]["test"] is not None
    assert RunStore.open(run_dir).get_run(summary["run_id"]).status == "done"


def test_max_cost_with_free_local_models_runs_to_the_end(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    summary = _optimize(capsys, task_file, tmp_path / "runs", "--max-cost", "1")
    assert summary["stop_reason"] == "steps"
    assert summary["cost"] == 0.0
    assert summary["best_instruction"] == "Answer with yes or no."


def test_max_cost_needs_a_price_for_every_model_before_any_is_built(
    task_file: Path,
    tmp_path: Path,
    no_models: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    run_dir = tmp_path / "runs"
    code, _, err = _run(
        capsys,
        "optimize",
        str(task_file),
        "--scorer",
        "anthropic:some-unknown-model",
        "--max-cost",
        "1",
        "--run-dir",
        str(run_dir),
    )
    assert code == 2
    assert "--max-cost" in err and "anthropic:some-unknown-model" in err
    assert "Traceback" not in err
    assert not run_dir.exists()


def test_prices_file_prices_an_unknown_model(
    task_file: Path,
    tmp_path: Path,
    no_models: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    prices = tmp_path / "prices.yaml"
    prices.write_text("anthropic:some-unknown-model: {input: 1.0, output: 2.0}\n")
    code, out, err = _run(
        capsys,
        "optimize",
        str(task_file),
        *SMALL,
        "--scorer",
        "anthropic:some-unknown-model",
        "--prices",
        str(prices),
        "--max-cost",
        "1",
        "--dry-run",
        "--json",
        "--run-dir",
        str(tmp_path / "runs"),
    )
    assert code == 0, err
    figures = json.loads(out)
    scorer_calls = figures["calls"]["scorer"]
    # Local optimizer is free; the scorer's tokens are priced per million.
    assert figures["cost"] > 0
    assert figures["cost"] <= round((figures["tokens"]["prompt"] + 2 * scorer_calls * 64) / 1e6, 4)


@pytest.mark.parametrize(
    "content",
    [
        None,  # no such file
        "anthropic:some-model: {input: 1.0",  # invalid YAML
        "- just\n- a list\n",  # not a mapping
        "openai:gpt-4o: {input: cheap, output: 1.0}\n",  # not a number
    ],
)
def test_a_bad_prices_file_is_refused_naming_the_file(
    task_file: Path,
    tmp_path: Path,
    no_models: None,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
) -> None:
    prices = tmp_path / "bad.yaml"
    if content is not None:
        prices.write_text(content)
    run_dir = tmp_path / "runs"
    code, _, err = _run(
        capsys, "optimize", str(task_file), "--prices", str(prices), "--run-dir", str(run_dir)
    )
    assert code == 2
    assert str(prices) in err
    assert len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "flag", ["--max-calls", "--max-tokens", "--max-cost", "--rpm", "--tpm", "--concurrency"]
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_spending_flags_must_be_positive(
    task_file: Path,
    tmp_path: Path,
    no_models: None,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["optimize", str(task_file), f"{flag}={value}", "--run-dir", str(tmp_path / "r")])
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert flag in err
    assert len(err.strip().splitlines()) == 1


# -- response cache ------------------------------------------------------------------------------


def test_a_repeated_run_is_answered_by_the_cache(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    first = _optimize(capsys, task_file, tmp_path / "runs", *cache)
    second = _optimize(capsys, task_file, tmp_path / "runs", *cache)
    assert first["cache_hits"] == 0
    assert first["calls"]["scorer"] > 0
    assert second["calls"]["scorer"] == 0
    assert fake_models["--scorer"][-1].calls == []
    # `local` takes a seed per call, so its proposals are cached too.
    assert second["calls"]["optimizer"] == 0
    assert second["cache_hits"] == sum(first["calls"].values())
    assert second["best_instruction"] == first["best_instruction"]
    assert second["scores"] == first["scores"]
    assert (tmp_path / "cache" / "responses.db").is_file()


def test_no_cache_makes_the_second_run_pay_again(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = _optimize(capsys, task_file, tmp_path / "runs")
    second = _optimize(capsys, task_file, tmp_path / "runs", "--no-cache")
    assert second["cache_hits"] == 0
    assert second["calls"] == first["calls"]
    assert len(fake_models["--scorer"][-1].calls) == first["calls"]["scorer"]
    assert second["best_instruction"] == first["best_instruction"]


# -- racing and rate limits ----------------------------------------------------------------------


@pytest.mark.parametrize("racing", [True, False])
def test_early_rejection_flag(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
    racing: bool,
) -> None:
    flags = ("--early-rejection",) if racing else ()
    summary = _optimize(capsys, task_file, tmp_path / "runs", "--no-cache", *flags)
    assert (summary["saved_by_early_rejection"] > 0) is racing
    assert summary["best_instruction"] == "Answer with yes or no."
    stored = RunStore.open(tmp_path / "runs").get_run(summary["run_id"])
    assert stored.config["strategy"]["early_rejection"] is racing


def test_generous_rate_limits_do_not_change_the_result(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain = _optimize(capsys, task_file, tmp_path / "a", "--no-cache")
    limited = _optimize(
        capsys, task_file, tmp_path / "b", "--no-cache", "--rpm", "1000000", "--tpm", "1e9"
    )
    for key in ("best_instruction", "scores", "calls", "tokens", "saved_by_early_rejection"):
        assert limited[key] == plain[key]
    assert (tmp_path / "b" / DB_FILENAME).is_file()
