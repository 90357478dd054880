"""Turning optimizer output into candidate instructions: parse, normalise, dedupe."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

__all__ = ["dedupe_key", "instruction_key", "normalise_instruction", "parse_instruction"]

_FENCE_RE = re.compile(r"^```[\w-]*\s*|\s*```$")
_LABEL_RE = re.compile(r"^(?:new\s+)?(?:instruction|prompt|text)\s*[:\-]\s*", re.IGNORECASE)
_QUOTE_PAIRS = {
    '"': '"',
    "'": "'",
    "`": "`",
    "\u201c": "\u201d",
    "\u2018": "\u2019",
    "\u00ab": "\u00bb",
}
_TAG_RE = re.compile(r"</?[A-Za-z][\w-]*>")


def parse_instruction(output: str, tag: str) -> str | None:
    """The first instruction wrapped in <tag>...</tag>, tolerant of what LLMs do to tags.

    Accepts a closed pair, an opening tag with no closing one (the text up to a blank line),
    a lone closing tag (the text before it), and markdown around it. None when nothing usable.
    """
    text = output.strip()
    tags = re.escape(tag)
    closed = re.search(rf"<{tags}>(.*?)</{tags}>", text, re.IGNORECASE | re.DOTALL)
    if closed:
        found = closed.group(1)
    elif (opened := re.search(rf"<{tags}>", text, re.IGNORECASE)) is not None:
        # Up to a blank line or the next tag; a bare "<" (as in "a < b") is kept.
        found = re.split(rf"\n\s*\n|{_TAG_RE.pattern}", text[opened.end() :], maxsplit=1)[0]
    elif (closing := re.search(rf"</{tags}>", text, re.IGNORECASE)) is not None:
        found = re.split(rf"\n\s*\n|{_TAG_RE.pattern}", text[: closing.start()])[-1]
    else:
        return None
    instruction = normalise_instruction(found)
    return instruction or None


def normalise_instruction(text: str) -> str:
    """Strip markdown, labels and wrapping quotes; collapse runs of spaces."""
    text = unicodedata.normalize("NFC", text).strip()
    text = _FENCE_RE.sub("", text).strip()
    text = text.replace("**", "").replace("__", "")
    text = _LABEL_RE.sub("", text)
    # Unwrap quotes only around the whole text: '"Yes" if true, else "No"' keeps its quotes.
    while (
        len(text) >= 2
        and _QUOTE_PAIRS.get(text[0]) == text[-1]
        and text[0] not in text[1:-1]
        and text[-1] not in text[1:-1]
    ):
        text = text[1:-1].strip()
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return "\n".join(line for line in lines if line).strip()


def dedupe_key(text: str) -> str:
    """Instructions with the same key are the same instruction (case, width, spacing folded)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = " ".join(folded.split())
    return folded.rstrip(".!;:, ")


def instruction_key(text: str) -> str:
    """A stable id for an instruction's exact text (what the run store keys results by)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def unique(texts: Iterable[str], seen: set[str]) -> list[str]:
    """`texts` without those whose dedupe key is in `seen` (which is updated)."""
    out = []
    for text in texts:
        key = dedupe_key(text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out
