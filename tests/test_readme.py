"""The README's examples run, so they cannot rot."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from opro_agent.cli import main
from opro_agent.local_server import LocalServer
from opro_agent.store import RunStore
from tests.conftest import needs_llama, needs_retrieval

README = Path(__file__).resolve().parents[1] / "README.md"
CI_RUN = Path(__file__).resolve().parents[1] / ".ci" / "run"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = next(b.strip() for b in _blocks("bash") if b.strip().endswith("&& pytest"))
    assert test_command in CI_RUN.read_text().splitlines()


def test_the_readme_demo_runs_a_shipped_task() -> None:
    demo = next(b.strip() for b in _blocks("bash") if "opro-agent optimize tasks/" in b)
    task = re.search(r"opro-agent optimize (tasks/\S+\.yaml)", demo)
    assert task is not None
    assert (README.parent / task.group(1)).is_file()


def test_tasks_validate_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(README.parent)
    command = next(b.strip() for b in _blocks("bash") if b.startswith("opro-agent tasks validate"))
    pattern = command.split()[-1]
    assert main(["tasks", "validate", *sorted(str(p) for p in Path().glob(pattern))]) == 0
    assert capsys.readouterr().out.count("ok: ") == 3


@pytest.mark.integration
@needs_llama
@needs_retrieval
def test_python_examples_run_on_the_embedded_model(
    embedded_server: LocalServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # the retrieval example saves a retriever here
    # The examples name an OpenAI model; an OpenAI-compatible server answers them here.
    monkeypatch.setenv("OPENAI_BASE_URL", embedded_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    namespace: dict[str, object] = {}
    # The Ray example runs in tests/test_ray_e2e.py, on a Ray cluster.
    blocks = [b for b in _blocks("python") if "PoolSettings" not in b]
    assert len(blocks) == 4
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.strip()
    best = namespace["best"]
    assert isinstance(best, str) and printed.endswith(best.strip())
    result = namespace["result"]
    assert result.scores["test"] is not None  # type: ignore[attr-defined]
    ape_result = namespace["ape_result"]
    assert ape_result.strategy == "ape"  # type: ignore[attr-defined]
    assert {h.kind for h in ape_result.history} >= {"initial", "reverse"}  # type: ignore[attr-defined]
    retriever = namespace["retriever"]
    assert retriever.trained and retriever.info["labels"]["labelled"] > 0  # type: ignore[attr-defined]
    assert (tmp_path / "facts-retriever" / "retriever.json").is_file()
    assert namespace["answer"].content  # type: ignore[attr-defined]
    assert namespace["with_demos"].demonstrations is namespace["selector"]  # type: ignore[attr-defined]


def test_the_readme_compare_command_runs(
    task_file: Path,
    fake_models: dict[str, list[Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command as printed, on scripted models (the embedded model runs compare in
    tests/test_embedded_e2e.py)."""
    command = next(b.strip() for b in _blocks("bash") if b.startswith("opro-agent compare"))
    argv = shlex.split(command)[1:]
    assert argv[1] == "tasks/yes_no_facts.yaml" and (README.parent / argv[1]).is_file()
    monkeypatch.chdir(tmp_path)
    argv[1] = str(task_file)
    assert main([*argv, "--run-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "opro " in out and "ape " in out and "best ape: " in out
    assert len(RunStore.open(tmp_path / "runs").list_runs()) == 6  # 2 strategies x 3 seeds
