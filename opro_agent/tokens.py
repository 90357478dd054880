"""Token estimates that never touch the network.

tiktoken downloads its encoding files on first use. This module only hands work to tiktoken
when the file is already in tiktoken's local cache (and intact); otherwise it estimates
with ~4 characters per token. Counting never raises and never waits on a download.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import structlog
from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import PromptValue

__all__ = [
    "CHARS_PER_TOKEN",
    "MESSAGE_OVERHEAD_TOKENS",
    "count_message_tokens",
    "count_tokens",
    "tiktoken_available",
]

log = structlog.get_logger()

CHARS_PER_TOKEN = 4
# Role and separator tokens the chat format adds around each message (OpenAI uses 3-4).
MESSAGE_OVERHEAD_TOKENS = 4

_BLOB = "https://openaipublic.blob.core.windows.net/encodings"
# (name, URL, sha256) as in tiktoken_ext.openai_public, in order of preference.
_ENCODINGS: tuple[tuple[str, str, str], ...] = (
    (
        "o200k_base",
        f"{_BLOB}/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    (
        "cl100k_base",
        f"{_BLOB}/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
)


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


def _cache_dir() -> Path | None:
    """tiktoken's cache directory, resolved as `tiktoken.load.read_file_cached` does."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    # An empty value disables tiktoken's cache, so every load would download.
    return Path(cache_dir) if cache_dir else None


def _cache_path(url: str) -> Path | None:
    cache_dir = _cache_dir()
    if cache_dir is None:
        return None
    return cache_dir / hashlib.sha1(url.encode()).hexdigest()


def _is_cached(url: str, sha256: str) -> bool:
    # tiktoken deletes and re-downloads a cached file whose hash is wrong, so check it too.
    path = _cache_path(url)
    if path is None:
        return False
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


_load_lock = threading.Lock()


def _encoder() -> _Encoder | None:
    # The lock keeps concurrent first calls from loading the encoding twice.
    with _load_lock:
        return _load_encoder()


@functools.cache
def _load_encoder() -> _Encoder | None:
    """The first encoding whose file is cached locally, loaded once; None means heuristic."""
    errors: dict[str, str] = {}
    for name, url, sha256 in _ENCODINGS:
        if not _is_cached(url, sha256):
            continue
        try:
            import tiktoken

            encoder: _Encoder = tiktoken.get_encoding(name)
            return encoder
        except Exception as exc:  # any failure must degrade to the estimate, not crash
            errors[name] = f"{type(exc).__name__}: {exc}"
    if errors:
        log.warning("tokens.estimate_heuristic", reason="encoding failed to load", errors=errors)
    else:
        log.debug("tokens.estimate_heuristic", reason="no tiktoken encoding in the local cache")
    return None


def tiktoken_available() -> bool:
    """Whether exact tiktoken counts are possible offline (decided once per process)."""
    return _encoder() is not None


def _heuristic(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def count_tokens(text: str) -> int:
    """Tokens in `text`: exact with a cached tiktoken encoding, else ~4 characters per token."""
    if not text:
        return 0
    encoder = _encoder()
    if encoder is not None:
        try:
            return len(encoder.encode_ordinary(text))
        except Exception:  # e.g. text with lone surrogates; an estimate is good enough
            pass
    return max(1, _heuristic(text))


def _content_text(content: object) -> str:
    """Text of a message content: a string or a list of strings and content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts: list[str] = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "".join(parts)
    return "" if content is None else str(content)


def _message_text(message: object) -> str:
    # Callers pass LangChain payloads typed as Any, so odd shapes are estimated, not rejected.
    if isinstance(message, BaseMessage):
        return _content_text(message.content)
    if isinstance(message, (tuple, list)) and len(message) == 2:
        return _content_text(message[1])
    if isinstance(message, dict):
        return _content_text(message.get("content"))
    return _content_text(message)


def count_message_tokens(
    messages: Sequence[tuple[str, str]] | Sequence[BaseMessage] | PromptValue | str,
) -> int:
    """Tokens of a chat prompt: contents plus a per-message overhead (a string is one message)."""
    if isinstance(messages, PromptValue):
        messages = messages.to_messages()
    if isinstance(messages, (str, dict)) or not isinstance(messages, Iterable):
        return count_tokens(_content_text(messages)) + MESSAGE_OVERHEAD_TOKENS
    return sum(count_tokens(_message_text(m)) + MESSAGE_OVERHEAD_TOKENS for m in messages)
