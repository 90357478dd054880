"""The raw rows of one stored run, read straight from its SQLite file (read only).

`RunStore` answers the questions the search asks (one instruction's results, totals); a report
needs every row with its timestamps, so it reads them here over a separate read-only
connection and never writes to the store.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from opro_agent.errors import RunStoreError
from opro_agent.store import RunStore

__all__ = ["EvaluationRow", "InstructionRow", "OptimizerCallRow", "RunRecords", "read_records"]


@dataclass(frozen=True)
class InstructionRow:
    key: str
    text: str
    step: int
    origin: str  # initial | optimizer
    kind: str  # initial, proposal, forward, reverse, resample, ...
    parent: str | None  # the parent's key


@dataclass(frozen=True)
class EvaluationRow:
    instruction_key: str
    split: str
    example_id: str
    prediction: str | None
    score: float
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    latency: float
    created_at: float
    cached: bool


@dataclass(frozen=True)
class OptimizerCallRow:
    step: int
    kind: str
    idx: int
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    created_at: float
    cached: bool


@dataclass(frozen=True)
class SessionRow:
    started_at: float
    ended_at: float | None
    status: str


@dataclass(frozen=True)
class RunRecords:
    instructions: tuple[InstructionRow, ...]  # in the order found (step, then insertion)
    evaluations: tuple[EvaluationRow, ...]
    optimizer_calls: tuple[OptimizerCallRow, ...]
    sessions: tuple[SessionRow, ...]


def read_records(store: RunStore, run_id: str) -> RunRecords:
    """Every row of run `run_id` (an exact id: resolve prefixes with `store.get_run`)."""
    path = Path(store.path)
    if store.path == ":memory:" or not path.is_file():
        raise RunStoreError(f"{store.path}: a report needs a run store on disk")
    try:
        connection = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise RunStoreError(f"{store.path}: cannot read the run store: {exc}") from None
    with closing(connection) as db:
        try:
            return _read(db, run_id)
        except sqlite3.Error as exc:
            raise RunStoreError(f"{store.path}: cannot read run {run_id}: {exc}") from None


def _read(db: sqlite3.Connection, run_id: str) -> RunRecords:
    instructions = tuple(
        InstructionRow(key, text, step, origin, kind or "proposal", parent)
        for key, text, step, origin, kind, parent in db.execute(
            "SELECT key, text, step, origin, kind, parent FROM instructions"
            " WHERE run_id = ? ORDER BY step, rowid",
            (run_id,),
        )
    )
    evaluations = tuple(
        EvaluationRow(
            key,
            split,
            example_id,
            prediction,
            float(score),
            error,
            pt,
            ct,
            float(latency),
            at,
            bool(cached),
        )
        for key, split, example_id, prediction, score, error, pt, ct, latency, at, cached in (
            db.execute(
                "SELECT instruction_key, split, example_id, prediction, score, error,"
                " prompt_tokens, completion_tokens, latency, created_at, cached"
                " FROM evaluations WHERE run_id = ? ORDER BY created_at",
                (run_id,),
            )
        )
    )
    calls = tuple(
        OptimizerCallRow(step, kind, idx, error, pt, ct, at, bool(cached))
        for step, kind, idx, error, pt, ct, at, cached in db.execute(
            "SELECT step, kind, idx, error, prompt_tokens, completion_tokens, created_at, cached"
            " FROM optimizer_calls WHERE run_id = ? ORDER BY created_at",
            (run_id,),
        )
    )
    sessions = tuple(
        SessionRow(started, ended, status)
        for started, ended, status in db.execute(
            "SELECT started_at, ended_at, status FROM sessions WHERE run_id = ?"
            " ORDER BY started_at",
            (run_id,),
        )
    )
    return RunRecords(instructions, evaluations, calls, sessions)
