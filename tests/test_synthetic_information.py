# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The information budget: PD vs HC from the whole volume vs the voxels each projection feeds the student."""

from __future__ import annotations

import numpy as np
import pytest
from scripts.metrics import logistic_cv_scores, roc_auc_rows
from scripts.synthetic import information as info


def _constructed(n: int = 40, seed: int = 0):
    """PD loses binding only in dorsal putamen voxels that no projection sees; HC and PD differ nowhere else."""
    rng = np.random.default_rng(seed)
    regs, sets = info.regions(), info.voxel_sets()
    striatum = np.zeros(info.GRID, dtype=bool)
    for name, mask in regs.items():
        if name != "occipital":
            striatum |= mask
    hidden = np.zeros(info.GRID, dtype=bool)
    for side in ("L", "R"):
        hidden |= regs[f"putamen_post_dorsal_{side}"] | regs[f"putamen_ant_dorsal_{side}"]
    hidden &= ~sets["views_three_slices"]
    assert hidden.sum() > 50
    labels = np.arange(n) % 2
    feats = []
    for label in labels:
        vol = 1.0 + 2.0 * striatum + 0.05 * rng.standard_normal(info.GRID)
        vol *= rng.uniform(0.9, 1.1)  # global scale: cancels in the SBR
        vol[striatum] += rng.normal(0.0, 0.03)  # between-subject binding level, shared by every region
        if label:
            vol[hidden] -= 1.5
        feats.append(info.regional_sbr(vol))
    return feats, labels


def test_budget_orders_the_whole_volume_above_projections_that_miss_the_loss():
    feats, labels = _constructed()
    table = info.budget_from_features(feats, labels, n_boot=200)
    assert list(table) == list(info.VOXEL_SETS)
    for method in ("lowest_putamen", "logistic"):
        whole = table["whole_volume"][method]
        assert whole["auc"] > 0.95 and whole["low"] <= whole["auc"] <= whole["high"]
        for name in info.VOXEL_SETS[1:]:
            row = table[name][method]
            assert row["auc"] < whole["auc"] - 0.2, (name, method, row)
            assert row["diff_high"] < 0  # the interval of the paired difference excludes 0
    assert table["whole_volume"]["n_regions"] == 16 and table["single_slice"]["n_regions"] < 16
    text = info.format_budget(
        {"design": {"preset": "x", "seed": 0, "n_scans": 40, "n_pd": 20, "grid": [64] * 3}, "table": table}
    )
    assert text.count("\n| ") == 6 and "whole volume" in text


def test_roc_auc_and_logistic_fit_on_known_cases():
    y = np.array([0, 0, 1, 1])
    assert roc_auc_rows(y, np.array([0.1, 0.2, 0.3, 0.4]))[0] == 1.0
    assert roc_auc_rows(y, np.array([0.4, 0.3, 0.2, 0.1]))[0] == 0.0
    assert roc_auc_rows(y, np.array([1.0, 1.0, 1.0, 1.0]))[0] == 0.5
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 3))
    labels = (x[:, 0] - 0.5 * x[:, 1] + 0.3 * rng.standard_normal(200) > 0).astype(int)
    scores = logistic_cv_scores(x, labels)
    assert roc_auc_rows(labels, scores)[0] > 0.95
    with pytest.raises(ValueError, match="both classes"):
        info.budget_from_features(_constructed(4)[0], [1, 1, 1, 1], n_boot=10)
