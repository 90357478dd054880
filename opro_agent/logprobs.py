"""Rank instructions by the scorer's log probability of the gold answer (APE's log-prob score).

APE (Zhou et al., 2022) can score an instruction by ``log P(gold answer | instruction,
question)`` under the scorer model instead of by execution accuracy: a smoother signal that
still separates instructions whose accuracy ties. Teacher forcing the gold answer needs a
provider-specific completions endpoint and the chat template applied by hand, so this module
*estimates* the same quantity from an ordinary chat response generated with logprobs on, which
any OpenAI-compatible scorer can return::

    llm = ChatOpenAI(..., temperature=0, logprobs=True, top_logprobs=5)
    score = gold_logprob(llm.invoke(messages), "yes")   # None: fall back to accuracy

:func:`gold_logprob` takes the message (or its ``response_metadata``, or the ``logprobs``
object inside it). The shape is OpenAI's, which langchain-openai copies verbatim::

    response_metadata["logprobs"] == {
        "content": [
            {"token": "No", "bytes": None, "logprob": -1.18,
             "top_logprobs": [{"token": "No", "bytes": None, "logprob": -1.18},
                              {"token": "To", "bytes": None, "logprob": -2.06},
                              {"token": "Yes", "bytes": None, "logprob": -2.11}]},
            {"token": ",", "bytes": None, "logprob": -0.32, "top_logprobs": [...]},
        ],
        "refusal": None,
    }

Measured against llama-cpp-python 0.3.36's server (the embedded SmolLM2) via ChatOpenAI:

* ``logprobs=True`` alone returns ``"logprobs": None``: llama.cpp only computes logprobs
  when ``top_logprobs`` is set too (``top_logprobs=0`` gives the chosen token alone).
* Its ``top_logprobs`` always include the chosen token, keyed by token text; special tokens
  such as the end-of-turn token appear as ``""``; the end-of-turn token that stops the answer
  gets no entry of its own.
* It sorts the whole vocabulary in Python for every generated token: a logprobs call costs
  ~70 ms more per generated token (8 tokens: ~0.6 s instead of ~0.11 s) whatever ``top_logprobs``.
* Values move by up to ~0.1 between identical requests (prompt-prefix cache reuse changes the
  batch split), so treat differences that small as ties.

The estimate is a ranking signal, not a probability: it mixes exact terms, lower bounds (token
paths it cannot follow are dropped) and upper bounds (unseen continuations and floors), and
all the rules below are chosen so that a more confident right answer scores higher.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeAlias

from langchain_core.messages import BaseMessage

__all__ = [
    "MIN_LOGPROB",
    "LogprobSource",
    "TokenLogprob",
    "gold_logprob",
    "mean_logprob",
    "token_logprobs",
]

LogprobSource: TypeAlias = BaseMessage | Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""A chat message, its ``response_metadata``, the ``logprobs`` object in it, or its
``content`` list of per-token entries."""

MIN_LOGPROB = -100.0
"""Token logprobs are clamped to at least this: OpenAI reports ``-9999.0`` for tokens it
rounds to zero, and a single such sentinel would otherwise dominate any mean."""

# A gold continuation that the response never reached because it ended first is charged
# log(1/2): if the model stopped greedily there, the end token beat every other token, so a
# token continuing the gold had probability at most min(p_end, 1 - p_end) <= 1/2. (For a
# response cut off by max_tokens it is only a guess: give the scorer room for the answer.)
_UNSEEN_REST = -math.log(2.0)

# Answer lead-ins that chat models write before the answer itself: leading whitespace and
# markdown, "Answer:", "The final answer is", "**". Matched against the whole normalised text
# of a run of leading tokens; those tokens are format, not answer, so their logprobs are not
# counted and the estimate is conditional on the lead-in the model chose.
_LEAD_IN = re.compile(
    r"[\s\"'`*_#>]*"
    r"(?:(?:the\s+)?(?:final\s+|correct\s+|short\s+)?answer(?:\s+is)?\s*[:=\-]?[\s\"'`*_]*)?"
)
# "The final answer is:" is about six tokens; no lead-in is longer than this.
_MAX_LEAD_IN_TOKENS = 16

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its logprob and the alternatives the provider listed
    (``top`` holds ``(token, logprob)`` pairs and may be empty)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    def candidates(self) -> list[tuple[str, float]]:
        """The listed alternatives plus the chosen token, which OpenAI may leave out."""
        if any(token == self.token for token, _ in self.top):
            return list(self.top)
        return [*self.top, (self.token, self.logprob)]


class _Match(Enum):
    PREFIX = "prefix"  # the text so far is a (possibly empty) prefix of the gold answer
    COVER = "cover"  # the text so far contains the whole gold answer, then a word boundary
    DIVERGE = "diverge"  # the text so far can no longer become the gold answer


def token_logprobs(source: LogprobSource) -> list[TokenLogprob] | None:
    """The generated tokens with their logprobs, or None if ``source`` carries none.

    None covers every reason the estimate cannot be made: a provider or model that does not
    return logprobs (no ``logprobs`` key, or ``None`` as llama.cpp sends without
    ``top_logprobs``), an empty generation, or entries of an unknown shape. Malformed
    *alternatives* are only skipped: the chosen tokens alone still give an estimate.
    """
    if isinstance(source, BaseMessage):
        data: Any = source.response_metadata.get("logprobs")
    elif isinstance(source, Mapping):
        # response_metadata holds "logprobs"; the logprobs object itself holds "content".
        data = source.get("logprobs") if "logprobs" in source else source
    else:
        data = source
    content = data.get("content") if isinstance(data, Mapping) else data
    if not isinstance(content, Sequence) or isinstance(content, (str, bytes)) or not content:
        return None
    tokens: list[TokenLogprob] = []
    for entry in content:
        if not isinstance(entry, Mapping):
            return None
        token, logprob = entry.get("token"), _as_logprob(entry.get("logprob"))
        if not isinstance(token, str) or logprob is None:
            return None
        top: list[tuple[str, float]] = []
        alternatives = entry.get("top_logprobs")
        if isinstance(alternatives, Sequence) and not isinstance(alternatives, (str, bytes)):
            for alternative in alternatives:
                if not isinstance(alternative, Mapping):
                    continue
                alt_token = alternative.get("token")
                alt_logprob = _as_logprob(alternative.get("logprob"))
                if isinstance(alt_token, str) and alt_logprob is not None:
                    top.append((alt_token, alt_logprob))
        tokens.append(TokenLogprob(token, logprob, tuple(top)))
    return tokens


def gold_logprob(source: LogprobSource, gold: str) -> float | None:
    """Estimate ``log P(gold)`` from a chat response's token logprobs, without teacher forcing.

    Returns None when ``source`` carries no token logprobs (see :func:`token_logprobs`), so
    the caller can fall back to accuracy. Raises ValueError if ``gold`` is blank.

    Text is compared case-insensitively, with runs of whitespace as one space and leading
    whitespace ignored, so " Yes", "yes" and "YES" all match the gold "yes". The rules:

    1. **Lead-in.** If the first token does not start the gold answer, the longest run of
       leading tokens that reads as a lead-in ("Answer:", "The answer is", whitespace, "**")
       is skipped, always leaving at least one token. Its logprobs are not counted.
    2. **Matching tokens.** While the generated text is still a prefix of the gold, each
       position adds the log of the summed probability of the listed tokens that give the
       *same* normalised text as the chosen one ("Yes", " yes", "yes" are one answer split
       over several tokens); assuming the continuation is the same after any of them.
    3. **Early completions.** At every such position, listed alternatives that would
       complete the gold there (the chosen "4" may be followed by "2", an alternative "42"
       completes "42") add a separate route; routes are summed (logsumexp). Listed
       alternatives that only start the gold differently are dropped (a lower bound).
    4. **Divergence.** At the first position where the chosen token breaks the gold, the
       listed alternatives that continue it (completing it or not) add the log of their
       summed probability, and the walk stops: what follows them was never generated, so
       a partial continuation counts as certain to be completed (an upper bound).
    5. **Gold not listed.** If no listed alternative continues it, the gold's next token is
       unlisted, so its probability is at most the smallest listed one (the list is the
       top k) and at most the unlisted mass ``1 - sum(listed)``: the smaller bound is used.
       An upper bound, so a missed answer still ranks by how flat the distribution was.
    6. **Completion.** Once the text covers the gold (followed by a non-alphanumeric
       character or nothing: "yes." covers "yes", "42" does not cover "4"), the walk stops.
       What comes after is not checked, as with teacher forcing.
    7. **Ended short.** If the response ends while still a non-empty prefix of the gold
       ("4" for the gold "42"), the unseen rest is charged ``log(1/2)`` (see the greedy
       argument at ``_UNSEEN_REST``). A response that is only lead-in or whitespace is
       treated as diverging at its last token.
    """
    target = _normalise(gold).rstrip()
    if not target:
        raise ValueError("the gold answer is empty")
    tokens = token_logprobs(source)
    if tokens is None:
        return None
    walk = tokens[_answer_start(tokens, target) :]

    routes: list[float] = []  # log-probabilities of disjoint ways to write the gold
    prefix = 0.0  # log-probability of the text matched so far
    text = ""  # raw text of the walked tokens
    for index, current in enumerate(walk):
        candidates = current.candidates()
        normalised = _normalise(text + current.token)
        match = _match(normalised, target)
        last_without_answer = not normalised and index == len(walk) - 1
        if match is _Match.DIVERGE or last_without_answer:
            routes.append(prefix + _continuation(candidates, text, target))
            break
        completing = [
            logprob
            for token, logprob in candidates
            if _match(_normalise(text + token), target) is _Match.COVER
        ]
        if completing:
            routes.append(prefix + _logsumexp(completing))
        if match is _Match.COVER:
            break
        prefix += _logsumexp(
            [logprob for token, logprob in candidates if _normalise(text + token) == normalised]
        )
        text += current.token
    else:
        routes.append(prefix + _UNSEEN_REST)
    return _logsumexp(routes)


def mean_logprob(values: Iterable[float | None]) -> float | None:
    """Mean of per-example :func:`gold_logprob` values: a candidate instruction's score.

    None if any value is None: estimates for some examples and accuracy for others would not
    be comparable, so one response without logprobs sends the whole candidate back to
    accuracy. Raises ValueError for no values or a NaN.
    """
    collected = list(values)
    if not collected:
        raise ValueError("mean_logprob needs at least one value")
    numbers: list[float] = []
    for value in collected:
        if value is None:
            return None
        if math.isnan(value):
            raise ValueError("mean_logprob got NaN")
        numbers.append(value)
    return math.fsum(numbers) / len(numbers)


# -- internals -----------------------------------------------------------------------------


def _as_logprob(value: object) -> float | None:
    # bool is an int; a NaN cannot be ranked. -inf and OpenAI's -9999 clamp to MIN_LOGPROB.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return max(min(float(value), 0.0), MIN_LOGPROB)


def _normalise(text: str) -> str:
    return _WHITESPACE.sub(" ", text.casefold()).lstrip()


def _match(normalised: str, target: str) -> _Match:
    if normalised.startswith(target):
        rest = normalised[len(target) :]
        # "42" must not count as the gold "4": the gold has to end at a word boundary.
        return _Match.DIVERGE if rest[:1].isalnum() else _Match.COVER
    return _Match.PREFIX if target.startswith(normalised) else _Match.DIVERGE


def _answer_start(tokens: Sequence[TokenLogprob], target: str) -> int:
    """Index of the first answer token: 0, or the end of a lead-in (rule 1)."""
    first = _normalise(tokens[0].token)
    if first and _match(first, target) is not _Match.DIVERGE:
        # Checked first so that an answer that looks like a lead-in ("A" for the gold "a",
        # "answer" for the gold "answer") is never skipped.
        return 0
    start, text = 0, ""
    for index, token in enumerate(tokens[: min(len(tokens) - 1, _MAX_LEAD_IN_TOKENS)]):
        text += token.token
        if _LEAD_IN.fullmatch(_normalise(text)):
            start = index + 1
    return start


def _continuation(candidates: Sequence[tuple[str, float]], text: str, target: str) -> float:
    """Log-probability that this position continues the gold after ``text`` (rules 4, 5)."""
    before = _normalise(text)
    continuing = []
    for token, logprob in candidates:
        after = _normalise(text + token)
        # Alternatives that add nothing (whitespace) are not evidence for the gold.
        if after != before and _match(after, target) is not _Match.DIVERGE:
            continuing.append(logprob)
    if continuing:
        return _logsumexp(continuing)
    listed = [logprob for _, logprob in candidates]
    bound = min(listed)
    unlisted_mass = 1.0 - math.fsum(math.exp(logprob) for logprob in listed)
    if unlisted_mass > 0.0:
        bound = min(bound, math.log(unlisted_mass))
    return max(bound, MIN_LOGPROB)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(value - top) for value in values))
