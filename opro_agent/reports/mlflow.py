"""Experiment tracking: a finished run logged to MLflow (needs the `mlflow` extra).

`log_run(result, store)` makes one MLflow run of one opro-agent run:

- params: the strategy's settings (`strategy.*`), the search settings (`search.*`, budget and
  retries included), the task (`task.name`, `task.fingerprint`) and the models (`models.*`);
- the metric `best_train`: the best train score found so far, one value per step (the
  curve of the HTML report: instructions stopped early by racing do not count);
- final metrics: the winner's `train`, `validation` and `test` scores with their 95%
  intervals (`test_low`, `test_high`, ...), the best initial instruction's `baseline_test`,
  `test_gain` with its paired test (`test_gain_low`, `test_gain_high`, `test_gain_p_value`),
  calls, tokens, `cost_usd`, `cache_hits`, `wall_seconds`;
- tags: `opro_agent.run_id`, `opro_agent.stop_reason`, `opro_agent.kept_initial`, ...;
- artifacts: `best_instruction.txt`, `summary.json` (what `optimize --json` prints) and,
  when the `report` extra is installed, `report.html` and its chart `search.png`.

The tracking URI is the one given, else `$MLFLOW_TRACKING_URI`, else `./mlruns`. The
`mlflow` extra installs mlflow-skinny, which logs to a folder (`file:PATH`, or a plain path)
or to an MLflow server (`http(s)://...`); a database URI (`sqlite:///...`) needs the full
`mlflow` package. MLflow 3 keeps its folder store only on request
(`MLFLOW_ALLOW_FILE_STORE`): a folder named here is that request, so it is set while logging.

This module configures no logging: it only keeps MLflow's own loggers at WARNING while it
calls MLflow, and puts them back after.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from opro_agent.errors import ConfigError, OproError
from opro_agent.reports.data import RunReport
from opro_agent.result import OptimizationResult
from opro_agent.store import RunStore

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "INSTALL_HINT",
    "TrackingError",
    "check_tracking_uri",
    "log_run",
    "resolve_tracking_uri",
    "run_params",
]

INSTALL_HINT = "needs the mlflow extra: pip install 'opro-agent[mlflow]'"
DEFAULT_TRACKING_DIR = "mlruns"
BEST_TRAIN = "best_train"  # the metric series: best train score so far, per step
TAG_PREFIX = "opro_agent."
# MLflow's limits (mlflow.utils.validation), kept here so an old or new MLflow cannot
# turn a long setting into a failed run.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_PARAMS_PER_BATCH = 100  # params or tags
_METRICS_PER_BATCH = 1000
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_KNOWN_SCHEMES = ("", "file", "http", "https", "databricks", "databricks-uc", "uc")
log = structlog.get_logger()


class TrackingError(OproError):
    """MLflow refused the run or could not be reached; the run itself is saved."""


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The URI runs are logged to: `tracking_uri`, else `$MLFLOW_TRACKING_URI`, else
    `./mlruns`; a plain path becomes an absolute `file:` URI."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_DIR
    if _is_local(uri) and not uri.startswith("file:"):
        return Path(uri).expanduser().absolute().as_uri()
    return uri


def check_tracking_uri(tracking_uri: str | None = None, *, field: str | None = None) -> str:
    """Check that runs can be logged to `tracking_uri` (see `resolve_tracking_uri`) before
    a run starts, and return the resolved URI. A folder store is created; a server is asked
    once, without retries.

    Raises:
        ConfigError: the extra is not installed, or the URI is unusable (one line,
            naming `field`).
    """
    _import_mlflow(field)
    uri = resolve_tracking_uri(tracking_uri)
    with _mlflow_session(uri, check=True):
        try:
            _client(uri).search_experiments(max_results=1)
        except Exception as exc:  # MLflow raises many kinds; each is a bad URI here
            raise ConfigError(_unusable(uri, exc), field=field) from None
    return uri


def log_run(
    result: OptimizationResult,
    store: RunStore,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log a finished run to MLflow as one MLflow run; returns its MLflow run id.

    `experiment` is an experiment name (created if missing); by default
    `$MLFLOW_EXPERIMENT_NAME`, else the task's name. `tags` are added to the run's tags.

    Raises:
        ConfigError: the `mlflow` extra is not installed.
        TrackingError: MLflow refused the run or could not be reached (the MLflow run, if
            it was created, is marked FAILED).
    """
    _import_mlflow(None)
    from mlflow.entities import Metric, Param, RunTag

    uri = resolve_tracking_uri(tracking_uri)
    run = store.get_run(result.run_id)
    report = RunReport.from_store(store, run.id)
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or result.task
    now = _millis(time.time())
    params = [Param(k, v) for k, v in run_params(run.config, task=run.task).items()]
    metrics = [
        Metric(BEST_TRAIN, point.score, now, point.step)
        for point in report.best_so_far
        if math.isfinite(point.score)
    ]
    metrics += [Metric(k, v, now, 0) for k, v in _final_metrics(result).items()]
    all_tags = {**_run_tags(result, run.config, store), **(tags or {})}
    run_tags = [RunTag(k, _cut(v, _MAX_TAG_VALUE)) for k, v in all_tags.items()]
    with _mlflow_session(uri, check=False):
        try:
            client = _client(uri)
            mlflow_run = client.create_run(
                _experiment_id(client, name),
                start_time=_millis(run.created_at),
                run_name=f"{result.strategy}-{result.run_id}",
            )
        except Exception as exc:  # MLflow raises many kinds; each means nothing was logged
            raise _not_logged(result, uri, exc) from exc
        mlflow_run_id: str = mlflow_run.info.run_id
        try:
            for start in range(0, len(params), _PARAMS_PER_BATCH):
                client.log_batch(mlflow_run_id, params=params[start : start + _PARAMS_PER_BATCH])
            for start in range(0, len(run_tags), _PARAMS_PER_BATCH):
                client.log_batch(mlflow_run_id, tags=run_tags[start : start + _PARAMS_PER_BATCH])
            for start in range(0, len(metrics), _METRICS_PER_BATCH):
                client.log_batch(mlflow_run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])
            client.log_text(mlflow_run_id, result.best_instruction + "\n", "best_instruction.txt")
            client.log_text(
                mlflow_run_id,
                json.dumps(result.summary(), ensure_ascii=False, indent=2) + "\n",
                "summary.json",
            )
            _log_report(client, mlflow_run_id, report)
            client.set_terminated(mlflow_run_id, "FINISHED")
        except Exception as exc:  # MLflow raises many kinds; each means the run wasn't logged
            with contextlib.suppress(Exception):
                client.set_terminated(mlflow_run_id, "FAILED")
            raise _not_logged(result, uri, exc) from exc
    log.info("mlflow.logged", run_id=result.run_id, mlflow_run_id=mlflow_run_id, uri=uri)
    return mlflow_run_id


def run_params(config: Mapping[str, Any], *, task: str | None = None) -> dict[str, str]:
    """A stored run's settings as flat MLflow params: `strategy.*`, `search.*`,
    `models.<role>.*`, `task.*` and `target_kind`."""
    params: dict[str, str] = {}
    if task is not None:
        params["task.name"] = task
    if config.get("task_fingerprint"):
        params["task.fingerprint"] = str(config["task_fingerprint"])
    _flatten("strategy", config.get("strategy") or {}, params)
    _flatten("search", config.get("settings") or {}, params)
    _flatten("models", config.get("models") or {}, params)
    if config.get("target_kind"):
        params["target_kind"] = str(config["target_kind"])
    return params


# -- what is logged ---------------------------------------------------------------------------


def _flatten(prefix: str, value: Any, into: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, into)
    elif isinstance(value, (list, tuple)):
        into[prefix] = _cut(json.dumps(value, ensure_ascii=False), _MAX_PARAM_VALUE)
    else:
        into[prefix] = _cut(str(value), _MAX_PARAM_VALUE)


def _final_metrics(result: OptimizationResult) -> dict[str, float]:
    values: dict[str, float | None] = {}
    for split in ("train", "validation", "test"):
        values[split] = result.scores.get(split)
        interval = result.intervals.get(split)
        if interval is not None:
            values[f"{split}_low"] = interval.low
            values[f"{split}_high"] = interval.high
    if result.baselines:
        values["baseline_test"] = max(result.baselines.values())
    values["test_gain"] = result.test_gain
    comparison = result.test_comparison
    if comparison is not None:
        values["test_gain_low"] = comparison.low
        values["test_gain_high"] = comparison.high
        values["test_gain_p_value"] = comparison.p_value
    for role, calls in result.calls.items():
        values[f"calls_{role}"] = calls
    for kind, tokens in result.tokens.items():
        values[f"tokens_{kind}"] = tokens
    values["cost_usd"] = result.cost
    values["cache_hits"] = result.cache_hits
    values["saved_by_early_rejection"] = result.saved_by_early_rejection
    values["wall_seconds"] = result.wall_seconds
    return {
        key: float(value)
        for key, value in values.items()
        if value is not None and math.isfinite(value)
    }


def _run_tags(
    result: OptimizationResult, config: Mapping[str, Any], store: RunStore
) -> dict[str, str]:
    tags = {
        "run_id": result.run_id,
        "task": result.task,
        "strategy": result.strategy,
        "stop_reason": result.stop_reason,
        "kept_initial": "true" if result.kept_initial else "false",
        "run_store": store.path,
        "version": _version(),
    }
    if result.selection_reason:
        tags["selection_reason"] = result.selection_reason
    if result.test_comparison is not None:
        tags["verdict"] = result.test_comparison.verdict()
    if config.get("task_path"):
        tags["task_path"] = str(config["task_path"])
    named = {TAG_PREFIX + key: value for key, value in tags.items()}
    named["mlflow.source.name"] = "opro-agent"
    return named


def _log_report(client: MlflowClient, mlflow_run_id: str, report: RunReport) -> None:
    """The HTML report and its main chart, when the `report` extra is installed."""
    try:
        import matplotlib  # noqa: F401  (the report extra; html may be imported already)

        from opro_agent.reports.html import render_report
    except ImportError as exc:  # the report extra is not installed
        log.debug("mlflow.no_report", reason=str(exc))
        return
    rendered = render_report(report)
    client.log_text(mlflow_run_id, rendered.html, "report.html")
    if rendered.main_chart is not None:
        with _artifact_file("search.png", rendered.main_chart) as path:
            client.log_artifact(mlflow_run_id, str(path))


@contextlib.contextmanager
def _artifact_file(name: str, data: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="opro-agent-") as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        yield path


# -- MLflow -----------------------------------------------------------------------------------


def _import_mlflow(field: str | None) -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT, field=field) from None


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except Exception:  # made meanwhile by another process
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"the MLflow experiment {name!r} is deleted: restore it, or name another"
        )
    return str(found.experiment_id)


@contextlib.contextmanager
def _mlflow_session(uri: str, *, check: bool) -> Iterator[None]:
    """MLflow's loggers at WARNING at least, and the environment a call to `uri` needs;
    all put back after. A check asks a server once, without retries."""
    env = {"MLFLOW_ALLOW_FILE_STORE": "true"} if _is_local(uri) else {}
    if check:
        env |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    logger = logging.getLogger("mlflow")
    level = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    with _environment(env):
        try:
            yield
        finally:
            logger.setLevel(level)


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set the variables the user has not set; unset them after."""
    added = [key for key in values if key not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _is_local(uri: str) -> bool:
    scheme = urlsplit(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter


def _unusable(uri: str, exc: BaseException) -> str:
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme in _DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        return (
            f"{uri}: a database tracking store needs the full mlflow package "
            "(pip install mlflow); the mlflow extra logs to file:PATH or http(s)://SERVER"
        )
    if scheme not in _KNOWN_SCHEMES and "unsupported URI" in str(exc):
        return (
            f"{uri}: not a usable MLflow tracking URI: unknown scheme {scheme!r} "
            "(give file:PATH, a folder or http(s)://SERVER)"
        )
    return f"{uri}: not a usable MLflow tracking URI: {_brief(exc)}"


def _not_logged(result: OptimizationResult, uri: str, exc: BaseException) -> TrackingError:
    return TrackingError(
        f"could not log run {result.run_id} to MLflow at {uri}: {_brief(exc)} "
        "(the run itself is saved in its run store)"
    )


def _brief(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return _cut(text, 300)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _millis(seconds: float) -> int:
    return int(seconds * 1000)


def _version() -> str:
    try:
        return version("opro-agent")
    except PackageNotFoundError:
        return "unknown"
