"""Answer extraction, normalisation and the built-in metrics.

A metric maps ``(prediction, target, question)`` to a score in ``[0, 1]``. Predictions from
small models are messy, so extraction is tolerant, but a wrong answer must still score 0:
only ``contains`` accepts the gold answer merely appearing somewhere in the prediction.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import SupportsFloat, TypeAlias, cast

from opro_agent.errors import ConfigError

__all__ = [
    "METRIC_NAMES",
    "Metric",
    "extract_answer",
    "get_metric",
    "metric_from_callable",
    "metric_identity",
]

Metric: TypeAlias = Callable[[str, str, str], float]
"""``(prediction, target, question) -> score`` in ``[0, 1]``."""

METRIC_NAMES: tuple[str, ...] = (
    "exact_match",
    "contains",
    "numeric",
    "multiple_choice",
    "boolean",
    "regex",
    "python",
)

# ---------------------------------------------------------------------------------------------
# Extraction and normalisation
# ---------------------------------------------------------------------------------------------

# "answer is" must be a whole word so that "answer isn't" is not a marker.
_MARKER_RE = re.compile(r"\banswer\s+is\b\s*:?|\banswer\s*:|####", re.IGNORECASE)
_DECORATION = " \t\r\n*`\"'\u201c\u201d\u2018\u2019"
_TRAILING_PUNCTUATION = ".!,;:"
_BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _strip_decoration(text: str) -> str:
    """Strip whitespace, markdown emphasis, backticks, quotes and trailing periods."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip(_DECORATION).rstrip(".")
    return text


def _first_line(text: str) -> str | None:
    """The first non-blank line of ``text``."""
    for line in text.splitlines():
        if line.strip():
            return line
    return None


def extract_answer(text: str) -> str:
    """The final answer in a model's output.

    The text after the first "answer is" / "answer:" / "####" (case-insensitive), up to the
    end of that line, or the next non-blank line when the marker ends its line. Without a
    marker (or with nothing after it): the whole text. Decoration is stripped either way.
    """
    stripped = text.strip()
    marker = _MARKER_RE.search(stripped)
    if marker is not None:
        # Only the marker's line: small models keep explaining after giving the answer.
        for line in stripped[marker.end() :].splitlines():
            answer = _strip_decoration(line)
            if answer:
                return answer
    return _strip_decoration(stripped)


def _is_balanced(text: str, opening: str, closing: str) -> bool:
    depth = 0
    for char in text:
        if char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _normalise(text: str) -> str:
    """Lower-case, collapse whitespace, strip trailing punctuation and wrapping quotes/brackets."""
    result = " ".join(text.lower().split())
    previous = None
    while result != previous:
        previous = result
        result = result.strip(_DECORATION).rstrip(_TRAILING_PUNCTUATION).strip()
        if len(result) >= 2 and _BRACKETS.get(result[0]) == result[-1]:
            inner = result[1:-1]
            # "(a) or (b)" starts and ends with brackets that are not a pair.
            if _is_balanced(inner, result[0], result[-1]):
                result = inner
    return result


# ---------------------------------------------------------------------------------------------
# exact_match and contains
# ---------------------------------------------------------------------------------------------


_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")


def _answer_candidates(prediction: str) -> set[str]:
    """Normalised readings of the answer: extracted, its first sentence, the first line."""
    answer = extract_answer(prediction)
    # "Paris. It is the capital." answers "Paris"; the first sentence drops the explanation.
    readings = [answer, _SENTENCE_END_RE.split(answer, maxsplit=1)[0]]
    first = _first_line(prediction)
    if first is not None:
        readings.append(first)
    return {_normalise(reading) for reading in readings}


def _exact_match(prediction: str, target: str, question: str) -> float:
    return 1.0 if _normalise(target) in _answer_candidates(prediction) else 0.0


def _contains(prediction: str, target: str, question: str) -> float:
    gold = _normalise(target)
    text = " ".join(prediction.lower().split())
    if not gold:
        # Everything contains the empty string; only an empty prediction matches it.
        return 1.0 if not _normalise(text) else 0.0
    # Look-arounds instead of \b so targets that start or end with punctuation work too.
    pattern = rf"(?<!\w){re.escape(gold)}(?!\w)"
    return 1.0 if re.search(pattern, text) else 0.0


# ---------------------------------------------------------------------------------------------
# numeric
# ---------------------------------------------------------------------------------------------

_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = (
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_NUMBER_WORDS: dict[str, int] = {
    **{word: value for value, word in enumerate(_UNITS)},
    **{word: value + 10 for value, word in enumerate(_TEENS)},
    **{word: (value + 2) * 10 for value, word in enumerate(_TENS)},
    "hundred": 100,
    "thousand": 1000,
}
_WORD = "(?:" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")\b"
_NUMBER_WORD_RUN_RE = re.compile(rf"\b{_WORD}(?:(?:\s+and\s+|[\s-]+){_WORD})*", re.IGNORECASE)
_THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A minus sign counts only when it does not join two words ("step-2" is not -2).
_NUMBER_RE = re.compile(r"(?<![\d.])(?:(?<!\w)-)?(?:\d+(?:\.\d+)?|\.\d+)")


def _word_kind(value: int) -> str:
    if value < 10:
        return "unit"
    if value < 20:
        return "teen"
    if value < 100:
        return "tens"
    return "hundred" if value == 100 else "thousand"


def _can_follow(last: str, kind: str, value: int, current: int, total: int) -> bool:
    """Whether a number word continues the number being read (else it starts a new one)."""
    if not last:
        return True
    if kind == "unit":
        return last in ("hundred", "thousand", "and") or (last == "tens" and value != 0)
    if kind in ("teen", "tens"):
        return last in ("hundred", "thousand", "and")
    if kind == "hundred":
        return last in ("unit", "teen", "tens") and current < 100
    return last in ("unit", "teen", "tens", "hundred") and total == 0


def _read_number_words(tokens: list[str]) -> list[int]:
    """Numbers spelled by a run of number words: "twenty-five" is 25, "five six" is 5 and 6."""
    numbers: list[int] = []
    total = current = 0
    last = ""
    for token in tokens:
        if token == "and":
            if last in ("hundred", "thousand"):
                last = "and"
            elif last:
                # "one and two" are two numbers.
                numbers.append(total + current)
                total = current = 0
                last = ""
            continue
        value = _NUMBER_WORDS[token]
        kind = _word_kind(value)
        if not _can_follow(last, kind, value, current, total):
            numbers.append(total + current)
            total = current = 0
            last = ""
        if kind == "hundred":
            current = (current or 1) * 100
        elif kind == "thousand":
            total = (current or 1) * 1000
            current = 0
        else:
            current += value
        last = kind
    if last:
        numbers.append(total + current)
    return numbers


def _number_words_to_digits(match: re.Match[str]) -> str:
    tokens = re.findall(r"[a-z]+", match.group(0).lower())
    return " ".join(str(number) for number in _read_number_words(tokens))


def _parse_number(text: str) -> float | None:
    """The answer's number: the first one after an answer marker, else the last one."""
    text = text.replace("\u2212", "-")
    text = _NUMBER_WORD_RUN_RE.sub(_number_words_to_digits, text)
    text = _THOUSANDS_COMMA_RE.sub("", text).replace("$", "").replace("%", "")
    marker = _MARKER_RE.search(text)
    if marker is not None:
        first = _NUMBER_RE.search(text[marker.end() :])
        if first is not None:
            return float(first.group(0))
    numbers = _NUMBER_RE.findall(text)
    return float(numbers[-1]) if numbers else None


def _numeric(prediction: str, target: str, question: str) -> float:
    gold = _parse_number(target)
    if gold is None:
        return _exact_match(prediction, target, question)
    guess = _parse_number(prediction)
    return 1.0 if guess is not None and round(guess, 6) == round(gold, 6) else 0.0


# ---------------------------------------------------------------------------------------------
# multiple_choice
# ---------------------------------------------------------------------------------------------

_OPTION_RE = re.compile(
    r"(?<!\w)\(([A-Za-z])\)[ \t]*(.*?)[ \t]*(?=(?<!\w)\([A-Za-z]\)|$)", re.MULTILINE
)
_OPTION_LINE_RE = re.compile(r"^[ \t]*([A-Z])[.)][ \t]+(\S.*?)[ \t]*$", re.MULTILINE)
_LETTER_TOKEN_RE = re.compile(
    r"(?<!\w)[(\[]\s*([a-z])\s*[)\]]"  # (b) or [b]
    r"|(?<![\w(\[])([a-z])\)"  # b)
    r"|\b(?:option|choice)\s*[:#]?\s*[(\[]?([a-z])\b",  # option b
    re.IGNORECASE,
)
_LEADING_LETTER_RE = re.compile(r"([A-Za-z])[.:](?:\s|$)")
# A bare capital at the start ("B because ...") is an option; "A" and "I" are usually words.
_LEADING_CAPITAL_RE = re.compile(r"([B-HJ-Z])(?=\s|$)")
_TARGET_LETTER_RE = re.compile(r"\(?([a-z])\)(?:\s|$)")


def _parse_options(question: str) -> dict[str, str]:
    """Option letter (lower-case) -> normalised option text, from "(A) text" in the question."""
    for pattern in (_OPTION_RE, _OPTION_LINE_RE):
        options: dict[str, str] = {}
        for match in pattern.finditer(question):
            letter, text = match.group(1).lower(), _normalise(match.group(2))
            if text and letter not in options:
                options[letter] = text
        if len(options) >= 2:
            return options
    return {}


def _leading_letter(line: str) -> str | None:
    """An option letter that is the whole answer or opens it ("B", "(b)", "B. Paris")."""
    answer = _strip_decoration(line)
    normalised = _normalise(answer)
    if len(normalised) == 1 and normalised.isalpha():
        return normalised
    match = _LEADING_LETTER_RE.match(answer) or _LEADING_CAPITAL_RE.match(answer)
    return match.group(1).lower() if match else None


def _letter_in(region: str, valid: set[str] | None) -> str | None:
    """The first option letter named in ``region``; ``valid`` limits which letters count."""
    candidates: list[str] = []
    first = _first_line(region)
    if first is not None:
        leading = _leading_letter(first)
        if leading is not None:
            candidates.append(leading)
    for match in _LETTER_TOKEN_RE.finditer(region):
        letter = next(group for group in match.groups() if group is not None)
        candidates.append(letter.lower())
    for letter in candidates:
        if valid is None or letter in valid:
            return letter
    return None


def _predicted_letter(
    prediction: str, options: dict[str, str], valid: set[str] | None
) -> str | None:
    marker = _MARKER_RE.search(prediction)
    if marker is not None:
        letter = _letter_in(prediction[marker.end() :], valid)
        if letter is not None:
            return letter
    letter = _letter_in(prediction, valid)
    if letter is not None:
        return letter
    # No letter: the prediction may spell out an option's text instead.
    answers = _answer_candidates(prediction)
    for option, text in options.items():
        if text in answers:
            return option
    return None


def _target_letter(target: str, options: dict[str, str]) -> str | None:
    normalised = _normalise(target)
    if len(normalised) == 1 and normalised.isalpha():
        return normalised
    match = _TARGET_LETTER_RE.match(normalised)
    if match is not None:
        return match.group(1)
    for option, text in options.items():
        if text == normalised:
            return option
    return None


def _multiple_choice(prediction: str, target: str, question: str) -> float:
    options = _parse_options(question)
    gold = _target_letter(target, options)
    if gold is None:
        return _exact_match(prediction, target, question)
    # Letters outside the options are noise, unless the options were not read correctly.
    valid = set(options) if gold in options else None
    return 1.0 if _predicted_letter(prediction, options, valid) == gold else 0.0


# ---------------------------------------------------------------------------------------------
# boolean
# ---------------------------------------------------------------------------------------------

_BOOLEAN_WORDS = {
    "yes": True,
    "true": True,
    "valid": True,
    "correct": True,
    "right": True,
    "no": False,
    "false": False,
    "invalid": False,
    "incorrect": False,
    "wrong": False,
}
# "not correct" must not read as "correct".
_BOOLEAN_RE = re.compile(
    r"(?P<negation>\bnot\s+|n['\u2019]t\s+)?\b(?P<word>" + "|".join(_BOOLEAN_WORDS) + r")\b",
    re.IGNORECASE,
)


def _boolean_value(text: str) -> bool | None:
    match = _BOOLEAN_RE.search(text)
    if match is None:
        return None
    value = _BOOLEAN_WORDS[match.group("word").lower()]
    return not value if match.group("negation") else value


def _boolean(prediction: str, target: str, question: str) -> float:
    gold = _boolean_value(target)
    if gold is None:
        return _exact_match(prediction, target, question)
    guess = _boolean_value(extract_answer(prediction))
    return 1.0 if guess is not None and guess == gold else 0.0


# ---------------------------------------------------------------------------------------------
# regex
# ---------------------------------------------------------------------------------------------


def _regex_metric(pattern: str | None) -> Metric:
    if pattern is None or not pattern.strip():
        raise ConfigError("metric 'regex' needs a pattern", field="metric.pattern")
    try:
        compiled = re.compile(pattern, re.IGNORECASE | re.DOTALL)
    except re.error as exc:
        message = f"invalid regular expression {pattern!r}: {exc}"
        raise ConfigError(message, field="metric.pattern") from exc

    def regex(prediction: str, target: str, question: str) -> float:
        match = compiled.search(prediction)
        if match is None:
            return 0.0
        answer = match.group(1) if compiled.groups else match.group(0)
        return 1.0 if _normalise(answer or "") == _normalise(target) else 0.0

    return regex


# ---------------------------------------------------------------------------------------------
# python
# ---------------------------------------------------------------------------------------------

_DOTTED_NAME_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _import_module(name: str, base_dir: Path | None) -> object:
    entry = str(base_dir.resolve()) if base_dir is not None else None
    if entry is not None:
        sys.path.insert(0, entry)
        # The task folder's files may be newer than the import system's directory caches.
        importlib.invalidate_caches()
    try:
        return importlib.import_module(name)
    except Exception as exc:
        # Any failure while importing user code (missing, syntax error, raising) is bad input.
        message = f"cannot import module {name!r}: {type(exc).__name__}: {exc}"
        raise ConfigError(message, field="metric.function") from exc
    finally:
        if entry is not None:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _load_callable(function: str | None, base_dir: Path | None) -> Callable[..., float | bool]:
    if function is None or not function.strip():
        raise ConfigError(
            "metric 'python' needs a function as 'module:function'", field="metric.function"
        )
    module_name, colon, attribute = function.strip().partition(":")
    if not (
        colon and _DOTTED_NAME_RE.fullmatch(module_name) and _DOTTED_NAME_RE.fullmatch(attribute)
    ):
        raise ConfigError(f"expected 'module:function', got {function!r}", field="metric.function")
    found = _import_module(module_name, base_dir)
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ConfigError(
                f"module {module_name!r} has no attribute {attribute!r}", field="metric.function"
            ) from None
    if not callable(found):
        raise ConfigError(f"{function!r} is not callable", field="metric.function")
    return cast("Callable[..., float | bool]", found)


def _takes_question(fn: Callable[..., object]) -> bool:
    """Whether ``fn`` is called with the question too (three positional arguments)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        # No introspectable signature (some builtins): use the two-argument form.
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    required_keyword = any(
        p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
        for p in parameters
    )
    if len(required) > 3 or required_keyword or (len(positional) < 2 and not variadic):
        name = getattr(fn, "__qualname__", repr(fn))
        raise ConfigError(
            f"metric function {name} must take (prediction, target) "
            "or (prediction, target, question)",
            field="metric.function",
        )
    return variadic or len(positional) >= 3


def _to_score(result: object) -> float:
    if isinstance(result, bool):
        return 1.0 if result else 0.0
    if isinstance(result, str | bytes) or not isinstance(result, SupportsFloat):
        raise TypeError(f"a metric must return a number or a bool, got {type(result).__name__}")
    value = float(result)
    if math.isnan(value):
        return 0.0
    return min(1.0, max(0.0, value))


def metric_from_callable(fn: Callable[..., float | bool]) -> Metric:
    """Wrap a user function taking (prediction, target[, question]) as a :data:`Metric`.

    Bools become 1.0/0.0, numbers are clamped to [0, 1]; exceptions from ``fn`` propagate.
    """
    takes_question = _takes_question(fn)

    def metric(prediction: str, target: str, question: str) -> float:
        if takes_question:
            return _to_score(fn(prediction, target, question))
        return _to_score(fn(prediction, target))

    metric.__wrapped__ = fn  # type: ignore[attr-defined]  # for metric_identity
    return metric


def metric_identity(metric: Metric) -> str:
    """A digest of what a metric computes: its source code and the values it closes over
    (a regex pattern), so a changed pattern or function is told apart from the old one."""
    target = inspect.unwrap(metric)
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):  # defined in a REPL or built in: its name is all there is
        source = getattr(target, "__qualname__", repr(target))
    cells = getattr(target, "__closure__", None) or ()
    values = [repr(c.cell_contents) for c in cells if not callable(c.cell_contents)]
    digest = hashlib.sha256("\n".join([source, *values]).encode("utf-8"))
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------

_BUILTIN_METRICS: dict[str, Metric] = {
    "exact_match": _exact_match,
    "contains": _contains,
    "numeric": _numeric,
    "multiple_choice": _multiple_choice,
    "boolean": _boolean,
}


def get_metric(
    name: str,
    *,
    pattern: str | None = None,
    function: str | None = None,
    base_dir: Path | None = None,
) -> Metric:
    """The metric called ``name`` (one of :data:`METRIC_NAMES`).

    ``regex`` needs ``pattern``; ``python`` needs ``function`` as ``module:function``, imported
    from ``base_dir`` (the task file's folder) first. Raises :class:`ConfigError` on bad input.
    """
    key = name.strip().lower().replace("-", "_")
    if key == "regex":
        return _regex_metric(pattern)
    if key == "python":
        return metric_from_callable(_load_callable(function, base_dir))
    metric = _BUILTIN_METRICS.get(key)
    if metric is None:
        raise ConfigError(
            f"unknown metric {name!r}; valid metrics: {', '.join(METRIC_NAMES)}", field="metric"
        )
    return metric
