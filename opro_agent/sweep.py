"""Sweeps: every (task, strategy, seed) combination as its own stored run, run in parallel.

Each combination is one ordinary run in the run store, so it can be inspected, reported and
resumed like any other. Before anything runs, the store is searched for a run made with the
same task data, strategy, result-affecting search settings and models: a finished one is
reused as it is, an unfinished one is resumed, and only the rest start afresh. So running
the same sweep again picks up where the last one stopped.

Runs go to workers, each with its own models: a pool of processes on this machine (`local`,
at most `max_parallel` at once; one at a time runs in this process) or one Ray task per run
(`ray`, each reserving `run_cpus` CPUs). Every worker writes to the one SQLite run store
(WAL, with a busy timeout: concurrent writers wait for each other instead of failing). WAL
needs every writer on one host, so a sweep is safe on one machine; on a cluster of several
nodes the run directory would have to be shared at the same path by all of them, and a
worker that cannot see it refuses to start (rather than write a store nobody reads).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from opro_agent.compare import RunSummary
from opro_agent.errors import ConfigError
from opro_agent.ray_pool import ray_cluster
from opro_agent.settings import SearchSettings
from opro_agent.store import RunInfo, RunStore

__all__ = [
    "SweepOutcome",
    "SweepRun",
    "Worker",
    "find_run",
    "run_signature",
    "run_sweep",
]

log = structlog.get_logger()


def run_signature(
    task: str,
    task_fingerprint: str,
    strategy: Mapping[str, Any],
    settings: SearchSettings,
    models: Mapping[str, Any],
) -> dict[str, Any]:
    """What a stored run must have been made with to stand for a combination: the same
    task (name, data and settings), strategy and settings, search settings that change
    results, and models."""
    signature: dict[str, Any] = _plain(
        {
            "task": task,
            "task_fingerprint": task_fingerprint,
            "strategy": strategy,
            "settings": settings.result_affecting(),
            "models": models,
        }
    )
    return signature


@dataclass(frozen=True)
class SweepRun:
    """One combination. `signature` comes from `run_signature`; `resume` is the stored run
    to continue, when the sweep found one."""

    task_path: str
    task: str
    strategy: str
    seed: int
    signature: Mapping[str, Any] = field(hash=False, compare=False)
    resume: str | None = field(default=None, compare=False)

    def describe(self) -> str:
        return f"{self.task} {self.strategy} seed {self.seed}"


# A worker runs one combination (resuming `run.resume` if set) and returns its summary. It
# must be picklable: a module-level function, or a functools.partial of one.
Worker = Callable[[SweepRun], RunSummary]


def _plain(value: Any) -> Any:
    """As JSON would give it back (tuples become lists), so stored configs compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _stored_signature(run: RunInfo) -> dict[str, Any] | None:
    config = run.config
    if "task_fingerprint" not in config or "settings" not in config:
        return None  # not an optimization run (an `evaluate`, or an older version's)
    try:
        settings = SearchSettings.from_dict(config["settings"])
    except (TypeError, ConfigError):
        return None
    return run_signature(
        run.task,
        config["task_fingerprint"],
        config.get("strategy", {}),
        settings,
        config.get("models", {}),
    )


def find_run(runs: Iterable[RunInfo], signature: Mapping[str, Any]) -> RunInfo | None:
    """The finished run with this signature, else the latest unfinished one, else None."""
    matching = [r for r in runs if _stored_signature(r) == signature]
    done = [r for r in matching if r.status == "done" and r.summary is not None]
    if done:
        return done[0]
    return max(matching, key=lambda r: r.created_at, default=None)


@dataclass
class SweepOutcome:
    """What a sweep gave: each combination's summary, or why it failed."""

    summaries: dict[SweepRun, RunSummary] = field(default_factory=dict)
    failures: dict[SweepRun, str] = field(default_factory=dict)
    reused: int = 0  # finished runs found in the store, not run again

    def by_task(self, order: Sequence[SweepRun]) -> dict[str, dict[str, list[RunSummary]]]:
        """task -> strategy -> summaries by seed, in the order of the combinations."""
        grouped: dict[str, dict[str, list[RunSummary]]] = {}
        for run in order:
            summary = self.summaries.get(run)
            if summary is not None:
                grouped.setdefault(run.task, {}).setdefault(run.strategy, []).append(summary)
        return grouped


def run_sweep(
    runs: Sequence[SweepRun],
    worker: Worker,
    *,
    run_dir: Path,
    executor: str = "local",
    address: str | None = None,
    max_parallel: int | None = None,
    run_cpus: float = 1.0,
) -> SweepOutcome:
    """Run every combination not finished yet, in parallel; finished ones are reused.

    A failing run does not stop the others: its error is in `failures`. Ctrl-C stops the
    workers (each keeps what it did) and propagates.
    """
    outcome = SweepOutcome()
    store = RunStore.open(run_dir)
    try:
        stored = store.list_runs()
    finally:
        store.close()
    pending = []
    for run in runs:
        found = find_run(stored, run.signature)
        if found is not None and found.status == "done" and found.summary is not None:
            outcome.summaries[run] = found.summary
            outcome.reused += 1
        else:
            pending.append(run if found is None else _with_resume(run, found.id))
    log.info("sweep.plan", runs=len(runs), reused=outcome.reused, to_run=len(pending))
    if not pending:
        return outcome
    if executor == "ray":
        _on_ray(pending, worker, outcome, run_dir, address, max_parallel, run_cpus)
    else:
        _on_processes(pending, worker, outcome, max_parallel or os.cpu_count() or 1)
    return outcome


def _with_resume(run: SweepRun, run_id: str) -> SweepRun:
    return SweepRun(run.task_path, run.task, run.strategy, run.seed, run.signature, run_id)


def _record(outcome: SweepOutcome, run: SweepRun, result: RunSummary | BaseException) -> None:
    if isinstance(result, BaseException):
        message = str(result).strip().splitlines()[0] if str(result).strip() else ""
        outcome.failures[run] = f"{type(result).__name__}: {message}" if message else repr(result)
        log.error("sweep.run_failed", run=run.describe(), error=outcome.failures[run])
    else:
        outcome.summaries[run] = result
        log.info("sweep.run_done", run=run.describe(), run_id=result.get("run_id"))


def _on_processes(
    pending: Sequence[SweepRun], worker: Worker, outcome: SweepOutcome, max_parallel: int
) -> None:
    if max_parallel == 1 or len(pending) == 1:  # one at a time: no process needed
        for run in pending:
            try:
                result: RunSummary | BaseException = worker(run)
            except Exception as exc:
                result = exc
            _record(outcome, run, result)
        return
    # Spawned, not forked: the parent may hold threads (HTTP clients, a progress bar).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max_parallel, mp_context=context) as pool:
        futures: dict[Future[RunSummary], SweepRun] = {
            pool.submit(worker, run): run for run in pending
        }
        try:
            for future in as_completed(futures):
                error = future.exception()
                _record(outcome, futures[future], error if error else future.result())
        except BaseException:
            # Ctrl-C reached the workers too (one process group): they stop and keep their
            # work; runs not started yet are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _on_ray(
    pending: Sequence[SweepRun],
    worker: Worker,
    outcome: SweepOutcome,
    run_dir: Path,
    address: str | None,
    max_parallel: int | None,
    run_cpus: float,
) -> None:
    # A file only this sweep writes: a worker that cannot read it is on a node that does not
    # share the run directory, and would write a separate store nobody reads.
    marker = run_dir / f".sweep-{secrets.token_hex(4)}"
    marker.write_text(marker.name)
    try:
        with ray_cluster(address) as ray:
            task = ray.remote(_in_ray_worker).options(num_cpus=run_cpus, max_retries=0)
            limit = max_parallel or len(pending)
            queue = list(pending)
            in_flight: dict[Any, SweepRun] = {}
            try:
                while queue or in_flight:
                    while queue and len(in_flight) < limit:
                        run = queue.pop(0)
                        in_flight[task.remote(worker, run, str(marker))] = run
                    done, _ = ray.wait(list(in_flight), num_returns=1)
                    for ref in done:
                        run = in_flight.pop(ref)
                        try:
                            result: RunSummary | BaseException = ray.get(ref)
                        except ray.exceptions.RayTaskError as exc:
                            result = exc.cause if isinstance(exc.cause, BaseException) else exc
                        except ray.exceptions.RayError as exc:  # the worker died
                            result = exc
                        _record(outcome, run, result)
            except BaseException:
                for ref in in_flight:  # a KeyboardInterrupt in each: it stops cleanly
                    ray.cancel(ref)
                raise
    finally:
        marker.unlink(missing_ok=True)


def _in_ray_worker(worker: Worker, run: SweepRun, marker: str) -> RunSummary:
    path = Path(marker)
    if not path.is_file():
        raise ConfigError(
            f"{path.parent} is not visible on node {socket.gethostname()}: a sweep across "
            "nodes needs the run directory on storage every node mounts at the same path",
            field="--run-dir",
        )
    return worker(run)
