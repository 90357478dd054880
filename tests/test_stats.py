"""Known-value tests for opro_agent.stats (Wilson, McNemar, bootstrap, t intervals)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator

import pytest

from opro_agent.stats import PairedTest, interval, paired_test, seed_spread


@pytest.fixture(autouse=True)
def _warnings_are_errors() -> Iterator[None]:
    # Degenerate inputs must not leak scipy/numpy RuntimeWarnings into callers' output.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _pairs(**counts: int) -> tuple[dict[str, float], dict[str, float]]:
    """Candidate and baseline 0/1 scores from counts of (candidate, baseline) outcomes."""
    outcomes = {"fixed": (1.0, 0.0), "broken": (0.0, 1.0), "both": (1.0, 1.0), "neither": (0, 0)}
    cand: dict[str, float] = {}
    base: dict[str, float] = {}
    for kind, count in counts.items():
        for i in range(count):
            key = f"{kind}-{i:02d}"
            cand[key], base[key] = outcomes[kind]
    return cand, base


# --- interval: Wilson ---------------------------------------------------------------------


def test_wilson_8_of_10_matches_published_values() -> None:
    result = interval([1.0] * 8 + [0.0] * 2)
    assert result.method == "wilson"
    assert result.n == 10
    assert result.mean == pytest.approx(0.8)
    assert result.low == pytest.approx(0.4902, abs=1e-4)
    assert result.high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_matches_closed_form() -> None:
    # Wilson score interval by hand: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
    n, p, z = 10, 0.8, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    result = interval([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert result.low == pytest.approx(centre - half, abs=1e-9)
    assert result.high == pytest.approx(centre + half, abs=1e-9)


def test_wilson_at_the_edges_stays_inside_zero_one() -> None:
    none_right = interval([0.0] * 20)
    assert none_right.low == 0.0
    assert none_right.high == pytest.approx(0.1611, abs=1e-4)
    all_right = interval([1.0] * 20)
    assert all_right.high == 1.0
    assert all_right.low == pytest.approx(1 - 0.1611, abs=1e-4)


def test_wilson_narrows_with_lower_confidence() -> None:
    wide = interval([1.0] * 8 + [0.0] * 2, confidence=0.95)
    narrow = interval([1.0] * 8 + [0.0] * 2, confidence=0.80)
    assert wide.low < narrow.low < 0.8 < narrow.high < wide.high


# --- interval: bootstrap ------------------------------------------------------------------


FRACTIONAL = [0.2, 0.5, 0.75, 0.9, 0.4, 0.6, 0.33, 0.8, 0.1, 0.95, 0.5, 0.65]


def test_bootstrap_contains_mean_and_is_deterministic_for_a_seed() -> None:
    first = interval(FRACTIONAL, seed=7)
    again = interval(FRACTIONAL, seed=7)
    other = interval(FRACTIONAL, seed=8)
    assert first.method == "bootstrap"
    assert first.n == len(FRACTIONAL)
    assert first.mean == pytest.approx(sum(FRACTIONAL) / len(FRACTIONAL))
    assert min(FRACTIONAL) < first.low < first.mean < first.high < max(FRACTIONAL)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)


def test_bootstrap_agrees_with_normal_theory_on_a_large_sample() -> None:
    # For n = 400 the bootstrap of the mean is close to mean +- 1.96 * sd / sqrt(n).
    scores = [((i * 37) % 101) / 100 for i in range(400)]
    n = len(scores)
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1))
    half = 1.959964 * sd / math.sqrt(n)
    result = interval(scores)
    assert result.low == pytest.approx(mean - half, abs=0.15 * half)
    assert result.high == pytest.approx(mean + half, abs=0.15 * half)


@pytest.mark.parametrize("scores", [[0.7] * 6, [0.7]])
def test_degenerate_bootstrap_collapses_without_nan_or_warning(scores: list[float]) -> None:
    result = interval(scores)
    assert result.method == "bootstrap"
    assert result.low == result.high == result.mean == pytest.approx(0.7)


def test_single_binary_score_uses_wilson() -> None:
    result = interval([1.0])
    assert result.method == "wilson"
    assert 0.0 < result.low < 1.0 == result.high


@pytest.mark.parametrize(
    ("scores", "confidence"),
    [([], 0.95), ([0.5, math.nan], 0.95), ([0.5, math.inf], 0.95), ([1.0], 1.0), ([1.0], 0.0)],
)
def test_interval_rejects_bad_input(scores: list[float], confidence: float) -> None:
    with pytest.raises(ValueError):
        interval(scores, confidence=confidence)


def test_interval_to_dict_is_json_ready_and_rounded() -> None:
    data = interval([1.0] * 8 + [0.0] * 2).to_dict()
    assert data == {"mean": 0.8, "low": 0.4902, "high": 0.9433, "n": 10, "method": "wilson"}
    json.dumps(data)


# --- paired_test: McNemar -----------------------------------------------------------------


def test_mcnemar_exact_p_for_10_fixed_2_broken() -> None:
    cand, base = _pairs(fixed=10, broken=2, both=5, neither=3)
    result = paired_test(cand, base)
    # Two-sided exact binomial at 0.5 on the 12 discordant pairs, by hand.
    by_hand = 2 * sum(math.comb(12, k) for k in range(3)) / 2**12
    assert by_hand == pytest.approx(0.0386, abs=1e-4)
    assert result.p_value == pytest.approx(by_hand, abs=1e-12)
    assert result.method == "mcnemar"
    assert result.n == 20
    assert result.gain == pytest.approx((10 - 2) / 20)
    assert result.low < result.gain < result.high
    assert result.significant()
    assert not result.significant(alpha=0.01)


def test_mcnemar_fixed_and_broken_ids_are_correct_and_sorted() -> None:
    cand = {"q3": 1.0, "q1": 1.0, "q2": 0.0, "q4": 0.0, "q5": 1.0, "q9": 0.0}
    base = {"q3": 0.0, "q1": 0.0, "q2": 1.0, "q4": 0.0, "q5": 1.0, "q8": 1.0}
    result = paired_test(cand, base)
    assert result.fixed == ("q1", "q3")
    assert result.broken == ("q2",)
    assert result.n == 5  # q8 and q9 are scored on one side only


def test_mcnemar_balanced_changes_give_p_one() -> None:
    cand, base = _pairs(fixed=4, broken=4, both=6, neither=6)
    result = paired_test(cand, base)
    assert result.p_value == 1.0
    assert result.gain == 0.0
    assert not result.significant()


def test_mcnemar_no_changes_gives_p_one_and_zero_width_interval() -> None:
    cand, base = _pairs(both=5, neither=5)
    result = paired_test(cand, base)
    assert result.p_value == 1.0
    assert result.low == result.high == result.gain == 0.0
    assert result.fixed == result.broken == ()


def test_paired_test_rejects_disjoint_ids() -> None:
    with pytest.raises(ValueError, match="share no example ids"):
        paired_test({"a": 1.0}, {"b": 1.0})


# --- paired_test: fractional scores ---------------------------------------------------------


def test_paired_randomization_is_exact_for_small_n() -> None:
    # 8 examples, all improved by different amounts: of the 2**8 sign patterns only "all +"
    # and "all -" are as extreme, so the two-sided exact p is 2 / 256.
    base = {f"e{i}": 0.1 * i for i in range(8)}
    cand = {k: v + 0.05 + 0.01 * i for i, (k, v) in enumerate(base.items())}
    result = paired_test(cand, base)
    assert result.method == "paired_bootstrap"
    assert result.p_value == pytest.approx(2 / 256)
    assert result.gain == pytest.approx(0.085)
    assert result.low > 0.0
    assert result.low < result.gain < result.high
    assert len(result.fixed) == 8
    assert result.broken == ()


def test_paired_randomization_is_deterministic_for_a_seed_on_large_n() -> None:
    # n = 40 exceeds exact enumeration, so the randomized path and its seed are exercised.
    base = {f"e{i:02d}": ((i * 7) % 10) / 10 for i in range(40)}
    cand = {k: round(v + (0.1 if i % 4 else -0.1), 2) for i, (k, v) in enumerate(base.items())}
    first = paired_test(cand, base, seed=3)
    assert first == paired_test(cand, base, seed=3)
    assert first.p_value != paired_test(cand, base, seed=4).p_value
    assert first.gain == pytest.approx(0.05)
    # Randomized two-sided p = 2 * (count + 1) / (9999 + 1): a multiple of 2e-4, never 0.
    assert first.p_value / 2e-4 == pytest.approx(round(first.p_value / 2e-4))
    assert 2e-4 <= first.p_value < 0.01
    assert first.low < first.gain < first.high


def test_symmetric_differences_are_not_significant() -> None:
    cand = {"a": 0.6, "b": 0.4, "c": 0.7, "d": 0.3}
    base = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}
    result = paired_test(cand, base)
    assert result.gain == pytest.approx(0.0)
    assert result.p_value == 1.0
    assert result.fixed == ("a", "c")
    assert result.broken == ("b", "d")


def test_binary_against_fractional_uses_the_randomization_test() -> None:
    result = paired_test({"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5})
    assert result.method == "paired_bootstrap"


# --- verdict and to_dict ------------------------------------------------------------------


def test_verdict_for_a_significant_gain() -> None:
    cand, base = _pairs(fixed=10, broken=2, both=5, neither=3)
    verdict = paired_test(cand, base).verdict()
    assert verdict == "the gain is distinguishable from noise at this test size (p = 0.039, n = 20)"


def test_verdict_for_noise_is_one_sentence_with_the_interval() -> None:
    result = PairedTest(0.04, -0.02, 0.1, 0.45, 50, "mcnemar", ("a",), ())
    assert result.verdict() == (
        "the gain is not distinguishable from noise at this test size (p = 0.45, n = 50): "
        "the true difference could plausibly lie anywhere from -0.020 to +0.100"
    )


def test_verdict_calls_a_negative_difference_a_loss_and_floors_tiny_p() -> None:
    result = PairedTest(-0.3, -0.4, -0.2, 2e-6, 200, "mcnemar", (), ("a",))
    assert result.verdict() == (
        "the loss is distinguishable from noise at this test size (p < 0.001, n = 200)"
    )
    assert (
        PairedTest(0.0, 0.0, 0.0, 1.0, 3, "mcnemar", (), ())
        .verdict()
        .startswith(
            "the gain is not distinguishable from noise at this test size (p = 1.0, n = 3): "
        )
    )


def test_paired_to_dict_is_json_ready() -> None:
    result = PairedTest(0.123456, -0.01, 0.25, 3.21e-5, 20, "mcnemar", ("a", "b"), ("c",))
    data = result.to_dict()
    assert data == {
        "gain": 0.1235,
        "low": -0.01,
        "high": 0.25,
        "p_value": 3.21e-5,  # significant digits: a tiny p must not round to 0
        "n": 20,
        "method": "mcnemar",
        "fixed": ["a", "b"],
        "broken": ["c"],
    }
    json.dumps(data)


# --- seed_spread --------------------------------------------------------------------------


def test_seed_spread_student_t_known_value() -> None:
    result = seed_spread([0.5, 0.6, 0.7])
    # t(0.975, df=2) = 4.302653 (tables); sd = 0.1, so half-width = 4.302653 * 0.1 / sqrt(3).
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert half == pytest.approx(0.2484, abs=1e-4)
    assert result.method == "t"
    assert result.n == 3
    assert result.mean == pytest.approx(0.6)
    assert result.low == pytest.approx(0.6 - half, abs=1e-6)
    assert result.high == pytest.approx(0.6 + half, abs=1e-6)


@pytest.mark.parametrize("values", [[0.42], [0.42, 0.42, 0.42]])
def test_seed_spread_without_spread_collapses(values: list[float]) -> None:
    result = seed_spread(values)
    assert result.low == result.high == result.mean == pytest.approx(0.42)
    assert result.n == len(values)


def test_seed_spread_rejects_empty() -> None:
    with pytest.raises(ValueError):
        seed_spread([])
