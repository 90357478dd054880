"""The run store: one SQLite database per run directory, every call persisted as it happens.

Each optimizer output and each scorer result is committed the moment it arrives, so a crash,
Ctrl-C or dead server leaves a consistent run; resuming replays the loop and reuses every
stored result instead of paying for the call again. The schema grows through MIGRATIONS.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opro_agent.errors import RunStoreError
from opro_agent.result import HistoryEntry

__all__ = [
    "DB_FILENAME",
    "Evaluation",
    "OptimizerCall",
    "RunInfo",
    "RunStore",
]

DB_FILENAME = "opro.db"
_BUSY_TIMEOUT = 60.0

# Append only: each entry runs once, in order, and bumps PRAGMA user_version.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        task TEXT NOT NULL,
        created_at REAL NOT NULL,
        status TEXT NOT NULL,
        config TEXT NOT NULL,
        summary TEXT
    );
    CREATE TABLE sessions (
        run_id TEXT NOT NULL REFERENCES runs(id),
        started_at REAL NOT NULL,
        ended_at REAL,
        status TEXT NOT NULL
    );
    CREATE TABLE optimizer_calls (
        run_id TEXT NOT NULL REFERENCES runs(id),
        step INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        output TEXT,
        error TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        PRIMARY KEY (run_id, step, idx)
    );
    CREATE TABLE instructions (
        run_id TEXT NOT NULL REFERENCES runs(id),
        key TEXT NOT NULL,
        text TEXT NOT NULL,
        step INTEGER NOT NULL,
        origin TEXT NOT NULL,
        PRIMARY KEY (run_id, key)
    );
    CREATE TABLE evaluations (
        run_id TEXT NOT NULL REFERENCES runs(id),
        instruction_key TEXT NOT NULL,
        split TEXT NOT NULL,
        example_id TEXT NOT NULL,
        prediction TEXT,
        score REAL NOT NULL,
        error TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        latency REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        PRIMARY KEY (run_id, instruction_key, example_id)
    );
    """,
    # Answers served by the response cache are recorded but were not paid for.
    """
    ALTER TABLE evaluations ADD COLUMN cached INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE optimizer_calls ADD COLUMN cached INTEGER NOT NULL DEFAULT 0;
    """,
    # Strategies: an optimizer-role call is identified by its kind too (proposal, forward,
    # resample, ...), and an instruction records the kind of call that made it and the
    # instruction it was derived from (its parent's key), so lineage can be read back.
    """
    CREATE TABLE optimizer_calls_v3 (
        run_id TEXT NOT NULL REFERENCES runs(id),
        step INTEGER NOT NULL,
        kind TEXT NOT NULL,
        idx INTEGER NOT NULL,
        output TEXT,
        error TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        cached INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, step, kind, idx)
    );
    INSERT INTO optimizer_calls_v3 SELECT run_id, step, 'proposal', idx, output, error,
        prompt_tokens, completion_tokens, created_at, cached FROM optimizer_calls;
    DROP TABLE optimizer_calls;
    ALTER TABLE optimizer_calls_v3 RENAME TO optimizer_calls;
    ALTER TABLE instructions ADD COLUMN kind TEXT;
    ALTER TABLE instructions ADD COLUMN parent TEXT;
    UPDATE instructions SET kind = CASE origin WHEN 'initial' THEN 'initial' ELSE 'proposal' END;
    ALTER TABLE evaluations ADD COLUMN logprob REAL;
    """,
)


@dataclass(frozen=True)
class RunInfo:
    id: str
    task: str
    created_at: float
    status: str
    config: Mapping[str, Any]
    summary: Mapping[str, Any] | None


@dataclass(frozen=True)
class OptimizerCall:
    output: str | None
    error: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


@dataclass(frozen=True)
class Evaluation:
    example_id: str
    split: str
    prediction: str | None
    score: float
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0
    cached: bool = False
    logprob: float | None = None  # the scorer's log probability of the gold answer, if known


class RunStore:
    """SQLite-backed record of runs. Use `RunStore.open(run_dir)`; `":memory:"` for throwaway."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            # Committed rows must survive the process. Each process writes from one thread
            # (its event loop's); the runs of a sweep are processes sharing the file, and a
            # writer waits for another's commit (up to _BUSY_TIMEOUT s) instead of failing.
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise RunStoreError(f"{self.path}: not a usable run store: {exc}") from None

    @classmethod
    def open(cls, run_dir: str | Path) -> RunStore:
        directory = Path(run_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStoreError(f"{directory}: cannot create the run directory: {exc}") from None
        return cls(directory / DB_FILENAME)

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RunStoreError(f"{self.path}: written by a newer opro-agent (schema {version})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            try:
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;"
                )
            except sqlite3.OperationalError:
                # Another process opening a new store at the same moment migrated it first
                # (its tables exist now): fine, unless the schema is still behind.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if self._db.execute("PRAGMA user_version").fetchone()[0] < number:
                    raise

    # -- runs ---------------------------------------------------------------------------------

    def create_run(self, task: str, config: Mapping[str, Any]) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        self._db.execute(
            "INSERT INTO runs (id, task, created_at, status, config) VALUES (?, ?, ?, ?, ?)",
            (run_id, task, time.time(), "running", json.dumps(config, ensure_ascii=False)),
        )
        return run_id

    def get_run(self, run_id: str) -> RunInfo:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            matches = self._db.execute(
                "SELECT * FROM runs WHERE id LIKE ? ORDER BY created_at", (run_id + "%",)
            ).fetchall()
            if len(matches) != 1:
                raise RunStoreError(f"no run {run_id!r} in {self.path}")
            row = matches[0]
        return _run_info(row)

    def list_runs(self) -> list[RunInfo]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
        return [_run_info(row) for row in rows]

    def set_status(
        self, run_id: str, status: str, summary: Mapping[str, Any] | None = None
    ) -> None:
        if summary is None:
            self._db.execute("UPDATE runs SET status = ? WHERE id = ?", (status, run_id))
        else:
            self._db.execute(
                "UPDATE runs SET status = ?, summary = ? WHERE id = ?",
                (status, json.dumps(summary, ensure_ascii=False), run_id),
            )

    def start_session(self, run_id: str) -> int:
        cursor = self._db.execute(
            "INSERT INTO sessions (run_id, started_at, status) VALUES (?, ?, 'running')",
            (run_id, time.time()),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def end_session(self, session: int, status: str) -> None:
        self._db.execute(
            "UPDATE sessions SET ended_at = ?, status = ? WHERE rowid = ?",
            (time.time(), status, session),
        )

    # -- optimizer calls ------------------------------------------------------------------------

    def optimizer_call(self, run_id: str, step: int, kind: str, idx: int) -> OptimizerCall | None:
        """A stored successful optimizer output; failed calls are retried, so not returned."""
        row = self._db.execute(
            "SELECT * FROM optimizer_calls WHERE run_id = ? AND step = ? AND kind = ?"
            " AND idx = ? AND error IS NULL",
            (run_id, step, kind, idx),
        ).fetchone()
        if row is None:
            return None
        return OptimizerCall(row["output"], None, row["prompt_tokens"], row["completion_tokens"])

    def has_optimizer_calls(self, run_id: str, step: int) -> bool:
        """Whether an earlier session began step `step` (it made an optimizer call)."""
        row = self._db.execute(
            "SELECT 1 FROM optimizer_calls WHERE run_id = ? AND step = ? LIMIT 1", (run_id, step)
        ).fetchone()
        return row is not None

    def record_optimizer_call(
        self, run_id: str, step: int, kind: str, idx: int, call: OptimizerCall
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO optimizer_calls (run_id, step, kind, idx, output, error,"
            " prompt_tokens, completion_tokens, created_at, cached)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                step,
                kind,
                idx,
                call.output,
                call.error,
                call.prompt_tokens,
                call.completion_tokens,
                time.time(),
                int(call.cached),
            ),
        )

    # -- instructions and evaluations -------------------------------------------------------------

    def add_instruction(
        self,
        run_id: str,
        key: str,
        text: str,
        step: int,
        *,
        origin: str,
        kind: str,
        parent: str | None = None,
    ) -> None:
        """Record an instruction once (the first record wins); `parent` is a key."""
        self._db.execute(
            "INSERT OR IGNORE INTO instructions (run_id, key, text, step, origin, kind, parent)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, key, text, step, origin, kind, parent),
        )

    def evaluations(self, run_id: str, instruction_key: str) -> dict[str, Evaluation]:
        """Successful stored results of one instruction, by example id."""
        rows = self._db.execute(
            "SELECT * FROM evaluations WHERE run_id = ? AND instruction_key = ? AND error IS NULL",
            (run_id, instruction_key),
        ).fetchall()
        return {row["example_id"]: _evaluation(row) for row in rows}

    def record_evaluation(self, run_id: str, instruction_key: str, result: Evaluation) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO evaluations (run_id, instruction_key, split, example_id,"
            " prediction, score, error, prompt_tokens, completion_tokens, latency, created_at,"
            " cached, logprob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                instruction_key,
                result.split,
                result.example_id,
                result.prediction,
                result.score,
                result.error,
                result.prompt_tokens,
                result.completion_tokens,
                result.latency,
                time.time(),
                int(result.cached),
                result.logprob,
            ),
        )

    def iter_evaluations(self, run_id: str) -> Iterator[tuple[str, Evaluation]]:
        rows = self._db.execute("SELECT * FROM evaluations WHERE run_id = ?", (run_id,))
        for row in rows:
            yield row["instruction_key"], _evaluation(row)

    # -- reports ----------------------------------------------------------------------------------

    def history(self, run_id: str) -> list[HistoryEntry]:
        """Every instruction of a run with its mean score per split, in the order found."""
        rows = self._db.execute(
            """
            SELECT i.step, i.origin, i.kind, i.text, p.text AS parent,
                   AVG(CASE WHEN e.split = 'train' THEN e.score END) AS train,
                   AVG(CASE WHEN e.split = 'validation' THEN e.score END) AS validation,
                   AVG(CASE WHEN e.split = 'test' THEN e.score END) AS test
            FROM instructions i
            LEFT JOIN instructions p ON p.run_id = i.run_id AND p.key = i.parent
            LEFT JOIN evaluations e ON e.run_id = i.run_id AND e.instruction_key = i.key
            WHERE i.run_id = ?
            GROUP BY i.key
            ORDER BY i.step, i.rowid
            """,
            (run_id,),
        ).fetchall()
        return [
            HistoryEntry(
                step=r["step"],
                origin=r["origin"],
                instruction=r["text"],
                train=r["train"],
                validation=r["validation"],
                test=r["test"],
                kind=r["kind"],
                parent=r["parent"],
            )
            for r in rows
        ]

    def usage(self, run_id: str) -> dict[str, int]:
        """Calls paid for and tokens spent by a run (failed attempts count: they were made).

        Answers served from the response cache are counted apart, as `cache_hits`.
        """
        totals = {"cache_hits": 0}
        for table, role in (("optimizer_calls", "optimizer"), ("evaluations", "scorer")):
            row = self._db.execute(
                "SELECT COALESCE(SUM(1 - cached), 0), COALESCE(SUM(cached), 0),"
                " COALESCE(SUM(prompt_tokens * (1 - cached)), 0),"
                f" COALESCE(SUM(completion_tokens * (1 - cached)), 0) FROM {table}"
                " WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            totals[f"{role}_calls"] = row[0]
            totals[f"{role}_prompt_tokens"] = row[2]
            totals[f"{role}_completion_tokens"] = row[3]
            totals["cache_hits"] += row[1]
            totals["prompt_tokens"] = totals.get("prompt_tokens", 0) + row[2]
            totals["completion_tokens"] = totals.get("completion_tokens", 0) + row[3]
        return totals

    def failed_evaluations(self, run_id: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM evaluations WHERE run_id = ? AND error IS NOT NULL", (run_id,)
        ).fetchone()
        return int(row[0])


def _run_info(row: sqlite3.Row) -> RunInfo:
    summary = json.loads(row["summary"]) if row["summary"] else None
    return RunInfo(
        row["id"], row["task"], row["created_at"], row["status"], json.loads(row["config"]), summary
    )


def _evaluation(row: sqlite3.Row) -> Evaluation:
    return Evaluation(
        example_id=row["example_id"],
        split=row["split"],
        prediction=row["prediction"],
        score=row["score"],
        error=row["error"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        latency=row["latency"],
        cached=bool(row["cached"]),
        logprob=row["logprob"],
    )
