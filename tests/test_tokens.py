"""Token counting offline: never a download, exact only when tiktoken's file is cached."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import tiktoken
import tiktoken.load
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompt_values import ChatPromptValue

from opro_agent import tokens
from opro_agent.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    count_message_tokens,
    count_tokens,
    tiktoken_available,
)

FAKE_URL = "https://example.invalid/encodings/fake.tiktoken"
FAKE_BYTES = b"not a real encoding"
FAKE_SHA = hashlib.sha256(FAKE_BYTES).hexdigest()


class WordEncoder:
    """Stands in for a tiktoken Encoding: one token per whitespace-separated word."""

    def encode_ordinary(self, text: str) -> list[int]:
        return list(range(len(text.split())))


@pytest.fixture(autouse=True)
def fresh_encoder() -> Iterator[None]:
    tokens._load_encoder.cache_clear()
    yield
    tokens._load_encoder.cache_clear()


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attempt tiktoken makes to fetch a blob (the loader swallows errors, so record)."""
    attempts: list[str] = []

    def no_download(blobpath: str) -> bytes:
        attempts.append(blobpath)
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    return attempts


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "tiktoken-cache"
    directory.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(directory))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    return directory


@pytest.fixture
def get_encoding_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fake_get_encoding(name: str) -> WordEncoder:
        calls.append(name)
        return WordEncoder()

    monkeypatch.setattr(tiktoken, "get_encoding", fake_get_encoding)
    return calls


def cache_blob(url: str, data: bytes) -> None:
    path = tokens._cache_path(url)
    assert path is not None
    path.write_bytes(data)


def fake_encodings(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    monkeypatch.setattr(
        tokens, "_ENCODINGS", tuple((name, f"{FAKE_URL}/{name}", FAKE_SHA) for name in names)
    )


# -- the heuristic, with an empty cache --------------------------------------------------------


def test_empty_cache_uses_heuristic_without_downloading(
    cache_dir: Path, downloads: list[str]
) -> None:
    assert not tiktoken_available()
    assert count_tokens("abcdefgh") == 2
    assert downloads == []
    assert list(cache_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0), ("a", 1), (" ", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100), ("x" * 401, 101)],
)
def test_heuristic_values(cache_dir: Path, downloads: list[str], text: str, expected: int) -> None:
    assert count_tokens(text) == expected


def test_disabled_cache_never_loads(
    monkeypatch: pytest.MonkeyPatch, downloads: list[str], get_encoding_calls: list[str]
) -> None:
    # tiktoken treats an empty cache dir as "always download".
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert not tiktoken_available()
    assert count_tokens("hello world") == 3
    assert get_encoding_calls == []
    assert downloads == []


def test_corrupt_cache_file_is_not_used(
    cache_dir: Path, downloads: list[str], get_encoding_calls: list[str]
) -> None:
    # tiktoken would delete a file with the wrong hash and download it again.
    for _, url, _ in tokens._ENCODINGS:
        cache_blob(url, b"truncated")
    assert not tiktoken_available()
    assert count_tokens("abcd") == 1
    assert get_encoding_calls == []
    assert downloads == []


# -- the exact path, when a file is cached ---------------------------------------------------


def test_cached_file_uses_tiktoken_once(
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    downloads: list[str],
    get_encoding_calls: list[str],
) -> None:
    fake_encodings(monkeypatch, "o200k_base", "cl100k_base")
    cache_blob(f"{FAKE_URL}/o200k_base", FAKE_BYTES)
    assert tiktoken_available()
    assert count_tokens("one two three four five six seven eight") == 8
    assert count_tokens("one") == 1
    assert count_message_tokens([("human", "a b"), ("ai", "c")]) == 3 + 2 * 4
    assert get_encoding_calls == ["o200k_base"]
    assert downloads == []


def test_falls_back_to_cl100k_when_only_it_is_cached(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, get_encoding_calls: list[str]
) -> None:
    fake_encodings(monkeypatch, "o200k_base", "cl100k_base")
    cache_blob(f"{FAKE_URL}/cl100k_base", FAKE_BYTES)
    assert count_tokens("a b c") == 3
    assert get_encoding_calls == ["cl100k_base"]


def test_load_failure_falls_back_and_warns_once(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_encodings(monkeypatch, "o200k_base")
    cache_blob(f"{FAKE_URL}/o200k_base", FAKE_BYTES)
    calls: list[str] = []

    def broken(name: str) -> WordEncoder:
        calls.append(name)
        raise RuntimeError("plugin missing")

    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    with structlog.testing.capture_logs() as logs:
        assert count_tokens("abcdefgh") == 2
        assert count_tokens("abcdefgh") == 2
        assert not tiktoken_available()
    assert calls == ["o200k_base"]
    warnings = [e for e in logs if e["event"] == "tokens.estimate_heuristic"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert "plugin missing" in warnings[0]["errors"]["o200k_base"]


def test_encode_failure_falls_back_to_heuristic(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken:
        def encode_ordinary(self, text: str) -> list[int]:
            raise ValueError("cannot encode")

    monkeypatch.setattr(tokens, "_load_encoder", lambda: Broken())
    assert count_tokens("abcdefgh") == 2


# -- agreement with the installed tiktoken ---------------------------------------------------


def test_encoding_urls_and_hashes_match_tiktoken() -> None:
    source = inspect.getsource(importlib.import_module("tiktoken_ext.openai_public"))
    for name, url, sha256 in tokens._ENCODINGS:
        assert f"def {name}(" in source
        assert url in source
        assert sha256 in source


def test_cache_path_is_where_tiktoken_reads(cache_dir: Path, downloads: list[str]) -> None:
    cache_blob(FAKE_URL, FAKE_BYTES)
    assert tiktoken.load.read_file_cached(FAKE_URL, FAKE_SHA) == FAKE_BYTES
    assert downloads == []


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TIKTOKEN_CACHE_DIR": "/a", "DATA_GYM_CACHE_DIR": "/b"}, Path("/a")),
        ({"DATA_GYM_CACHE_DIR": "/b"}, Path("/b")),
        ({}, Path(tempfile.gettempdir()) / "data-gym-cache"),
        ({"TIKTOKEN_CACHE_DIR": ""}, None),
    ],
)
def test_cache_dir_resolution(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: Path | None
) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert tokens._cache_dir() == expected


# -- messages ---------------------------------------------------------------------------------


def test_message_overhead(cache_dir: Path, downloads: list[str]) -> None:
    assert MESSAGE_OVERHEAD_TOKENS == 4
    tuples = [("system", "abcd"), ("human", "abcdefgh")]
    messages = [SystemMessage("abcd"), HumanMessage("abcdefgh")]
    assert count_message_tokens(tuples) == 1 + 2 + 2 * 4
    assert count_message_tokens(messages) == 1 + 2 + 2 * 4
    assert count_message_tokens(ChatPromptValue(messages=messages)) == 1 + 2 + 2 * 4
    assert count_message_tokens("abcd") == 1 + 4
    assert count_message_tokens([]) == 0
    assert count_message_tokens([("human", "")]) == 4
    assert downloads == []


def test_content_blocks_count_their_text(cache_dir: Path) -> None:
    message = AIMessage(content=[{"type": "text", "text": "abcd"}, "efgh", {"type": "image"}])
    assert count_message_tokens([message]) == 2 + 4
