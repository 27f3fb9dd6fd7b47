# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Power of a paired comparison: its seed and scan variance components, the minimum detectable difference, and the
seeds and test scans a given difference would need.

A paired comparison over ``S`` seeds on one test split of ``N`` scans estimates ``Δ = mean_s D_s``, with ``D_s``
the contrast of seed ``s`` (e.g. ``metric(KD student s) − metric(no-KD student s)``). Its variance is modelled as

    Var(Δ) = σ²_seed / S + σ²_scan / N

* ``σ²_seed``: the variance of ``D_s`` between seeds on the fixed test split (training noise: initial weights, data
  order, and their interaction with the scans), estimated by the sample variance of the ``D_s``;
* ``σ²_scan``: ``N`` times the variance of ``Δ`` under resampling the test scans (within each class, the same scans
  for every model and seed), seeds fixed. Every seed shares the test split, so this term does not shrink with more
  seeds; only more test scans reduce it.

The minimum detectable difference at power ``1 − β`` and two-sided level ``α`` is
``(z_{1−α/2} + z_{1−β}) · sqrt(Var(Δ))`` (2.80 standard errors at 80 % power, α = 0.05). For a target difference
``δ`` the variance budget is ``V* = (δ / 2.80)²``: at the current ``N`` it needs ``S ≥ σ²_seed / (V* − σ²_scan/N)``
seeds (impossible when ``σ²_scan/N ≥ V*``), at the current ``S`` it needs ``N ≥ σ²_scan / (V* − σ²_seed/S)`` scans,
and never fewer than ``σ²_seed / V*`` seeds and ``σ²_scan / V*`` scans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

__all__ = ["VarianceComponents", "variance_components", "minimum_detectable", "needed", "power_note", "counted"]

TARGET = 0.01
"""The difference the study is sized for (one point of ROC AUC or accuracy)."""


@dataclass(frozen=True)
class VarianceComponents:
    """``σ²_seed``, ``σ²_scan`` of a paired comparison measured with ``n_seeds`` seeds on ``n_scans`` test scans."""

    seed_var: float
    scan_var: float
    n_seeds: int
    n_scans: int

    def variance(self, seeds: int | None = None, scans: int | None = None) -> float:
        """``σ²_seed / S + σ²_scan / N`` (default: the measured ``S`` and ``N``)."""
        s = self.n_seeds if seeds is None else seeds
        n = self.n_scans if scans is None else scans
        return self.seed_var / s + self.scan_var / n


def counted(n: int, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``: a count with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _z(power: float, alpha: float) -> float:
    return float(norm.ppf(1.0 - alpha / 2.0) + norm.ppf(power))


def minimum_detectable(
    vc: VarianceComponents, power: float = 0.8, alpha: float = 0.05, seeds: int | None = None, scans: int | None = None
) -> float:
    """The smallest true difference detected with probability ``power`` by a two-sided level-``alpha`` test."""
    return _z(power, alpha) * math.sqrt(vc.variance(seeds, scans))


def needed(vc: VarianceComponents, effect: float = TARGET, power: float = 0.8, alpha: float = 0.05) -> dict:
    """Seeds and scans a difference ``effect`` needs.

    Returns:
        ``{"seeds_at_scans": S or None, "scans_at_seeds": N or None, "min_seeds": S_min, "min_scans": N_min}``:
        seeds needed with the measured number of scans, scans needed with the measured number of seeds (``None``
        where the other term alone already exceeds the budget), and the floors when the other term is made zero.
    """
    budget = (abs(effect) / _z(power, alpha)) ** 2
    scan_term, seed_term = vc.scan_var / vc.n_scans, vc.seed_var / vc.n_seeds

    def count(var: float, rest: float) -> int | None:
        if var <= 0:
            return 1
        return None if rest >= budget else max(1, math.ceil(var / (budget - rest)))

    return {
        "seeds_at_scans": count(vc.seed_var, scan_term),
        "scans_at_seeds": count(vc.scan_var, seed_term),
        "min_seeds": max(1, math.ceil(vc.seed_var / budget)),
        "min_scans": max(1, math.ceil(vc.scan_var / budget)),
    }


def variance_components(
    labels: Sequence[int],
    terms: Sequence[Sequence[tuple[Sequence[float], float, float]]],
    metric: str,
    n_boot: int = 500,
    seed: int = 0,
) -> VarianceComponents:
    """Estimate the components of a paired contrast from the per-scan scores of every model of every seed.

    Args:
        labels: ``(N,)`` test labels, the same scans in the same order for every model.
        terms: per seed, the contrast's terms ``(scores (N,), threshold, coefficient)`` (as for
            :func:`scripts.study.stats.two_level_contrast_ci`).
        metric: ``"roc_auc"``, ``"accuracy"``, ... (see :func:`scripts.metrics.metric_rows`).
        n_boot: scan resamples for ``σ²_scan``.
        seed: resampling seed.
    """
    from scripts.metrics import metric_rows

    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not terms or not all(terms):
        raise ValueError("variance components need at least one seed with at least one term.")
    n_terms = len(terms[0])
    if any(len(t) != n_terms for t in terms):
        raise ValueError("every seed needs the same number of terms.")
    scores = np.stack([np.asarray(t[0], dtype=np.float64).reshape(-1) for seed_terms in terms for t in seed_terms])
    thresholds = np.array([t[1] for seed_terms in terms for t in seed_terms], dtype=np.float64)
    coefficients = np.array([[t[2] for t in seed_terms] for seed_terms in terms], dtype=np.float64)
    n_seeds = len(terms)

    def contrast(idx: np.ndarray) -> np.ndarray:
        values = metric_rows(y[idx], scores[:, idx], metric, thresholds)
        return (values.reshape(n_seeds, n_terms) * coefficients).sum(axis=1)

    per_seed = contrast(np.arange(y.size))
    seed_var = float(np.var(per_seed, ddof=1)) if n_seeds > 1 else 0.0
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in (0, 1)]
    means = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([c[rng.integers(0, c.size, c.size)] for c in classes if c.size])
        means[i] = contrast(idx).mean()
    scan_var = float(np.nanvar(means, ddof=1)) * y.size
    return VarianceComponents(seed_var=seed_var, scan_var=scan_var, n_seeds=n_seeds, n_scans=int(y.size))


def power_note(vc: VarianceComponents, effect: float = TARGET) -> str:
    """One line for a report: the minimum detectable difference and what ``effect`` would need (with one seed pair
    the seed variance is unknown: only the scan term's lower bound is given)."""
    if vc.n_seeds < 2:
        return (
            f"MDE ≥ {minimum_detectable(vc):.3f} from the test scans alone (σ²_scan {vc.scan_var:.2g}, "
            f"N {vc.n_scans}); one seed pair gives no seed variance, so the seeds a difference needs are unknown"
        )
    need = needed(vc, effect)
    seeds = need["seeds_at_scans"]
    scans = need["scans_at_seeds"]
    at_n = counted(seeds, "seed") if seeds is not None else "no number of seeds"
    at_s = counted(scans, "scan") if scans is not None else "no number of scans"
    return (
        f"MDE {minimum_detectable(vc):.3f} (80 % power; σ²_seed {vc.seed_var:.2g}, σ²_scan {vc.scan_var:.2g}, "
        f"S {vc.n_seeds}, N {vc.n_scans}); {effect:g} needs {at_n} at N = {vc.n_scans} or {at_s} at S = "
        f"{vc.n_seeds} (at least {counted(need['min_seeds'], 'seed')} and {counted(need['min_scans'], 'scan')})"
    )
