"""Sweeps, hermetic: every combination is its own stored run, a second sweep reuses finished
runs and resumes unfinished ones, parallel workers share one store, and the flags' errors
are one line."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import pytest

from opro_agent import OproOptimizer, RunStore, SearchSettings, make_strategy
from opro_agent.compare import RunSummary
from opro_agent.store import DB_FILENAME
from opro_agent.sweep import SweepRun, find_run, run_signature, run_sweep
from tests.conftest import even_numbers_task, scorer_reply
from tests.fakes import ScriptedChatModel
from tests.test_cli_inputs import _run
from tests.test_cli_strategies import ape_models  # noqa: F401  (a fixture)
from tests.test_error_driven import any_reply

FLAGS = ["--strategies", "opro,ape", "--seeds", "0,1", "--steps", "1", "--max-parallel", "1"]
STRATEGY_SETTINGS = ["-S", "opro.candidates_per_step=2", "-S", "ape.proposals=2"]


@pytest.fixture
def two_tasks(task_file: Path, tmp_path: Path) -> list[Path]:
    other = tmp_path / "odd.yaml"
    other.write_text(task_file.read_text().replace("name: even_numbers", "name: odd_numbers"))
    return [task_file, other]


def _sweep(
    capsys: pytest.CaptureFixture[str], tasks: list[Path], run_dir: Path, *extra: str
) -> tuple[int, dict[str, Any], str]:
    argv = ["sweep", *map(str, tasks), *FLAGS, *STRATEGY_SETTINGS, "--run-dir", str(run_dir)]
    code, out, err = _run(capsys, [*argv, *extra, "--json"])
    return code, json.loads(out.strip().splitlines()[-1]), err


def test_a_sweep_runs_every_combination_then_reuses_and_resumes(
    two_tasks: list[Path],
    tmp_path: Path,
    ape_models: dict[str, list[ScriptedChatModel]],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "runs"
    code, report, _ = _sweep(capsys, two_tasks, run_dir)
    assert code == 0 and report["reused"] == 0 and report["failed"] == {}
    assert [t["task"] for t in report["tasks"]] == ["even_numbers", "odd_numbers"]
    store = RunStore.open(run_dir)
    runs = store.list_runs()
    assert len(runs) == 8 and {r.status for r in runs} == {"done"}  # 2 tasks x 2 x 2 seeds
    for task in report["tasks"]:
        assert [s["strategy"] for s in task["strategies"]] == ["opro", "ape"]
        for strategy in task["strategies"]:
            assert len(strategy["runs"]) == 2
            stored = [store.get_run(r) for r in strategy["runs"]]
            assert {r.task for r in stored} == {task["task"]}
            assert {r.config["settings"]["seed"] for r in stored} == {0, 1}
            tests = [r.summary["scores"]["test"] for r in stored]  # type: ignore[index]
            assert strategy["test"]["mean"] == pytest.approx(sum(tests) / 2, abs=1e-4)

    # The same sweep again: every run is found finished; nothing is called.
    calls = sum(len(m.calls) for models in ape_models.values() for m in models)
    code, again, _ = _sweep(capsys, two_tasks, run_dir)
    assert code == 0 and again["reused"] == 8 and again["tasks"] == report["tasks"]
    assert sum(len(m.calls) for models in ape_models.values() for m in models) == calls
    assert len(store.list_runs()) == 8

    # A run that stopped half way is resumed (the same run), not started again.
    stopped = report["tasks"][1]["strategies"][0]["runs"][1]
    store.set_status(stopped, "interrupted")
    code, resumed, _ = _sweep(capsys, two_tasks, run_dir)
    assert code == 0 and resumed["reused"] == 7
    assert resumed["tasks"][1]["strategies"][0]["runs"][1] == stopped
    assert store.get_run(stopped).status == "done" and len(store.list_runs()) == 8

    # Other settings are other runs.
    code, more, _ = _sweep(capsys, two_tasks[:1], run_dir, "--steps", "2")
    assert code == 0 and more["reused"] == 0 and len(store.list_runs()) == 12


def test_the_text_output_is_one_compare_table_per_task(
    two_tasks: list[Path],
    tmp_path: Path,
    ape_models: dict[str, list[ScriptedChatModel]],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["sweep", *map(str, two_tasks), *FLAGS, *STRATEGY_SETTINGS]
    code, out, _ = _run(capsys, [*argv, "--run-dir", str(tmp_path / "runs")])
    assert code == 0
    assert out.startswith("8 runs (0 reused from ")
    for task in ("even_numbers:", "odd_numbers:"):
        assert f"\n{task}\n" in out
    assert out.count("STRATEGY ") == 2 and out.count("best ape: ") == 2


def test_a_failing_run_does_not_stop_the_others(
    two_tasks: list[Path],
    tmp_path: Path,
    ape_models: dict[str, list[ScriptedChatModel]],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = tmp_path / "broken.yaml"
    shutil.copy(two_tasks[1], broken)
    tasks = [two_tasks[0], broken]
    argv = ["sweep", *map(str, tasks), *FLAGS, *STRATEGY_SETTINGS, "--json"]
    # The second task's data disappears after the sweep has read it: its runs fail.
    original = run_sweep

    def losing_data(runs: Any, worker: Any, **kwargs: Any) -> Any:
        (tmp_path / "facts.jsonl").rename(tmp_path / "gone.jsonl")
        try:
            return original(runs, worker, **kwargs)
        finally:
            (tmp_path / "gone.jsonl").rename(tmp_path / "facts.jsonl")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("opro_agent.cli.run_sweep", losing_data)
        code, out, err = _run(capsys, [*argv, "--run-dir", str(tmp_path / "runs")])
    assert code == 1
    report = json.loads(out.strip().splitlines()[-1])
    assert len(report["failed"]) == 8
    assert "run the same command again to resume them" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--executor", "ray"], "--executor: ray needs the ray extra"),
        (["--ray-address", "auto"], "--ray-address: needs --executor ray"),
        (["--replica-cpus", "2"], "--replica-cpus: needs --executor ray"),
        (["--max-parallel", "0"], "--max-parallel: must be at least 1"),
        (["--replicas", "2"], "unrecognized arguments: --replicas"),
    ],
)
def test_sweep_flag_errors_are_one_line(
    task_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    argv = ["sweep", str(task_file), "--strategies", "opro", *flags]
    code, _, err = _run(capsys, [*argv, "--run-dir", str(tmp_path / "runs")])
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# -- the sweep machinery without the CLI: processes sharing one store ----------------------------


SETTINGS = SearchSettings(steps=1, concurrency=4)


def _signature(strategy: str, seed: int) -> dict[str, Any]:
    spec = make_strategy({"name": strategy, **_STRATEGY[strategy]}).to_dict()
    return run_signature(
        "even_numbers",
        even_numbers_task().fingerprint(),
        spec,
        SETTINGS.replace(seed=seed),
        {"scorer": {"spec": "scripted"}},
    )


_STRATEGY: dict[str, dict[str, Any]] = {
    "opro": {"candidates_per_step": 2},
    "ape": {"proposals": 2, "resample_top": 1},
}


def scripted_worker(store_dir: str, run: SweepRun) -> RunSummary:
    """A sweep worker on scripted models (module level: worker processes import it)."""
    optimizer = OproOptimizer(
        ScriptedChatModel(respond=any_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=make_strategy({"name": run.strategy, **_STRATEGY[run.strategy]}),
        settings=SETTINGS.replace(seed=run.seed),
        store=RunStore.open(store_dir),
        run_metadata={"models": {"scorer": {"spec": "scripted"}}},
    )
    task = even_numbers_task()
    run_id = run.resume or optimizer.prepare_run(task)
    return optimizer.invoke(task, run_id=run_id).summary()


def test_parallel_workers_share_one_store(tmp_path: Path) -> None:
    import functools

    runs = [
        SweepRun("even.yaml", "even_numbers", strategy, seed, _signature(strategy, seed))
        for strategy in ("opro", "ape")
        for seed in (0, 1)
    ]
    worker = functools.partial(scripted_worker, str(tmp_path))
    outcome = run_sweep(runs, worker, run_dir=tmp_path, max_parallel=2)
    assert outcome.failures == {} and outcome.reused == 0
    assert set(outcome.summaries) == set(runs)
    store = RunStore.open(tmp_path)
    assert {r.status for r in store.list_runs()} == {"done"} and len(store.list_runs()) == 4
    for run in runs:
        found = find_run(store.list_runs(), run.signature)
        assert found is not None and found.id == outcome.summaries[run]["run_id"]
    assert run_sweep(runs, worker, run_dir=tmp_path, max_parallel=2).reused == 4


def _open_store(path: str) -> int:
    store = RunStore.open(path)
    run_id = store.create_run("t", {})
    store.set_status(run_id, "done")
    return len(run_id)


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        assert all(pool.map(_open_store, [str(tmp_path)] * 8))
    assert len(RunStore(tmp_path / DB_FILENAME).list_runs()) == 8
