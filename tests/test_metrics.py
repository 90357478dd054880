"""Tests for answer extraction and the built-in metrics."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from opro_agent.errors import ConfigError
from opro_agent.metrics import (
    METRIC_NAMES,
    extract_answer,
    get_metric,
    metric_from_callable,
)

QUESTION = "Which colour is the sky?\nOptions:\n(A) red\n(B) blue\n(C) green\n(D) a dark grey"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "Paris"),
        ("  Paris.  ", "Paris"),
        ("The answer is Paris.", "Paris"),
        ("THE ANSWER IS: **Paris**.", "Paris"),
        ("Answer: `42`", "42"),
        ('answer: "Yes".', "Yes"),
        ("Step 1: add.\n#### 18", "18"),
        ("Final answer:\n\n  Paris\nBecause it is the capital.", "Paris"),
        ("The answer is 5. Wait, the answer is 6.", "5. Wait, the answer is 6"),
        ("The answer is Paris\nExplanation: it is the capital.", "Paris"),
        ("I don't know what the answer is.", "I don't know what the answer is"),
        ("The answer isn't obvious: Paris", "The answer isn't obvious: Paris"),
        ("Multi\nline", "Multi\nline"),
        ("", ""),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_keeps_case_and_minus() -> None:
    assert extract_answer("The answer is -5") == "-5"
    assert extract_answer("The Answer Is New York") == "New York"


def _score(name: str, prediction: str, target: str, question: str = "") -> float:
    return get_metric(name)(prediction, target, question)


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("Paris", "Paris", 1.0),
        ("paris.", "Paris", 1.0),
        ("  PARIS  ", "paris", 1.0),
        ('"Paris"', "Paris", 1.0),
        ("The answer is **Paris**.", "Paris", 1.0),
        ("New   York", "new york", 1.0),
        ("Paris\nIt is the capital of France.", "Paris", 1.0),
        ("The answer is Paris. It is the capital.", "Paris", 1.0),
        ("(b)", "(B)", 1.0),
        ("[sorted words]", "sorted words", 1.0),
        ("Paris!", "Paris", 1.0),
        ("London", "Paris", 0.0),
        ("Paris is the capital", "Paris", 0.0),
        ("I think it is Paris", "Paris", 0.0),
        ("Not Paris", "Paris", 0.0),
        ("Parisian", "Paris", 0.0),
        ("", "Paris", 0.0),
    ],
)
def test_exact_match(prediction: str, target: str, expected: float) -> None:
    assert _score("exact_match", prediction, target) == expected


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("I think it is Paris, the capital.", "Paris", 1.0),
        ("The city of NEW\nYORK is big", "new york", 1.0),
        ("**Paris**", "Paris.", 1.0),
        ("The price is $5.", "$5", 1.0),
        ("I know the answer", "no", 0.0),
        ("Parisian food", "Paris", 0.0),
        ("London", "Paris", 0.0),
        ("new jersey york", "new york", 0.0),
        ("anything", "", 0.0),
    ],
)
def test_contains(prediction: str, target: str, expected: float) -> None:
    assert _score("contains", prediction, target) == expected


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("18", "18", 1.0),
        ("18.0", "18", 1.0),
        ("The answer is 18.", "18", 1.0),
        ("She pays $18.00 in total.", "18", 1.0),
        ("3 + 15 = 18", "18", 1.0),
        ("The answer is 18. Check: 18 * 2 = 36", "18", 1.0),
        ("Step 1: 10 + 8\n#### 18", "18", 1.0),
        ("The total is 1,234 dollars", "1234", 1.0),
        ("It grew by 25%", "25", 1.0),
        ("The answer is eighteen.", "18", 1.0),
        ("twenty-five", "25", 1.0),
        ("one hundred and five", "105", 1.0),
        ("two thousand five hundred", "2500", 1.0),
        ("The answer is -3.5", "-3.5", 1.0),
        ("The temperature is -4 degrees", "-4", 1.0),
        ("The answer is .5", "0.5", 1.0),
        ("1/3 is 0.3333333", "0.33333333", 1.0),
        ("Natalia sold 48 clips... so 72", "#### 72", 1.0),
        ("The answer is 17.", "18", 0.0),
        ("The answer is 17, not 18.", "18", 0.0),
        ("18 apples minus 1 is 17", "18", 0.0),
        ("The answer is 4", "-4", 0.0),
        ("Step-2", "-2", 0.0),
        ("I do not know", "18", 0.0),
        ("18.5", "18", 0.0),
        ("one and two", "3", 0.0),
    ],
)
def test_numeric(prediction: str, target: str, expected: float) -> None:
    assert _score("numeric", prediction, target) == expected


def test_numeric_without_number_in_target_compares_text() -> None:
    assert _score("numeric", "none", "None") == 1.0
    assert _score("numeric", "7", "None") == 0.0


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("(B)", "(B)", 1.0),
        ("(b)", "(B)", 1.0),
        ("b)", "(B)", 1.0),
        ("B", "(B)", 1.0),
        ("b", "B", 1.0),
        ("B.", "(B)", 1.0),
        ("option B", "(B)", 1.0),
        ("Option (b) is right", "(B)", 1.0),
        ("The answer is (B).", "(B)", 1.0),
        ("The answer is: B", "(B)", 1.0),
        ("B. blue", "(B)", 1.0),
        ("B because the sky scatters blue light", "(B)", 1.0),
        ("blue", "(B)", 1.0),
        ("The answer is blue.", "(B)", 1.0),
        ("A dark grey", "(D)", 1.0),
        ("Sky is blue, so the answer is (B)", "(B)", 1.0),
        ("(A) is wrong. The answer is (B)", "(B)", 1.0),
        ("The answer is a tough one, but (B) fits", "(B)", 1.0),
        ("It is a blue sky, (B)", "(B)", 1.0),
        ("(B)", "blue", 1.0),
        ("(A)", "(B)", 0.0),
        ("a)", "(B)", 0.0),
        ("(A) or (B)", "(B)", 0.0),
        ("The answer is (A), or maybe (B)", "(B)", 0.0),
        ("The answer is red", "(B)", 0.0),
        ("It is a nice day", "(A)", 0.0),
        ("I think a colour", "(A)", 0.0),
        ("The answer is a colour", "(A)", 0.0),
        ("A lovely sky", "(A)", 0.0),
        ("I don't know", "(I)", 0.0),
        ("blue or red", "(B)", 0.0),
        ("", "(B)", 0.0),
    ],
)
def test_multiple_choice(prediction: str, target: str, expected: float) -> None:
    assert _score("multiple_choice", prediction, target, QUESTION) == expected


def test_multiple_choice_bare_a_is_option_a_when_it_is_the_whole_answer() -> None:
    assert _score("multiple_choice", "A", "(A)", QUESTION) == 1.0
    assert _score("multiple_choice", "The answer is a.", "(A)", QUESTION) == 1.0
    assert _score("multiple_choice", "(a)", "(A)", QUESTION) == 1.0


def test_multiple_choice_inline_options_and_no_options() -> None:
    inline = "Pick one. Options: (A) cat (B) dog (C) bird"
    assert _score("multiple_choice", "dog", "(B)", inline) == 1.0
    assert _score("multiple_choice", "cat", "(B)", inline) == 0.0
    assert _score("multiple_choice", "The answer is (C)", "C", "no options here") == 1.0
    assert _score("multiple_choice", "bird", "(C)", "no options here") == 0.0


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("Yes", "yes", 1.0),
        ("yes.", "Yes", 1.0),
        ("True", "yes", 1.0),
        ("The argument is valid.", "valid", 1.0),
        ("The answer is: **No**", "No", 1.0),
        ("That is correct", "True", 1.0),
        ("invalid", "invalid", 1.0),
        ("The argument is not valid.", "invalid", 1.0),
        ("That isn't correct", "False", 1.0),
        ("Wrong.", "no", 1.0),
        ("No, yes", "No", 1.0),
        ("The right answer is no", "No", 1.0),
        ("No", "Yes", 0.0),
        ("invalid", "valid", 0.0),
        ("The argument is not valid", "valid", 0.0),
        ("I know the answer", "no", 0.0),
        ("Untrue statements abound", "true", 0.0),
        ("I am not sure", "Yes", 0.0),
        ("I am not sure", "No", 0.0),
        ("", "No", 0.0),
    ],
)
def test_boolean(prediction: str, target: str, expected: float) -> None:
    assert _score("boolean", prediction, target) == expected


def test_boolean_target_without_boolean_word_compares_text() -> None:
    assert _score("boolean", "maybe", "Maybe") == 1.0
    assert _score("boolean", "yes", "Maybe") == 0.0


@pytest.mark.parametrize(
    ("pattern", "prediction", "target", "expected"),
    [
        (r"final:\s*(\w+)", "Work...\nFINAL: Paris\n", "paris", 1.0),
        (r"final:\s*(\w+)", "final: London", "Paris", 0.0),
        (r"\d+", "I count 42 sheep", "42", 1.0),
        (r"\d+", "I count 41 sheep", "42", 0.0),
        (r"<ans>(.*)</ans>", "<ans>\nNew York.\n</ans>", "new york", 1.0),
        (r"final:\s*(\w+)", "no marker here", "Paris", 0.0),
        (r"final:\s*(\w+)?", "final: ", "", 1.0),
    ],
)
def test_regex(pattern: str, prediction: str, target: str, expected: float) -> None:
    assert get_metric("regex", pattern=pattern)(prediction, target, "") == expected


def test_metric_names_and_lookup() -> None:
    assert METRIC_NAMES == (
        "exact_match",
        "contains",
        "numeric",
        "multiple_choice",
        "boolean",
        "regex",
        "python",
    )
    assert get_metric("Exact-Match")("Paris", "paris", "") == 1.0


# ---------------------------------------------------------------------------------------------
# python metrics and callables
# ---------------------------------------------------------------------------------------------

METRIC_MODULE = """
def two(prediction, target):
    return prediction.strip() == target

def three(prediction, target, question):
    return 1.0 if question in prediction else 0.0

def too_big(prediction, target):
    return 7

def negative(prediction, target):
    return -2

def half(prediction, target, question=None):
    return 0.5

def boom(prediction, target):
    raise RuntimeError("user bug")

NOT_CALLABLE = 3

class Scorer:
    @staticmethod
    def score(prediction, target):
        return prediction == target
"""


@pytest.fixture
def metric_module(tmp_path: Path) -> Iterator[str]:
    """A uniquely named metric module in ``tmp_path``, dropped from the import cache after."""
    name = f"user_metric_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(METRIC_MODULE))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("function", "prediction", "target", "question", "expected"),
    [
        ("two", " Paris ", "Paris", "q", 1.0),
        ("two", "London", "Paris", "q", 0.0),
        ("three", "about q1 here", "x", "q1", 1.0),
        ("three", "nothing", "x", "q1", 0.0),
        ("too_big", "p", "t", "q", 1.0),
        ("negative", "p", "t", "q", 0.0),
        ("half", "p", "t", "q", 0.5),
        ("Scorer.score", "a", "a", "q", 1.0),
    ],
)
def test_python_metric_from_base_dir(
    tmp_path: Path,
    metric_module: str,
    function: str,
    prediction: str,
    target: str,
    question: str,
    expected: float,
) -> None:
    before = list(sys.path)
    metric = get_metric("python", function=f"{metric_module}:{function}", base_dir=tmp_path)
    assert sys.path == before
    assert metric(prediction, target, question) == expected


def test_python_metric_errors_propagate(tmp_path: Path, metric_module: str) -> None:
    metric = get_metric("python", function=f"{metric_module}:boom", base_dir=tmp_path)
    with pytest.raises(RuntimeError, match="user bug"):
        metric("p", "t", "q")


def test_python_metric_base_dir_is_tried_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"shadowed_metric_{uuid.uuid4().hex}"
    elsewhere = tmp_path / "elsewhere"
    task_dir = tmp_path / "task"
    elsewhere.mkdir()
    task_dir.mkdir()
    (elsewhere / f"{name}.py").write_text("def score(p, t):\n    return False\n")
    (task_dir / f"{name}.py").write_text("def score(p, t):\n    return True\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    try:
        metric = get_metric("python", function=f"{name}:score", base_dir=task_dir)
    finally:
        sys.modules.pop(name, None)
    assert metric("p", "t", "q") == 1.0


def test_metric_from_callable_signatures() -> None:
    def two(prediction: str, target: str) -> bool:
        return prediction == target

    def three(prediction: str, target: str, question: str) -> float:
        return 0.25 if question == "q" else 0.0

    def variadic(*args: str) -> float:
        return float(len(args)) / 3

    assert metric_from_callable(two)("a", "a", "q") == 1.0
    assert metric_from_callable(two)("a", "b", "q") == 0.0
    assert metric_from_callable(three)("a", "b", "q") == 0.25
    assert metric_from_callable(variadic)("a", "b", "q") == 1.0
    assert metric_from_callable(lambda p, t: float("nan"))("a", "b", "q") == 0.0
    assert metric_from_callable(lambda p, t: 3)("a", "b", "q") == 1.0


def test_metric_from_callable_rejects_bad_results_and_signatures() -> None:
    with pytest.raises(TypeError):
        metric_from_callable(lambda p, t: "1")("a", "b", "q")  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigError) as info:
        metric_from_callable(lambda p: 1.0)
    assert info.value.field == "metric.function"
    with pytest.raises(ConfigError):
        metric_from_callable(lambda p, t, q, extra: 1.0)


# ---------------------------------------------------------------------------------------------
# ConfigError paths
# ---------------------------------------------------------------------------------------------


def _config_error(
    name: str,
    *,
    pattern: str | None = None,
    function: str | None = None,
    base_dir: Path | None = None,
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        get_metric(name, pattern=pattern, function=function, base_dir=base_dir)
    return info.value


def test_unknown_metric_lists_valid_names() -> None:
    error = _config_error("accuracy")
    assert error.field == "metric"
    assert str(error).startswith("metric: ")
    assert "accuracy" in str(error)
    for name in METRIC_NAMES:
        assert name in str(error)


@pytest.mark.parametrize("pattern", [None, "", "   ", "(unclosed", "*bad"])
def test_regex_pattern_errors(pattern: str | None) -> None:
    error = _config_error("regex", pattern=pattern)
    assert error.field == "metric.pattern"
    assert str(error).startswith("metric.pattern: ")


@pytest.mark.parametrize(
    ("function", "fragment"),
    [
        (None, "module:function"),
        ("", "module:function"),
        ("no_colon_here", "module:function"),
        ("mod:", "module:function"),
        (":func", "module:function"),
        ("a b:c", "module:function"),
        ("mod:func:extra", "module:function"),
        ("opro_agent_missing_module_xyz:score", "cannot import"),
        ("{module}:missing", "no attribute"),
        ("{module}:NOT_CALLABLE", "not callable"),
        ("{module}:Scorer.missing", "no attribute"),
    ],
)
def test_python_function_errors(
    tmp_path: Path, metric_module: str, function: str | None, fragment: str
) -> None:
    if function is not None:
        function = function.format(module=metric_module)
    before = list(sys.path)
    error = _config_error("python", function=function, base_dir=tmp_path)
    assert sys.path == before
    assert error.field == "metric.function"
    assert str(error).startswith("metric.function: ")
    assert fragment in str(error)


def test_python_module_that_fails_to_import(tmp_path: Path) -> None:
    name = f"broken_metric_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("raise ValueError('broken at import')\n")
    try:
        error = _config_error("python", function=f"{name}:score", base_dir=tmp_path)
    finally:
        sys.modules.pop(name, None)
    assert error.field == "metric.function"
    assert "broken at import" in str(error)


def test_python_module_not_found_without_base_dir(metric_module: str) -> None:
    # The module lives only in tmp_path, which is not on sys.path.
    error = _config_error("python", function=f"{metric_module}:two")
    assert error.field == "metric.function"
    assert "cannot import" in str(error)
