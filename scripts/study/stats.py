# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Statistics of the study: per-cell summaries over seeds and paired comparisons between cells.

A comparison pairs two cells seed by seed (see :mod:`scripts.study.matrix` for how seeds pair), takes the
differences ``d_s = a_s - b_s`` and reports

* their mean ``d̄`` (the effect);
* a percentile bootstrap 95 % confidence interval of the mean (``scipy.stats.bootstrap``): ``n_boot`` resamples
  of the ``n`` differences with replacement, drawn with a fixed seed so that a report is reproducible;
* the exact two-sided sign-flip (paired permutation) test of ``H0: the differences are symmetric about 0``
  (``scipy.stats.permutation_test``): ``p = #{signs σ : |mean(σ d)| ≥ |d̄|} / 2^n`` over all ``2^n`` sign patterns
  (a Monte Carlo estimate with a fixed seed beyond ``max_exact`` pairs). No distribution is assumed.

With ``n`` pairs the smallest attainable two-sided p-value is ``2 / 2^n`` (:func:`min_p_value`): 0.0625 for 5
seeds, so five seeds can never reach ``p < 0.05`` whatever the effect, and 0.0625 means "all five seeds agree in
sign". The verdict therefore rests on the interval: a difference is "within noise" when its 95 % interval
contains 0. With few seeds a percentile bootstrap interval is optimistic (it never reaches beyond the observed
differences), so read a narrow interval from 5 seeds as "consistent across these seeds", not as a population
guarantee. Below :data:`MIN_PAIRS` pairs no verdict is given at all ("too few seeds": two values always give an
interval that excludes 0 when they agree in sign).

The seed-level interval sees only training noise; every model is also scored on one finite test split, whose
sampling noise is larger than the seed-to-seed spread when models are close to the ceiling. When the per-scan
scores are known, :func:`two_level_bootstrap_ci` resamples both: the seed pairs (with replacement) and the test
scans (with replacement within each class, the same scans for both models, so that the comparison stays
paired), recomputing the metric from the scores each time (:func:`scripts.metrics.metric_rows`, vectorised over
models). scipy's ``bootstrap`` resamples one level only; this one stays hand-written. That interval (``scan_ci``) is
the one that decides a comparison when present.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from scripts.metrics import metric_rows

__all__ = [
    "Summary",
    "PairedComparison",
    "summarise",
    "bootstrap_ci",
    "sign_flip_test",
    "min_p_value",
    "paired_comparison",
    "two_level_bootstrap_ci",
    "two_level_contrast_ci",
    "MIN_PAIRS",
]

MIN_PAIRS = 3
"""Fewest pairs for which a comparison gets a verdict."""


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (0 for one value) and count of a metric over seeds."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 3) -> str:
        """``"0.912 ± 0.031"``, or ``"0.912"`` for a single value."""
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"


def summarise(values: Sequence[float | None]) -> Summary | None:
    """:class:`Summary` of the defined values (``None``, e.g. an AUC on a one-class set, is left out)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return None
    return Summary(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0, len(kept))


def bootstrap_ci(
    diffs: Sequence[float], level: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``diffs`` ``(n,)``.

    Args:
        diffs: the paired differences.
        level: coverage, e.g. 0.95.
        n_boot: number of resamples.
        seed: seed of the resampling (fixed, so that the interval is reproducible).

    Returns:
        ``(low, high)``; ``(d, d)`` for a single difference.
    """
    d = np.asarray(diffs, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("bootstrap_ci needs at least one difference.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if d.size == 1 or np.all(d == d[0]):
        return float(d[0]), float(d[0])
    result = stats.bootstrap(
        (d,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile", rng=np.random.default_rng(seed)
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def sign_flip_test(diffs: Sequence[float], max_exact: int = 16, n_perm: int = 100000, seed: int = 0) -> float:
    """Two-sided paired sign-flip permutation test of ``mean(diffs) = 0``.

    Exact over all ``2^n`` sign patterns for ``n <= max_exact`` pairs, otherwise a Monte Carlo estimate from
    ``n_perm`` random patterns (seeded; the observed pattern is counted, so ``p > 0``). All-zero differences give
    ``p = 1``.
    """
    d = np.asarray(diffs, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("sign_flip_test needs at least one difference.")
    if not np.any(d) or d.size == 1:  # one pair: its two sign patterns give p = 1 (scipy needs two or more)
        return 1.0
    result = stats.permutation_test(
        (d,),
        np.mean,
        permutation_type="samples",  # one sample: the signs of the differences are permuted
        vectorized=True,
        n_resamples=np.inf if d.size <= max_exact else n_perm,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def two_level_bootstrap_ci(
    labels: Sequence[int],
    pairs: Sequence[tuple[Sequence[float], float, Sequence[float], float]],
    metric: str,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the mean paired difference ``metric(a) - metric(b)`` over seeds *and* test scans.

    Args:
        labels: ``(N,)`` labels of the test scans (0 HC, 1 PD), the same scans in the same order for every model.
        pairs: one ``(scores_a (N,), threshold_a, scores_b (N,), threshold_b)`` per seed pair.
        metric: see :func:`scripts.metrics.metric_rows`.
        level: coverage.
        n_boot: resamples; each draws the seed pairs with replacement and the scans with replacement within each
            class (class counts fixed, so every metric stays defined), the same scans for ``a`` and ``b``.
        seed: seed of the resampling.

    Returns:
        ``(low, high)``.
    """
    terms = [[(a, ta, 1.0), (b, tb, -1.0)] for a, ta, b, tb in pairs]
    return two_level_contrast_ci(labels, terms, metric, level=level, n_boot=n_boot, seed=seed)


def two_level_contrast_ci(
    labels: Sequence[int],
    terms: Sequence[Sequence[tuple[Sequence[float], float, float]]],
    metric: str,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """:func:`two_level_bootstrap_ci` of any linear contrast of models, e.g. a difference of KD gains
    ``(kd_low - nokd_low) - (kd_full - nokd_full)``.

    Args:
        labels: ``(N,)`` labels of the test scans, the same scans in the same order for every model.
        terms: per seed (or seed tuple), the contrast's terms ``(scores (N,), threshold, coefficient)``; every
            seed has the same number of terms.
        metric: see :func:`scripts.metrics.metric_rows`.
        level: coverage.
        n_boot: resamples (seeds and scans drawn as in :func:`two_level_bootstrap_ci`).
        seed: seed of the resampling.

    Returns:
        ``(low, high)`` of the mean over seeds of ``Σ coefficient · metric(scores)``.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not terms or not all(terms):
        raise ValueError("a two-level interval needs at least one seed with at least one term.")
    n_terms = len(terms[0])
    if any(len(t) != n_terms for t in terms):
        raise ValueError("every seed needs the same number of terms.")
    scores = np.stack([np.asarray(t[0], dtype=np.float64).reshape(-1) for seed_terms in terms for t in seed_terms])
    if scores.shape[1] != y.size:
        raise ValueError(f"scores of {scores.shape[1]} scans for {y.size} labels.")
    thresholds = np.array([t[1] for seed_terms in terms for t in seed_terms], dtype=np.float64)
    coefficients = np.array([[t[2] for t in seed_terms] for seed_terms in terms], dtype=np.float64)
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in (0, 1)]
    n_seeds = len(terms)
    means = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([c[rng.integers(0, c.size, c.size)] for c in classes if c.size])
        chosen = rng.integers(0, n_seeds, n_seeds)
        values = metric_rows(y[idx], scores[:, idx], metric, thresholds)
        per_seed = (values.reshape(n_seeds, n_terms) * coefficients).sum(axis=1)
        means[i] = per_seed[chosen].mean()
    alpha = (1.0 - level) / 2.0
    return float(np.nanquantile(means, alpha)), float(np.nanquantile(means, 1.0 - alpha))


def min_p_value(n_pairs: int) -> float:
    """The smallest two-sided p-value the exact sign-flip test can give with ``n_pairs`` pairs: ``2 / 2^n``."""
    return min(1.0, 2.0 / 2**n_pairs)


@dataclass(frozen=True)
class PairedComparison:
    """A paired comparison ``a - b`` over matched seeds (see :func:`paired_comparison`)."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    min_p_value: float
    diffs: tuple[float, ...]
    pairs: tuple[tuple[int, int], ...]
    scan_ci: tuple[float, float] | None = None
    """The two-level (seeds × test scans) interval, when the per-scan scores are known."""

    @property
    def interval(self) -> tuple[float, float]:
        """The deciding 95 % interval: the two-level one when known, else the seed-level one."""
        return self.scan_ci if self.scan_ci is not None else (self.ci_low, self.ci_high)

    @property
    def within_noise(self) -> bool:
        """The deciding 95 % interval contains 0."""
        low, high = self.interval
        return low <= 0.0 <= high

    @property
    def decided(self) -> bool:
        """At least :data:`MIN_PAIRS` pairs and an interval that excludes 0."""
        return self.n >= MIN_PAIRS and not self.within_noise

    @property
    def verdict(self) -> str:
        """``"higher"``, ``"lower"``, ``"within noise"`` or ``"too few seeds"``."""
        if self.n < MIN_PAIRS:
            return "too few seeds"
        if self.within_noise:
            return "within noise"
        return "higher" if self.mean > 0 else "lower"

    def format(self, digits: int = 3) -> str:
        """``"+0.025 [-0.010, +0.060], p = 0.31"``: the mean, the deciding interval and the seed sign-flip p."""
        low, high = self.interval
        return f"{self.mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}], p = {self.p_value:.2g}"

    def as_dict(self) -> dict:
        return {**asdict(self), "within_noise": self.within_noise, "verdict": self.verdict}


def paired_comparison(
    a: Mapping[int, float | None],
    b: Mapping[int, float | None],
    pair: Mapping[int, int] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
) -> PairedComparison | None:
    """Paired difference ``a - b`` over seeds.

    Args:
        a: ``{seed: value}`` of the first cell group (e.g. the KD students).
        b: ``{seed: value}`` of the second (e.g. the no-KD students, or the teachers).
        pair: the seed of ``b`` matched to each seed of ``a`` (default: the same seed). A student–teacher
            comparison passes ``{s: s mod n_teachers}``.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        the comparison over the seeds where both values are defined, or ``None`` when there is no such pair.
    """
    pair = dict(pair) if pair is not None else {s: s for s in a}
    pairs = [
        (s, pair[s]) for s in sorted(a) if s in pair and pair[s] in b and a[s] is not None and b[pair[s]] is not None
    ]
    if not pairs:
        return None
    diffs = [float(a[s]) - float(b[t]) for s, t in pairs]
    low, high = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    return PairedComparison(
        n=len(diffs),
        mean=statistics.fmean(diffs),
        ci_low=low,
        ci_high=high,
        p_value=sign_flip_test(diffs),
        min_p_value=min_p_value(len(diffs)),
        diffs=tuple(diffs),
        pairs=tuple(pairs),
    )
