"""End to end on the real embedded model (llama.cpp server + SmolLM2-135M-Instruct).

Small real optimizations through the CLI, on a shipped task and on a BIG-Bench Hard task from
../shared/data, checked against the run store; plus the server dying mid-run and the run
resuming on a fresh server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel

from opro_agent import (
    LLMCallsFailingError,
    Opro,
    OproOptimizer,
    ProTeGi,
    RetryPolicy,
    SearchSettings,
    Task,
)
from opro_agent.candidates import instruction_key
from opro_agent.cli import main
from opro_agent.local_server import LocalServer, find_embedded_model
from opro_agent.providers import ModelOptions, openai_chat_model
from opro_agent.store import RunStore
from tests.conftest import needs_llama

pytestmark = [pytest.mark.integration, needs_llama]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("OPRO_SHARED_DATA", REPO.parent / "shared" / "data"))


def _small_task(tmp_path: Path, data: str, extra: str, split: str) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(
        f"name: small\ndata: {{path: {data}{extra}}}\nmetric: boolean\n"
        f"instruction_position: system\nsplit: {split}\nanswer_max_tokens: 8\n"
    )
    return path


def _model_flags(server: LocalServer) -> list[str]:
    """Both roles on the session's embedded server, as an OpenAI-compatible endpoint."""
    return [
        *("--optimizer", f"openai:{server.model_name}", "--optimizer-base-url", server.base_url),
        *("--scorer", f"openai:{server.model_name}", "--scorer-base-url", server.base_url),
    ]


def _optimize(
    capsys: pytest.CaptureFixture[str], task: Path, server: LocalServer, run_dir: Path
) -> dict[str, Any]:
    model = _model_flags(server)
    flags = ["--steps", "1", "--candidates", "2", "--run-dir", str(run_dir), "--json"]
    code = main(["optimize", str(task), *model, *flags])
    out = capsys.readouterr().out
    assert code == 0
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary


def _check_against_store(summary: dict[str, Any], task_path: Path, run_dir: Path) -> None:
    store = RunStore.open(run_dir)
    run_id = summary["run_id"]
    assert store.get_run(run_id).status == "done"
    usage = store.usage(run_id)
    assert summary["calls"] == {
        "optimizer": usage["optimizer_calls"],
        "scorer": usage["scorer_calls"],
    }
    assert summary["tokens"] == {
        "prompt": usage["prompt_tokens"],
        "completion": usage["completion_tokens"],
    }
    assert summary["tokens"]["prompt"] > 0 and summary["tokens"]["completion"] > 0
    splits = Task.from_yaml(task_path).splits()
    test_ids = {e.id for e in splits.test}
    evaluations = list(store.iter_evaluations(run_id))
    for _, ev in evaluations:
        assert (ev.split == "test") == (ev.example_id in test_ids)
        assert ev.error is None
    winner = [
        ev.score
        for key, ev in evaluations
        if key == instruction_key(summary["best_instruction"]) and ev.split == "test"
    ]
    assert len(winner) == len(test_ids)
    assert summary["scores"]["test"] == pytest.approx(sum(winner) / len(winner))
    assert set(summary["baselines"]) == {"Let's solve the problem."}


def test_small_real_optimization_on_a_shipped_task(
    embedded_server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _small_task(
        tmp_path,
        str(REPO / "tasks" / "yes_no_facts.jsonl"),
        "",
        "{train: 6, validation: 6, test: 12, seed: 3}",
    )
    summary = _optimize(capsys, task, embedded_server, tmp_path / "runs")
    _check_against_store(summary, task, tmp_path / "runs")


@pytest.mark.skipif(not (SHARED_DATA / "bbh").is_dir(), reason="../shared/data is not beside")
def test_small_real_optimization_on_a_bbh_task(
    embedded_server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _small_task(
        tmp_path,
        str(SHARED_DATA / "bbh" / "sports_understanding.json"),
        ", records: examples",
        "{train: 6, validation: 6, test: 12, seed: 0}",
    )
    summary = _optimize(capsys, task, embedded_server, tmp_path / "runs")
    _check_against_store(summary, task, tmp_path / "runs")


def test_ape_and_compare_run_on_the_embedded_model(
    embedded_server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _small_task(
        tmp_path,
        str(REPO / "tasks" / "yes_no_facts.jsonl"),
        "",
        "{train: 6, validation: 6, test: 12, seed: 3}",
    )
    model = _model_flags(embedded_server)
    run_dir = tmp_path / "runs"
    flags = ["--steps", "2", "--max-calls", "200", "--run-dir", str(run_dir), "--json"]
    settings = ["-S", "proposals=4", "-S", "resample_top=2"]
    code = main(["optimize", str(task), "--strategy", "ape", *settings, *model, *flags])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["strategy"] == "ape"
    _check_against_store(summary, task, run_dir)
    history = RunStore.open(run_dir).history(summary["run_id"])
    assert {h.kind for h in history} & {"forward", "reverse"}, "APE induced instructions"

    code = main(["compare", str(task), "--strategies", "opro,ape", *model, *flags])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["strategy"] for s in report["strategies"]] == ["opro", "ape"]
    for strategy in report["strategies"]:
        (run_id,) = strategy["runs"]
        stored = RunStore.open(run_dir).get_run(run_id)
        assert stored.status == "done"
        test = stored.summary["scores"]["test"]  # type: ignore[index]
        assert test == pytest.approx(strategy["test"]["mean"], abs=1e-4)
        assert 0 < strategy["calls"] <= 200


def test_protegi_and_pe2_run_on_the_embedded_model(
    embedded_server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _small_task(
        tmp_path,
        str(REPO / "tasks" / "yes_no_facts.jsonl"),
        "",
        "{train: 6, validation: 4, test: 8, seed: 5}",
    )
    model = _model_flags(embedded_server)
    run_dir = tmp_path / "runs"
    settings = ["-S", "protegi.beam=1", "-S", "protegi.gradients=2", "-S", "pe2.step_size=40"]
    flags = ["--steps", "1", "--max-calls", "200", "--run-dir", str(run_dir), "--json"]
    code = main(["compare", str(task), "--strategies", "protegi,pe2", *settings, *model, *flags])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    store = RunStore.open(run_dir)
    for strategy in report["strategies"]:
        (run_id,) = strategy["runs"]
        summary = store.get_run(run_id).summary
        assert summary is not None and summary["strategy"] == strategy["strategy"]
        _check_against_store(summary, task, run_dir)
    calls = store._db.execute("SELECT DISTINCT kind FROM optimizer_calls").fetchall()
    assert {"gradient", "pe2"} <= {row[0] for row in calls}

    # From Python, the same way.
    result = OproOptimizer(
        _chat(embedded_server, 1.0, 60),
        _chat(embedded_server, 0.0, 8),
        strategy=ProTeGi(beam=1, gradients=1, paraphrases=0),
        settings=SearchSettings(steps=1, concurrency=2),
    ).invoke(Task.from_yaml(task))
    assert result.strategy == "protegi" and result.scores["test"] is not None


def test_the_local_spec_starts_and_stops_its_own_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _small_task(
        tmp_path,
        str(REPO / "tasks" / "yes_no_facts.jsonl"),
        "",
        "{train: 2, validation: 0, test: 6, seed: 0}",
    )
    flags = ["--run-dir", str(tmp_path / "runs"), "--json"]
    code = main(["evaluate", str(task), "--instruction", "Answer with yes or no.", *flags])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 6 and result["failed"] == 0
    # The server's log went into the run directory.
    assert (tmp_path / "runs" / "llama-server.log").stat().st_size > 0


class _KillAfter(BaseCallbackHandler):
    """Stops the server after `calls` answers: the server dies mid-run."""

    def __init__(self, server: LocalServer, calls: int) -> None:
        self.server, self.calls, self.seen = server, calls, 0

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.seen += 1
        if self.seen == self.calls:
            self.server.stop()


def _chat(server: LocalServer, temperature: float, max_tokens: int) -> BaseChatModel:
    return openai_chat_model(
        server.model_name, ModelOptions(temperature, max_tokens), base_url=server.base_url
    )


def test_a_run_killed_with_its_server_resumes_on_a_new_server(tmp_path: Path) -> None:
    task = Task.from_yaml(
        _small_task(
            tmp_path,
            str(REPO / "tasks" / "yes_no_facts.jsonl"),
            "",
            "{train: 6, validation: 4, test: 6, seed: 1}",
        )
    )
    settings = SearchSettings(
        steps=1,
        concurrency=2,
        retry=RetryPolicy(attempts=2, initial_wait=0.05, max_wait=0.1),
    )
    store = RunStore.open(tmp_path / "runs")
    first = LocalServer(find_embedded_model(), tmp_path / "first.log")
    with first:
        optimizer = OproOptimizer(
            _chat(first, 1.0, 60),
            _chat(first, 0.0, 8),
            settings=settings,
            strategy=Opro(candidates_per_step=2),
            store=store,
            seed_optimizer_calls=True,
        )
        run_id = optimizer.prepare_run(task)
        with pytest.raises(LLMCallsFailingError):
            optimizer.invoke(task, {"callbacks": [_KillAfter(first, 4)]}, run_id=run_id)
    run_id = run_id
    assert run_id is not None
    assert store.get_run(run_id).status == "failed"
    paid = store.usage(run_id)["scorer_calls"] - store.failed_evaluations(run_id)
    assert paid >= 3

    with LocalServer(find_embedded_model(), tmp_path / "second.log") as second:
        result = OproOptimizer(
            _chat(second, 1.0, 60),
            _chat(second, 0.0, 8),
            settings=settings,
            strategy=Opro(candidates_per_step=2),
            store=store,
            seed_optimizer_calls=True,
        ).invoke(task, run_id=run_id)
    assert result.run_id == run_id
    assert store.get_run(run_id).status == "done"
    assert store.failed_evaluations(run_id) == 0
    assert result.scores["test"] is not None
