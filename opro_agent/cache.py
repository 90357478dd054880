"""A persistent cache of LLM responses, shared across steps and runs.

Keyed by the model's identity (provider, model, parameters, server), the full input and any
per-call arguments (such as a sampling seed), so an identical call is never paid twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage

from opro_agent.errors import ConfigError

__all__ = ["CachedResponse", "ResponseCache", "default_cache_dir"]


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/opro-agent`, else `~/.cache/opro-agent`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "opro-agent"


# text, prompt tokens, completion tokens, token log probabilities (when the model gave them)
CachedResponse = tuple[str, int, int, list[Any] | None]


def _plain(value: Any) -> Any:
    if isinstance(value, BaseMessage):
        return {"type": value.type, "content": value.content}
    raise TypeError(f"cannot key a cache entry on {type(value).__name__}")


class ResponseCache:
    """SQLite file of responses; `ResponseCache(":memory:")` for a throwaway one."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # Shared by every process of a sweep: wait for another writer's commit.
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=60.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT NOT NULL,"
                " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,"
                " created_at REAL NOT NULL)"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
            if "logprobs" not in columns:  # caches written before log probabilities were kept
                with contextlib.suppress(sqlite3.OperationalError):  # another process did it
                    self._db.execute("ALTER TABLE responses ADD COLUMN logprobs TEXT")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the response cache: {exc}", source=self.path) from None

    @classmethod
    def open(cls, directory: str | Path | None = None) -> ResponseCache:
        return cls(Path(directory or default_cache_dir()) / "responses.db")

    @staticmethod
    def key(identity: str, payload: Any, kwargs: dict[str, Any]) -> str:
        blob = json.dumps([identity, payload, kwargs], default=_plain, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> CachedResponse | None:
        row = self._db.execute(
            "SELECT text, prompt_tokens, completion_tokens, logprobs FROM responses WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        return (row[0], row[1], row[2], None if row[3] is None else json.loads(row[3]))

    def put(self, key: str, response: CachedResponse) -> None:
        text, prompt_tokens, completion_tokens, logprobs = response
        self._db.execute(
            "INSERT OR REPLACE INTO responses (key, text, prompt_tokens, completion_tokens,"
            " created_at, logprobs) VALUES (?, ?, ?, ?, ?, ?)",
            (
                key,
                text,
                prompt_tokens,
                completion_tokens,
                time.time(),
                None if logprobs is None else json.dumps(logprobs),
            ),
        )

    def close(self) -> None:
        self._db.close()
