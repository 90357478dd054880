"""Bad command-line input: exit code 2 and one stderr line naming the file, field or flag.

None of these tests may start a model server or reach the network: `LocalServer` is replaced
by a stub that fails the test, and OpenAI credentials are removed from the environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from opro_agent import providers
from opro_agent.cli import main
from opro_agent.store import RunStore

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
SHIPPED = sorted(TASKS_DIR.glob("*.yaml"))

GOOD_TASK = (
    "name: good\nexamples:\n"
    + "".join(
        f"  - {{input: 'Is {i} even?', target: '{'yes' if i % 2 == 0 else 'no'}'}}\n"
        for i in range(10)
    )
    + "metric: boolean\nsplit: {train: 4, validation: 3}\n"
)
BAD_YAML = "name: t\nfoo: bar\n  baz: qux\n"  # invalid at line 3
OFFLINE_OPENAI = ["--optimizer", "openai:x", "--scorer", "openai:x"]  # fails: no API key


class _NoLocalServer:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("a bad-input test reached model building: it would start llama.cpp")


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in tmp_path (the default --run-dir is ./runs), offline, never starting a server."""
    monkeypatch.chdir(tmp_path)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    # Replaces the class `Models._local_server` starts, so its own --local-model check still runs.
    monkeypatch.setattr(providers, "LocalServer", _NoLocalServer)
    (tmp_path / "good.yaml").write_text(GOOD_TASK, encoding="utf-8")
    (tmp_path / "bad.yaml").write_text(BAD_YAML, encoding="utf-8")
    (tmp_path / "empty").mkdir()
    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own handler
    yield
    signal.signal(signal.SIGTERM, sigterm)
    structlog.reset_defaults()


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside the parser
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(err: str, fragments: list[str]) -> None:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


# -- tasks validate ------------------------------------------------------------------------


def test_tasks_validate_good_files(capsys: pytest.CaptureFixture[str]) -> None:
    paths = [*map(str, SHIPPED), "good.yaml"]
    code, out, err = _run(capsys, ["tasks", "validate", *paths])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(SHIPPED, lines, strict=False):
        assert line.startswith(f"ok: {path}: {path.stem}, 90 examples ")
        assert "(train 20, validation 20, test 50), metric " in line
    assert lines[-1] == (
        "ok: good.yaml: good, 10 examples (train 4, validation 3, test 3), metric boolean"
    )


def test_tasks_validate_mix_of_good_and_bad(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, ["tasks", "validate", "good.yaml", "bad.yaml", "missing.yaml"])
    assert code == 2
    assert out.splitlines() == [
        "ok: good.yaml: good, 10 examples (train 4, validation 3, test 3), metric boolean"
    ]
    assert "Traceback" not in err
    errors = err.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith("error: bad.yaml: invalid YAML (line 3)")
    assert errors[1] == "error: missing.yaml: no such file"


# -- optimize / evaluate / runs: bad input ----------------------------------------------------

BAD_COMMANDS: dict[str, tuple[list[str], list[str]]] = {
    "optimize-missing-task": (["optimize", "missing.yaml"], ["missing.yaml", "no such file"]),
    "optimize-bad-yaml": (["optimize", "bad.yaml"], ["bad.yaml", "line 3"]),
    "optimize-no-task-no-resume": (["optimize"], ["TASK", "--resume"]),
    "steps-not-a-number": (["optimize", "good.yaml", "--steps", "x"], ["--steps", "'x'"]),
    "steps-negative": (["optimize", "good.yaml", "--steps", "-2"], ["--steps"]),
    "candidates-zero": (["optimize", "good.yaml", "--candidates", "0"], ["--candidates"]),
    "patience-zero": (["optimize", "good.yaml", "--patience", "0"], ["--patience"]),
    "concurrency-negative": (["optimize", "good.yaml", "--concurrency", "-1"], ["--concurrency"]),
    "target-score-above-one": (
        ["optimize", "good.yaml", "--target-score", "2"],
        ["--target-score"],
    ),
    "target-score-not-a-number": (
        ["optimize", "good.yaml", "--target-score", "high"],
        ["--target-score", "'high'"],
    ),
    "exemplars-bogus": (
        ["optimize", "good.yaml", "--exemplars", "bogus"],
        ["--exemplars", "bogus"],
    ),
    "seed-not-int": (["optimize", "good.yaml", "--seed", "1.5"], ["--seed"]),
    "unknown-flag": (["optimize", "good.yaml", "--stpes", "3"], ["--stpes"]),
    "unknown-command": (["optimise", "good.yaml"], ["optimise"]),
    "optimizer-not-a-spec": (
        ["optimize", "good.yaml", "--optimizer", "nonsense"],
        ["--optimizer", "'nonsense'"],
    ),
    "scorer-not-a-spec": (
        ["optimize", "good.yaml", "--optimizer", "openai:x", "--scorer", "openai:"],
        ["--scorer", "'openai:'"],
    ),
    "optimizer-openai-without-key": (
        ["optimize", "good.yaml", *OFFLINE_OPENAI],
        ["--optimizer", "OPENAI_API_KEY"],
    ),
    "scorer-openai-without-key": (
        # The optimizer builds (a base URL needs no key; nothing is sent); the scorer cannot.
        [
            "optimize",
            "good.yaml",
            "--optimizer",
            "openai:x",
            "--optimizer-base-url",
            "http://127.0.0.1:9/v1",
            "--scorer",
            "openai:gpt-x",
        ],
        ["--scorer", "OPENAI_API_KEY"],
    ),
    "local-model-missing-file": (
        ["optimize", "good.yaml", "--local-model", "nope.gguf"],
        ["--local-model", "nope.gguf"],
    ),
    "evaluate-without-instruction": (["evaluate", "good.yaml"], ["--instruction"]),
    "evaluate-missing-task": (
        ["evaluate", "missing.yaml", "--instruction", "Be brief."],
        ["missing.yaml"],
    ),
    "evaluate-bad-split": (
        ["evaluate", "good.yaml", "--instruction", "Be brief.", "--split", "dev"],
        ["--split", "dev"],
    ),
    "evaluate-scorer-not-a-spec": (
        ["evaluate", "good.yaml", "--instruction", "Be brief.", "--scorer", "gpt4"],
        ["--scorer", "'gpt4'"],
    ),
    "evaluate-scorer-openai-without-key": (
        ["evaluate", "good.yaml", "--instruction", "Be brief.", "--scorer", "openai:x"],
        ["--scorer", "OPENAI_API_KEY"],
    ),
    "runs-list-no-store": (["runs", "list", "--run-dir", "empty"], ["--run-dir", "empty"]),
    "runs-show-no-store": (["runs", "show", "X", "--run-dir", "empty"], ["--run-dir", "empty"]),
    "runs-list-missing-dir": (["runs", "list", "--run-dir", "nowhere"], ["--run-dir", "nowhere"]),
    "tasks-validate-nothing": (["tasks", "validate"], ["TASK"]),
}


@pytest.mark.parametrize("case", BAD_COMMANDS)
def test_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], case: str) -> None:
    argv, fragments = BAD_COMMANDS[case]
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert out == ""
    _assert_one_error_line(err, fragments)


def test_steps_zero_is_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    # --steps 0 parses (only the initial instructions are scored); the failure is the task file.
    code, _, err = _run(capsys, ["optimize", "missing.yaml", "--steps", "0"])
    assert code == 2
    _assert_one_error_line(err, ["missing.yaml"])
    assert "--steps" not in err


def test_unknown_meta_prompt_names_the_flag(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake key lets the OpenAI models be built (building sends nothing); the template cannot.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    code, out, err = _run(
        capsys, ["optimize", "good.yaml", *OFFLINE_OPENAI, "--meta-prompt", "nosuch"]
    )
    assert (code, out) == (2, "")
    _assert_one_error_line(err, ["--meta-prompt", "'nosuch'"])


def test_unknown_meta_prompt_fails_before_any_model_is_built(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _run(capsys, ["optimize", "good.yaml", "--meta-prompt", "nosuch"])
    assert code == 2
    _assert_one_error_line(err, ["--meta-prompt"])


def test_resume_unknown_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, ["optimize", "--resume", "nosuchrun", "--run-dir", "runs"])
    assert code != 0
    assert out == ""
    _assert_one_error_line(err, ["'nosuchrun'"])


def test_runs_list_on_an_existing_empty_store(capsys: pytest.CaptureFixture[str]) -> None:
    RunStore.open("runs").close()
    code, out, err = _run(capsys, ["runs", "list", "--run-dir", "runs"])
    assert (code, out, err) == (0, "no runs in runs\n", "")


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["optimize", "missing.yaml"], ["missing.yaml", "no such file"]),
        (["optimize", "good.yaml", "--steps", "x"], ["--steps"]),
    ],
    ids=["config-error", "argparse-error"],
)
def test_subprocess_has_no_traceback(tmp_path: Path, argv: list[str], fragments: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "opro_agent.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    _assert_one_error_line(proc.stderr, fragments)
