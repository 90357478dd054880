"""On a local Ray cluster with the real embedded model: a run scored by two replicas equals
the same run without Ray, a replica killed mid-run loses nothing, and a sweep of 2 tasks x 2
seeds stores four runs and prints the table. Kept small: tiny tasks, one step, greedy scorer.
"""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from opro_agent import Opro, OproOptimizer, RunStore, SearchSettings, Task
from opro_agent.cli import main
from opro_agent.local_server import find_embedded_model
from opro_agent.providers import ModelOptions, connection_errors, openai_chat_model
from opro_agent.ray_pool import PoolSettings, ReplicaPool, ServerSpec
from tests.conftest import needs_llama

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pip install -e '.[ray]')",
)
pytestmark = [pytest.mark.integration, pytest.mark.ray, needs_llama, needs_ray]

REPO = Path(__file__).resolve().parents[1]
STEP = ["--steps", "1", "--seed", "0", "--no-cache", "--json"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local cluster for these tests (the CLI joins it instead of starting its own)."""
    import ray

    ray.init(include_dashboard=False, object_store_memory=100 * 1024 * 1024, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _task(tmp_path: Path, name: str = "facts", seed: int = 3) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ndata: {{path: {REPO / 'tasks' / 'yes_no_facts.jsonl'}}}\n"
        "metric: boolean\ninstruction_position: system\nanswer_max_tokens: 8\n"
        f"split: {{train: 4, validation: 3, test: 4, seed: {seed}}}\n"
    )
    return path


def _answers(store: RunStore, run_id: str) -> dict[tuple[str, str], str | None]:
    return {(key, e.example_id): e.prediction for key, e in store.iter_evaluations(run_id)}


def test_two_replicas_give_the_result_of_one_server(
    ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _task(tmp_path)
    summaries = {}
    for label, executor in (("alone", []), ("ray", ["--executor", "ray", "--replicas", "2"])):
        run_dir = tmp_path / label
        flags = ["--candidates", "2", "--run-dir", str(run_dir), *STEP]
        assert main(["optimize", str(task), *executor, *flags]) == 0
        summaries[label] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    alone, ray = summaries["alone"], summaries["ray"]
    for key in ("best_instruction", "scores", "baselines", "calls", "tokens", "stop_reason"):
        assert ray[key] == alone[key], key
    assert _answers(RunStore.open(tmp_path / "ray"), ray["run_id"]) == _answers(
        RunStore.open(tmp_path / "alone"), alone["run_id"]
    )
    # Both replicas served, each from its own log.
    logs = sorted(p.name for p in (tmp_path / "ray").glob("llama-server-*.log"))
    assert logs == ["llama-server-r0.log", "llama-server-r1.log"]


class _KillReplicaAfter(BaseCallbackHandler):
    """Kills a replica's actor (ray.kill, as an operator or a node failure would) after
    `calls` answers; its server dies with it."""

    def __init__(self, pool: ReplicaPool, calls: int) -> None:
        self.pool, self.calls, self.seen = pool, calls, 0
        self.killed_url: str | None = None

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        import ray

        self.seen += 1
        if self.seen == self.calls:
            replica = self.pool.replicas[0]
            self.killed_url = ray.get(replica.actor.base_url.remote())
            ray.kill(replica.actor)


def test_a_replica_killed_mid_run_loses_nothing(ray_cluster: None, tmp_path: Path) -> None:
    task = Task.from_yaml(_task(tmp_path))
    spec = ServerSpec(find_embedded_model(), tmp_path)
    store = RunStore.open(tmp_path / "runs")
    with ReplicaPool(PoolSettings(replicas=2), spec, connection_errors()) as pool:

        def model(temperature: float, max_tokens: int) -> Any:
            options = ModelOptions(temperature, max_tokens)
            return pool.chat_model(
                lambda url: openai_chat_model(spec.model_name, options, base_url=url)
            )

        optimizer = OproOptimizer(
            model(1.0, 60),
            model(0.0, 8),
            strategy=Opro(candidates_per_step=2),
            settings=SearchSettings(steps=1, concurrency=4),
            store=store,
            seed_optimizer_calls=True,
        )
        killer = _KillReplicaAfter(pool, 6)
        result = optimizer.invoke(task, {"callbacks": [killer]})
        served = pool.replica_set.served()
    assert store.get_run(result.run_id).status == "done"
    assert store.failed_evaluations(result.run_id) == 0
    assert result.scores["test"] is not None
    splits = task.splits()
    scored = {e.example_id for _, e in store.iter_evaluations(result.run_id)}
    assert scored == {e.id for e in (*splits.train, *splits.validation, *splits.test)}
    assert served["r1"] > 0 and sum(served.values()) >= 6
    # The killed actor's server went with it: nothing answers on its port.
    assert killer.killed_url is not None
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{killer.killed_url}/models", timeout=5)


def test_a_sweep_on_ray_stores_four_runs_and_prints_the_table(
    ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = [str(_task(tmp_path, "facts_a", 3)), str(_task(tmp_path, "facts_b", 4))]
    run_dir = tmp_path / "runs"
    argv = ["sweep", *tasks, "--strategies", "opro", "--seeds", "0,1", "--executor", "ray"]
    flags = ["-S", "opro.candidates_per_step=2", "--run-dir", str(run_dir), *STEP[:2], "--json"]
    assert main([*argv, *flags]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["failed"] == {} and report["reused"] == 0
    assert [t["task"] for t in report["tasks"]] == ["facts_a", "facts_b"]
    runs = RunStore.open(run_dir).list_runs()
    assert len(runs) == 4 and {r.status for r in runs} == {"done"}
    assert {(r.task, r.config["settings"]["seed"]) for r in runs} == {
        ("facts_a", 0),
        ("facts_a", 1),
        ("facts_b", 0),
        ("facts_b", 1),
    }
    # Again, as text: every run is reused, and the table is printed per task.
    assert main([*argv, *flags[:-1]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 runs (4 reused from ")
    assert "\nfacts_a:\n" in out and "\nfacts_b:\n" in out and out.count("best opro: ") == 2


def test_the_readme_ray_example_runs(
    ray_cluster: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's Python example as printed, on a smaller task."""
    readme = (REPO / "README.md").read_text()
    (block,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "PoolSettings" in b
    ]
    assert '"tasks/yes_no_facts.yaml"' in block
    block = block.replace('"tasks/yes_no_facts.yaml"', repr(str(_task(tmp_path))))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["ray_result"]
    assert result.scores["test"] is not None
    # The last line: structlog's default (no CLI configured it) also logs to stdout.
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(result.best_instruction.strip()[:20])
    assert sorted(p.name for p in (tmp_path / "runs").glob("llama-server-r*.log")) == [
        "llama-server-r0.log",
        "llama-server-r1.log",
    ]
