# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Power of paired comparisons: variance components, minimum detectable difference, seeds and scans needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scripts.study import power


def test_minimum_detectable_difference_on_hand_made_components():
    # The components measured on the earlier 3-seed x 120-scan study (accuracy): Var = 3.9e-4/S + 0.0106/N.
    vc = power.VarianceComponents(seed_var=3.9e-4, scan_var=0.0106, n_seeds=3, n_scans=120)
    se = math.sqrt(3.9e-4 / 3 + 0.0106 / 120)
    assert vc.variance() == pytest.approx(se**2)
    assert power.minimum_detectable(vc) == pytest.approx(2.8016 * se, rel=1e-4)  # z_0.975 + z_0.8 = 2.8016
    assert power.minimum_detectable(vc, seeds=10, scans=1000) == pytest.approx(
        2.8016 * math.sqrt(3.9e-5 + 1.06e-5), rel=1e-4
    )
    need = power.needed(vc, 0.01)
    budget = (0.01 / 2.8016) ** 2  # 1.274e-5
    # 0.0106 / 120 = 8.8e-5 > budget: no number of seeds reaches 0.01 on 120 scans, nor scans with 3 seeds.
    assert need["seeds_at_scans"] is None and need["scans_at_seeds"] is None
    assert need["min_seeds"] == math.ceil(3.9e-4 / budget) and need["min_scans"] == math.ceil(0.0106 / budget)
    # With 10,000 test scans the scan term is 1.06e-6: seeds = 3.9e-4 / (budget - 1.06e-6).
    big = power.VarianceComponents(3.9e-4, 0.0106, 3, 10_000)
    assert power.needed(big, 0.01)["seeds_at_scans"] == math.ceil(3.9e-4 / (budget - 1.06e-6))
    # No seed variance: one seed is enough once the scans suffice.
    assert power.needed(power.VarianceComponents(0.0, 0.0106, 3, 10_000), 0.01)["seeds_at_scans"] == 1
    note = power.power_note(power.VarianceComponents(0.0, 0.0106, 3, 10_000))
    assert "needs 1 seed at N = 10000" in note and "at least 1 seed and" in note, note
    assert "MDE 0.041" in power.power_note(vc)
    assert "no seed variance" in power.power_note(power.VarianceComponents(0.0, 0.0106, 1, 1000))


def test_variance_components_from_per_scan_scores():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
    signal = labels + rng.normal(0, 1, n)
    # Identical models: no difference at all, whatever the resampling.
    same = [[(signal, 0.5, 1.0), (signal, 0.5, -1.0)] for _ in range(4)]
    vc = power.variance_components(labels, same, "roc_auc", n_boot=50)
    assert vc.seed_var == 0 and vc.scan_var == pytest.approx(0.0, abs=1e-12) and vc.n_seeds == 4 and vc.n_scans == n
    # Every seed the same pair of models: no seed variance, but a finite scan variance.
    other = labels + rng.normal(0, 1, n)
    shared = [[(signal, 0.5, 1.0), (other, 0.5, -1.0)] for _ in range(3)]
    vc = power.variance_components(labels, shared, "roc_auc", n_boot=300)
    assert vc.seed_var == pytest.approx(0.0, abs=1e-12) and vc.scan_var > 0
    # Independent noise per seed: a seed variance appears.
    noisy = [[(signal + rng.normal(0, 1, n), 0.5, 1.0), (other, 0.5, -1.0)] for _ in range(6)]
    assert power.variance_components(labels, noisy, "roc_auc", n_boot=100).seed_var > 1e-5
    with pytest.raises(ValueError, match="same number of terms"):
        power.variance_components(labels, [[(signal, 0.5, 1.0)], [(signal, 0.5, 1.0), (other, 0.5, -1.0)]], "roc_auc")
