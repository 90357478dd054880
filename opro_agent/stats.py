"""Error bars and significance tests for prompt scores.

A test accuracy of 0.62 against a baseline of 0.58 on 50 questions means little until it comes
with an interval and a p-value. This module turns per-example scores into both, so reports can
say whether a gain is distinguishable from noise at the test size used:

* :func:`interval` -- a confidence interval for one prompt's mean score (Wilson for 0/1
  scores, a seeded percentile bootstrap for fractional scores);
* :func:`paired_test` -- candidate against baseline on the same examples (exact McNemar for
  0/1 scores, a paired randomization test for fractional ones) with the examples it fixed and
  broke;
* :func:`seed_spread` -- the mean of one figure across repeated runs (seeds) with a Student-t
  interval.

The tests themselves come from :mod:`scipy.stats`; this module only picks the right one, handles
degenerate inputs (empty, single, all-equal) and gives JSON-ready, deterministic results.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats  # type: ignore[import-untyped]

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "PERMUTATION_RESAMPLES",
    "Interval",
    "PairedTest",
    "interval",
    "paired_test",
    "seed_spread",
]

# With 2000 resamples the endpoints' Monte Carlo jitter between seeds (about 0.004 for 50
# yes/no examples) is small next to the interval's width, and reports stay fast.
BOOTSTRAP_RESAMPLES = 2000
# The randomized p-value is floored at 1 / (resamples + 1); 9999 keeps that floor at 1e-4.
# With n <= 13 examples scipy enumerates all 2**n sign patterns instead (an exact test).
PERMUTATION_RESAMPLES = 9999
# Resamples are drawn in batches so memory stays bounded on large test sets.
_BATCH = 1000

_FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Interval:
    """A mean with a two-sided confidence interval; ``method`` names how it was computed."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "mean": round(self.mean, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "n": self.n,
            "method": self.method,
        }


@dataclass(frozen=True)
class PairedTest:
    """Candidate minus baseline on shared examples: the gain, its interval and a p-value.

    ``fixed`` are the example ids the candidate scored higher on, ``broken`` those it scored
    lower on (both sorted).
    """

    gain: float
    low: float
    high: float
    p_value: float
    n: int
    method: str
    fixed: tuple[str, ...]
    broken: tuple[str, ...]

    def significant(self, alpha: float = 0.05) -> bool:
        """True when the two-sided p-value is below ``alpha``."""
        return self.p_value < alpha

    def verdict(self, alpha: float = 0.05) -> str:
        """One plain-English sentence saying whether the gain stands out from noise."""
        # A negative difference is a loss; calling it a "gain" would mislead. The tolerance
        # keeps float noise in a zero mean (e.g. -5e-18) from being called a loss.
        what = "loss" if self.gain < -1e-12 else "gain"
        detail = f"({_format_p(self.p_value)}, n = {self.n})"
        if self.significant(alpha):
            return f"the {what} is distinguishable from noise at this test size {detail}"
        return (
            f"the {what} is not distinguishable from noise at this test size {detail}: "
            f"the true difference could plausibly lie anywhere from {self.low:+.3f} "
            f"to {self.high:+.3f}"
        )

    def to_dict(self) -> dict[str, float | int | str | list[str]]:
        return {
            "gain": round(self.gain, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            # Significant digits, not decimals: a p of 3e-5 must not be written as 0.
            "p_value": float(f"{self.p_value:.4g}"),
            "n": self.n,
            "method": self.method,
            "fixed": list(self.fixed),
            "broken": list(self.broken),
        }


def interval(scores: Sequence[float], *, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Confidence interval for the mean of per-example scores.

    If every score is 0 or 1 the mean is a proportion and the Wilson score interval is used
    (method ``"wilson"``): unlike the normal approximation it stays inside [0, 1] and keeps
    its coverage at 0/n and n/n. Otherwise a percentile bootstrap of the mean, seeded with
    ``seed`` (method ``"bootstrap"``). Percentile rather than BCa: BCa's jackknife
    acceleration is undefined (NaN plus warnings) whenever resamples are degenerate, which is
    common on small, lumpy metric scores, and its accuracy edge is small at these sizes.

    All-equal scores (including a single score) give ``low == high == mean``.

    Raises:
        ValueError: if ``scores`` is empty or holds a non-finite value, or ``confidence`` is
            not strictly between 0 and 1.
    """
    _check_confidence(confidence)
    values = _as_array(scores, "scores")
    mean = float(np.mean(values))
    if _is_binary(values):
        k = int(np.sum(values))
        ci = stats.binomtest(k, values.size).proportion_ci(
            confidence_level=confidence, method="wilson"
        )
        return Interval(mean, float(ci.low), float(ci.high), values.size, "wilson")
    low, high = _bootstrap_mean(values, confidence, seed)
    return Interval(mean, low, high, values.size, "bootstrap")


def paired_test(
    candidate: Mapping[str, float],
    baseline: Mapping[str, float],
    *,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedTest:
    """Compare two prompts on the example ids both were scored on.

    Pairing matters: both prompts answered the same questions, so most of the question-to-
    question variance cancels in the per-example differences. The interval is always a
    seeded percentile bootstrap of the mean difference. The p-value:

    * 0/1 scores on both sides: exact McNemar test (method ``"mcnemar"``), i.e. a two-sided
      binomial test of the ``b`` fixed against the ``c`` broken examples at 0.5; only the
      discordant pairs carry information. ``p = 1`` when nothing changed. Being exact, it can
      occasionally disagree with the bootstrap interval near the edge of significance.
    * otherwise: a paired randomization test (method ``"paired_bootstrap"``) -- the sign of
      each example's difference is flipped at random, which is what "the two prompts are
      interchangeable" predicts.

    Ids present on only one side are ignored; ``n`` is the number compared. Example order is
    fixed by sorting ids, so results depend only on the data and ``seed``.

    Raises:
        ValueError: if no id is shared, a score is non-finite, or ``confidence`` is not
            strictly between 0 and 1.
    """
    _check_confidence(confidence)
    ids = sorted(candidate.keys() & baseline.keys())
    if not ids:
        raise ValueError("candidate and baseline share no example ids")
    cand = _as_array([candidate[i] for i in ids], "candidate")
    base = _as_array([baseline[i] for i in ids], "baseline")
    diffs = cand - base
    gain = float(np.mean(diffs))
    fixed = tuple(i for i, d in zip(ids, diffs, strict=True) if d > 0)
    broken = tuple(i for i, d in zip(ids, diffs, strict=True) if d < 0)
    low, high = _bootstrap_mean(diffs, confidence, seed)

    if _is_binary(cand) and _is_binary(base):
        discordant = len(fixed) + len(broken)
        p_value = float(stats.binomtest(len(fixed), discordant, 0.5).pvalue) if discordant else 1.0
        method = "mcnemar"
    else:
        p_value = _paired_permutation_p(cand, base, seed)
        method = "paired_bootstrap"
    return PairedTest(gain, low, high, p_value, len(ids), method, fixed, broken)


def seed_spread(values: Sequence[float], *, confidence: float = 0.95) -> Interval:
    """Mean of one figure across runs (seeds) with a Student-t interval (method ``"t"``).

    Seeds are few (often 3-5), so the t distribution with ``n - 1`` degrees of freedom, not a
    bootstrap, which cannot resample meaningfully from three values. One value, or values that
    are all equal, give ``low == high == mean``.

    Raises:
        ValueError: if ``values`` is empty or holds a non-finite value, or ``confidence`` is
            not strictly between 0 and 1.
    """
    _check_confidence(confidence)
    arr = _as_array(values, "values")
    mean = float(np.mean(arr))
    # No spread to measure: scipy would return NaN (and warn) for a zero or undefined scale.
    if arr.size == 1 or np.all(arr == arr[0]):
        return Interval(mean, mean, mean, arr.size, "t")
    sem = float(stats.sem(arr))
    low, high = stats.t.interval(confidence, arr.size - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), arr.size, "t")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")


def _as_array(values: Sequence[float], name: str) -> _FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: no interval can be computed from zero scores")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains a non-finite value")
    return arr


def _is_binary(values: _FloatArray) -> bool:
    return bool(np.all((values == 0.0) | (values == 1.0)))


# scipy >= 1.15 takes `rng` and plans to deprecate `random_state`; older scipy only knows
# `random_state`. Pick by signature so neither version warns (warnings fail our tests).
_RNG_KEYWORD = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


def _rng_kwargs(seed: int) -> dict[str, np.random.Generator]:
    return {_RNG_KEYWORD: np.random.default_rng(seed)}


def _bootstrap_mean(values: _FloatArray, confidence: float, seed: int) -> tuple[float, float]:
    # Degenerate data has no spread to resample; scipy also refuses a single observation.
    if values.size == 1 or np.all(values == values[0]):
        mean = float(np.mean(values))
        return mean, mean
    res = stats.bootstrap(
        (values,),
        np.mean,
        n_resamples=BOOTSTRAP_RESAMPLES,
        batch=_BATCH,
        vectorized=True,
        confidence_level=confidence,
        method="percentile",
        **_rng_kwargs(seed),
    )
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


def _mean_difference(x: _FloatArray, y: _FloatArray, axis: int) -> _FloatArray:
    return np.asarray(np.mean(x - y, axis=axis), dtype=np.float64)


def _paired_permutation_p(cand: _FloatArray, base: _FloatArray, seed: int) -> float:
    # Identical scores: every relabelling gives the same statistic, so nothing is detectable.
    if np.all(cand == base):
        return 1.0
    # permutation_type="samples" swaps candidate/baseline within each example (a sign flip of
    # the paired difference), i.e. a paired randomization test, not an unpaired one.
    res = stats.permutation_test(
        (cand, base),
        _mean_difference,
        permutation_type="samples",
        vectorized=True,
        n_resamples=PERMUTATION_RESAMPLES,
        batch=_BATCH,
        alternative="two-sided",
        **_rng_kwargs(seed),
    )
    return float(res.pvalue)


def _format_p(p: float) -> str:
    # Two significant digits is all a p-value from tens of examples supports.
    if p < 0.001:
        return "p < 0.001"
    text = f"{p:.2g}"
    return f"p = {text}" if "." in text else f"p = {text}.0"
