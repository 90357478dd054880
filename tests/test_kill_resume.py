"""kill -9 in the middle of a run, then resume: for every built-in strategy the resumed run
reaches the uninterrupted run's result, and no stored answer is asked for again."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from opro_agent import OproOptimizer, RunStore, SearchSettings, Task, make_strategy
from opro_agent.store import DB_FILENAME
from tests.conftest import even_numbers_task, scorer_reply
from tests.fakes import ScriptedChatModel
from tests.test_error_driven import any_reply

REPO = Path(__file__).resolve().parents[1]
STRATEGIES: dict[str, dict[str, Any]] = {
    "opro": {"name": "opro", "candidates_per_step": 4, "early_rejection": True},
    "ape": {"name": "ape", "proposals": 4, "demos": 3, "resample_top": 2, "variations": 2},
    "protegi": {"name": "protegi", "beam": 2, "gradients": 2, "bandit_pulls": 2},
    "pe2": {"name": "pe2", "candidates_per_step": 3, "step_size": 10},
}
SETTINGS = SearchSettings(steps=3, concurrency=4)
# The child process: the same run, its scorer slowed down so it can be killed mid-run.
CHILD = """
import sys, time
from opro_agent import OproOptimizer, RunStore, make_strategy
from tests.conftest import scorer_reply
from tests.fakes import ScriptedChatModel
from tests.test_error_driven import any_reply
from tests.test_kill_resume import SETTINGS, STRATEGIES, task

def slow(messages, metadata):
    time.sleep(0.01)
    return scorer_reply(messages, metadata)

name = sys.argv[2]
optimizer = OproOptimizer(
    ScriptedChatModel(respond=any_reply),
    ScriptedChatModel(respond=slow),
    strategy=make_strategy(STRATEGIES[name]),
    settings=SETTINGS,
    store=RunStore.open(sys.argv[1]),
)
run_id = optimizer.prepare_run(task())
print(run_id, flush=True)
optimizer.invoke(task(), run_id=run_id)
"""


def task() -> Task:
    return even_numbers_task()


def _run(name: str, store: RunStore, run_id: str | None = None) -> tuple[Any, ScriptedChatModel]:
    scorer = ScriptedChatModel(respond=scorer_reply)
    result = OproOptimizer(
        ScriptedChatModel(respond=any_reply),
        scorer,
        strategy=make_strategy(STRATEGIES[name]),
        settings=SETTINGS,
        store=store,
    ).invoke(task(), run_id=run_id)
    return result, scorer


def _stored_answers(path: Path) -> int:
    try:
        db = sqlite3.connect(path)
        try:
            return int(db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:  # not created yet
        return 0


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_killed_run_resumes_exactly(name: str, tmp_path: Path) -> None:
    reference, reference_scorer = _run(name, RunStore(":memory:"))
    paid_in_full = reference.calls["scorer"]

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), name],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    run_id = child.stdout.readline().strip()
    deadline = time.monotonic() + 60
    # Kill it in the middle of step 1 or later: after the initial instruction's 20 answers.
    while _stored_answers(tmp_path / DB_FILENAME) < 40 and time.monotonic() < deadline:
        assert child.poll() is None, "the run to be killed died by itself"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    stored_before = _stored_answers(tmp_path / DB_FILENAME)
    assert 40 <= stored_before < paid_in_full, "killed mid-run"

    store = RunStore.open(tmp_path)
    assert store.get_run(run_id).status == "running"  # it never got to say otherwise
    resumed, scorer = _run(name, store, run_id)

    assert resumed.run_id == run_id
    assert resumed.best_instruction == reference.best_instruction
    assert resumed.scores == reference.scores
    assert resumed.history == reference.history
    assert resumed.saved_by_early_rejection == reference.saved_by_early_rejection
    # Stored answers were not asked for again: the two sessions made the reference's calls
    # (answers in flight at the kill were lost, and asked again: they were never stored).
    assert len(scorer.calls) == paid_in_full - stored_before
    assert len(reference_scorer.calls) == paid_in_full
    assert store.get_run(run_id).status == "done"
