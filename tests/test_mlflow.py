"""Experiment tracking: a run logged to a local MLflow folder store (`file:` URI) and read
back with MLflow's own client: params, the best-train curve, final scores with intervals,
tags and artifacts; and `--mlflow` on `optimize` and `compare`, with its one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from opro_agent import Opro, OproOptimizer, OptimizationResult, RunStore, SearchSettings, Task, cli
from opro_agent.providers import Models
from opro_agent.reports import mlflow as tracking
from tests.conftest import optimizer_reply, scorer_reply
from tests.fakes import ScriptedChatModel

NO_EXTRA = "opro-agent: error: --mlflow: needs the mlflow extra: pip install 'opro-agent[mlflow]'\n"


@pytest.fixture
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow installed (else the test skips); the environment as a user has it."""
    pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture
def no_html_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing the HTML report (a second a run), where a test does not look at it."""
    monkeypatch.setattr(tracking, "_log_report", lambda *args: None)


def _client(uri: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read one
    return MlflowClient(tracking_uri=uri)


def _runs(client: Any, experiment: str) -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    return list(client.search_runs([found.experiment_id], order_by=["attributes.start_time"]))


def _artifact(client: Any, run_id: str, path: str, tmp_path: Path) -> bytes:
    local = client.download_artifacts(run_id, path, dst_path=str(tmp_path))
    return Path(local).read_bytes()


def _optimize(task: Task, store: RunStore) -> OptimizationResult:
    return OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=Opro(candidates_per_step=4),
        settings=SearchSettings(steps=3),
        store=store,
    ).invoke(task)


def test_a_run_is_logged_with_its_settings_curve_scores_and_artifacts(
    yes_no_task: Task, tmp_path: Path, mlflow_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RunStore.open(tmp_path / "runs")
    result = _optimize(yes_no_task, store)
    uri = f"file:{tmp_path}/mlruns"

    mlflow_run_id = tracking.log_run(result, store, tracking_uri=uri)

    # The folder store was allowed for the call only: the user's environment is as it was.
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    client = _client(uri, monkeypatch)
    (run,) = _runs(client, "even_numbers")  # the task's name, by default
    assert run.info.run_id == mlflow_run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"opro-{result.run_id}"

    params = run.data.params
    assert params["task.name"] == "even_numbers"
    assert params["strategy.name"] == "opro"
    assert params["strategy.candidates_per_step"] == "4"
    assert params["strategy.early_rejection"] == "False"
    assert params["search.steps"] == "3"
    assert params["search.seed"] == "0"
    assert params["search.validate_top"] == "3"
    assert params["search.budget.max_calls"] == "None"
    assert params["search.retry.attempts"] == "3"
    assert params == tracking.run_params(store.get_run(result.run_id).config, task="even_numbers")

    # The best train score so far, per step: 'Think about it.' (0.5) at step 1, then
    # 'Answer with yes or no.' (1.0) from step 2 on.
    curve = client.get_metric_history(mlflow_run_id, tracking.BEST_TRAIN)
    assert [(m.step, m.value) for m in curve] == [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.0)]

    metrics = run.data.metrics
    for split in ("train", "validation", "test"):
        interval = result.intervals[split]
        assert interval is not None
        assert metrics[split] == result.scores[split] == 1.0
        assert metrics[f"{split}_low"] == pytest.approx(interval.low)
        assert metrics[f"{split}_high"] == pytest.approx(interval.high)
        assert metrics[f"{split}_low"] < 1.0
    comparison = result.test_comparison
    assert comparison is not None
    assert metrics["baseline_test"] == 0.0
    assert metrics["test_gain"] == result.test_gain == 1.0
    assert metrics["test_gain_low"] == pytest.approx(comparison.low)
    assert metrics["test_gain_high"] == pytest.approx(comparison.high)
    assert metrics["test_gain_p_value"] == pytest.approx(comparison.p_value)
    assert 0 < metrics["test_gain_p_value"] < 0.001
    assert metrics["calls_optimizer"] == result.calls["optimizer"] > 0
    assert metrics["calls_scorer"] == result.calls["scorer"] > 0
    assert metrics["tokens_prompt"] == result.tokens["prompt"] > 0
    assert metrics["tokens_completion"] == result.tokens["completion"] > 0
    assert metrics["cache_hits"] == 0
    assert metrics["wall_seconds"] == pytest.approx(result.wall_seconds)
    assert "cost_usd" not in metrics  # no price known: no cost, rather than a made-up 0

    tags = run.data.tags
    assert tags["opro_agent.run_id"] == result.run_id
    assert tags["opro_agent.stop_reason"] == "steps"
    assert tags["opro_agent.kept_initial"] == "false"
    assert tags["opro_agent.strategy"] == "opro"
    assert tags["opro_agent.run_store"] == store.path
    assert tags["opro_agent.verdict"].startswith("the gain is distinguishable from noise")

    artifacts = {a.path for a in client.list_artifacts(mlflow_run_id)}
    assert {"best_instruction.txt", "summary.json"} <= artifacts
    text = _artifact(client, mlflow_run_id, "best_instruction.txt", tmp_path / "a")
    assert text.decode() == "Answer with yes or no.\n"
    summary = json.loads(_artifact(client, mlflow_run_id, "summary.json", tmp_path / "b"))
    assert summary == json.loads(json.dumps(result.summary()))
    if importlib.util.find_spec("matplotlib") is None:  # the report extra is not installed
        assert artifacts == {"best_instruction.txt", "summary.json"}
    else:
        assert {"report.html", "search.png"} <= artifacts
        html = _artifact(client, mlflow_run_id, "report.html", tmp_path / "c").decode()
        assert html.lstrip().lower().startswith("<!doctype html")
        assert result.run_id in html and "Answer with yes or no." in html
        png = _artifact(client, mlflow_run_id, "search.png", tmp_path / "d")
        assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_without_the_report_extra_no_html_is_logged(
    yes_no_task: Task, tmp_path: Path, mlflow_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RunStore.open(tmp_path / "runs")
    result = _optimize(yes_no_task, store)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    uri = f"file:{tmp_path}/mlruns"
    mlflow_run_id = tracking.log_run(result, store, tracking_uri=uri)
    artifacts = {a.path for a in _client(uri, monkeypatch).list_artifacts(mlflow_run_id)}
    assert artifacts == {"best_instruction.txt", "summary.json"}


def test_runs_share_an_experiment_and_take_extra_tags(
    yes_no_task: Task,
    tmp_path: Path,
    mlflow_env: None,
    no_html_report: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = RunStore.open(tmp_path / "runs")
    first, second = _optimize(yes_no_task, store), _optimize(yes_no_task, store)
    uri = f"file:{tmp_path}/mlruns"
    tracking.log_run(first, store, tracking_uri=uri, experiment="prompts")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "prompts")
    tracking.log_run(second, store, tracking_uri=uri, tags={"team": "search"})
    runs = _runs(_client(uri, monkeypatch), "prompts")
    assert [r.data.tags["opro_agent.run_id"] for r in runs] == [first.run_id, second.run_id]
    assert "team" not in runs[0].data.tags and runs[1].data.tags["team"] == "search"


def test_a_failure_while_logging_is_one_error_and_a_failed_mlflow_run(
    yes_no_task: Task,
    tmp_path: Path,
    mlflow_env: None,
    no_html_report: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    store = RunStore.open(tmp_path / "runs")
    result = _optimize(yes_no_task, store)

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise MlflowException("the server said no\nand a long trace")

    monkeypatch.setattr(MlflowClient, "log_text", refuse)
    uri = f"file:{tmp_path}/mlruns"
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.log_run(result, store, tracking_uri=uri)
    assert str(caught.value) == (
        f"could not log run {result.run_id} to MLflow at {uri}: the server said no "
        "(the run itself is saved in its run store)"
    )
    (run,) = _runs(_client(uri, monkeypatch), "even_numbers")
    assert run.info.status == "FAILED"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_with_mlflow_logs_the_run(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    mlflow_env: None,
    no_html_report: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = f"file:{tmp_path}/mlruns"
    run_dir = str(tmp_path / "runs")
    argv = ["optimize", str(task_file), "--steps", "2", "--mlflow", uri, "--run-dir", run_dir]
    code, out, _ = _cli(capsys, *argv, "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    client = _client(uri, monkeypatch)
    (run,) = _runs(client, "even_numbers")
    assert run.data.tags["opro_agent.run_id"] == summary["run_id"]
    assert run.data.params["search.steps"] == "2"
    assert run.data.params["models.scorer.spec"] == "local"
    assert run.data.metrics["test"] == summary["scores"]["test"]
    curve = client.get_metric_history(run.info.run_id, tracking.BEST_TRAIN)
    assert [(m.step, m.value) for m in curve] == [(0, 0.0), (1, 0.5), (2, 1.0)]

    # Without a URI (here before the next flag): $MLFLOW_TRACKING_URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, _, _ = _cli(
        capsys, "optimize", str(task_file), "--mlflow", "--steps", "1", "--run-dir", run_dir
    )
    assert code == 0
    assert len(_runs(client, "even_numbers")) == 2


def test_compare_with_mlflow_logs_every_run(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    mlflow_env: None,
    no_html_report: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no URI, no $MLFLOW_TRACKING_URI: ./mlruns
    argv = ["compare", str(task_file), "--strategies", "opro", "--seeds", "0,1", "--steps", "1"]
    code, _, _ = _cli(capsys, *argv, "--run-dir", "runs", "--mlflow")
    assert code == 0
    runs = _runs(_client(f"file:{tmp_path}/mlruns", monkeypatch), "even_numbers")
    stored = RunStore.open(tmp_path / "runs").list_runs()
    assert sorted(r.data.tags["opro_agent.run_id"] for r in runs) == sorted(r.id for r in stored)
    assert sorted(r.data.params["search.seed"] for r in runs) == ["0", "1"]


def _no_model_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Models, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model server was started")

    monkeypatch.setattr(Models, "__init__", refuse)


@pytest.mark.parametrize("command", ["optimize", "compare"])
def test_without_the_extra_one_line_before_any_model_server_starts(
    command: str,
    task_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    _no_model_server(monkeypatch)
    argv = [command, str(task_file), "--mlflow", "--run-dir", str(tmp_path / "runs")]
    if command == "compare":
        argv += ["--strategies", "opro"]
    code, out, err = _cli(capsys, *argv)
    assert (code, out, err) == (2, "", NO_EXTRA)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("nope://tracking", "{uri}: not a usable MLflow tracking URI: unknown scheme 'nope'"),
        ("file:{tmp}/a-file/mlruns", "{uri}: not a usable MLflow tracking URI: [Errno 20] "),
        # Fine with the full mlflow package; with mlflow-skinny, the error says what it needs.
        ("sqlite:///{tmp}/mlflow.db", "{uri}: a database tracking store needs the full mlflow"),
    ],
)
def test_a_bad_tracking_uri_is_one_line(
    uri: str,
    message: str,
    task_file: Path,
    tmp_path: Path,
    mlflow_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    uri = uri.format(tmp=tmp_path)
    if uri.startswith("sqlite") and importlib.util.find_spec("sqlalchemy") is not None:
        pytest.skip("the full mlflow package is installed: sqlite works")
    _no_model_server(monkeypatch)
    code, out, err = _cli(
        capsys, "optimize", str(task_file), "--mlflow", uri, "--run-dir", str(tmp_path / "r")
    )
    assert (code, out) == (2, "")
    assert err.startswith(f"opro-agent: error: --mlflow: {message.format(uri=uri)}")
    assert err.count("\n") == 1


def test_a_task_file_after_a_bare_mlflow_flag_is_pointed_out(
    task_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse exits from inside the parser
        cli.main(["optimize", "--mlflow", str(task_file), "--steps", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --mlflow: " in err and "put --mlflow after it, or write --mlflow=URI" in err
    assert err.count("\n") == 1


def test_a_failure_while_logging_exits_1_after_the_result_is_printed(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    mlflow_env: None,
    no_html_report: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise MlflowException("disk full")

    monkeypatch.setattr(MlflowClient, "log_batch", refuse)
    uri = f"file:{tmp_path}/mlruns"
    argv = ["optimize", str(task_file), "--steps", "1", "--run-dir", str(tmp_path / "runs")]
    code, out, err = _cli(capsys, *argv, "--mlflow", uri)
    assert code == 1
    assert "Best instruction (run " in out
    last = err.splitlines()[-1]
    assert last.startswith("opro-agent: error: could not log run ")
    assert last.endswith(
        f"to MLflow at {uri}: disk full (the run itself is saved in its run store)"
    )
