# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Statistics of the study: per-cell summaries over seeds and paired comparisons between cells.

A comparison pairs two cells seed by seed (see :mod:`scripts.study.matrix` for how seeds pair), takes the
differences ``d_s = a_s - b_s`` and reports

* their mean ``d̄`` (the effect);
* a percentile bootstrap 95 % confidence interval of the mean: ``n_boot`` resamples of the ``n`` differences with
  replacement, drawn with a fixed seed so that a report is reproducible;
* the exact two-sided sign-flip (paired permutation) test of ``H0: the differences are symmetric about 0``:
  ``p = #{signs σ : |mean(σ d)| ≥ |d̄|} / 2^n`` over all ``2^n`` sign patterns (a Monte Carlo estimate with a fixed
  seed beyond ``max_exact`` pairs). No distribution is assumed, and it needs nothing beyond numpy.

With ``n`` pairs the smallest attainable two-sided p-value is ``2 / 2^n`` (:func:`min_p_value`): 0.0625 for 5
seeds, so five seeds can never reach ``p < 0.05`` whatever the effect, and 0.0625 means "all five seeds agree in
sign". The verdict therefore rests on the interval: a difference is "within noise" when its 95 % interval
contains 0. With few seeds a percentile bootstrap interval is optimistic (it never reaches beyond the observed
differences), so read a narrow interval from 5 seeds as "consistent across these seeds", not as a population
guarantee. Below :data:`MIN_PAIRS` pairs no verdict is given at all ("too few seeds": two values always give an
interval that excludes 0 when they agree in sign).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "Summary",
    "PairedComparison",
    "summarise",
    "bootstrap_ci",
    "sign_flip_test",
    "min_p_value",
    "paired_comparison",
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
    if d.size == 1:
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def sign_flip_test(diffs: Sequence[float], max_exact: int = 16, n_perm: int = 100000, seed: int = 0) -> float:
    """Two-sided paired sign-flip permutation test of ``mean(diffs) = 0``.

    Exact over all ``2^n`` sign patterns for ``n <= max_exact`` pairs, otherwise a Monte Carlo estimate from
    ``n_perm`` random patterns (seeded; the observed pattern is counted, so ``p > 0``). All-zero differences give
    ``p = 1``.
    """
    d = np.asarray(diffs, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("sign_flip_test needs at least one difference.")
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if d.size <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d) / d.size >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_perm, d.size))
    hits = int(np.sum(np.abs(signs @ d) / d.size >= observed - tol))
    return (hits + 1) / (n_perm + 1)


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

    @property
    def within_noise(self) -> bool:
        """The 95 % interval contains 0."""
        return self.ci_low <= 0.0 <= self.ci_high

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
        """``"+0.025 [-0.010, +0.060], p = 0.31"``."""
        return (
            f"{self.mean:+.{digits}f} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}], p = {self.p_value:.2g}"
        )

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
