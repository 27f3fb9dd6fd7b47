# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The study's statistics and operating points on hand-made numbers."""

import numpy as np
import pytest
from scripts.metrics import metric_rows
from scripts.study.operating import prevalence_threshold, youden_threshold
from scripts.study.stats import (
    bootstrap_ci,
    min_p_value,
    paired_comparison,
    sign_flip_test,
    summarise,
    two_level_bootstrap_ci,
    two_level_contrast_ci,
)


def test_summary_is_mean_and_sample_std_and_drops_undefined_values():
    s = summarise([0.8, 0.9, 1.0, None])
    assert s.mean == pytest.approx(0.9) and s.std == pytest.approx(0.1) and s.n == 3
    assert s.format() == "0.900 ± 0.100"
    assert summarise([0.7]).format() == "0.700" and summarise([None]) is None


def test_sign_flip_test_is_exact_over_all_sign_patterns():
    # five positive differences: only the all-plus and all-minus patterns reach |mean| = 1, p = 2 / 32
    assert sign_flip_test([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)
    assert min_p_value(5) == pytest.approx(0.0625)
    # (2, 1, -1): |±2 ±1 ±1| >= 2 for 6 of the 8 patterns
    assert sign_flip_test([2, 1, -1]) == pytest.approx(6 / 8)
    assert sign_flip_test([0, 0, 0]) == pytest.approx(1.0)
    # beyond max_exact a seeded Monte Carlo estimate close to the exact value
    d = [1.0, 0.5, 0.8, -0.2, 0.3, 0.9]
    assert sign_flip_test(d, max_exact=3) == pytest.approx(sign_flip_test(d), abs=0.01)


def test_bootstrap_ci_is_reproducible_and_brackets_the_mean():
    d = [0.05, 0.02, 0.04, -0.01, 0.03]
    low, high = bootstrap_ci(d, seed=0)
    assert (low, high) == bootstrap_ci(d, seed=0)
    assert low < np.mean(d) < high and min(d) <= low and high <= max(d)
    assert bootstrap_ci([0.1]) == (0.1, 0.1)
    assert bootstrap_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))


def test_paired_comparison_pairs_by_seed_and_gives_a_verdict():
    kd = {0: 0.90, 1: 0.92, 2: 0.95, 3: 0.91, 4: 0.93}
    nokd = {0: 0.85, 1: 0.86, 2: 0.90, 3: 0.88, 4: 0.87}
    c = paired_comparison(kd, nokd)
    assert c.pairs == tuple((s, s) for s in range(5))
    assert c.diffs == pytest.approx((0.05, 0.06, 0.05, 0.03, 0.06))
    assert c.mean == pytest.approx(0.05) and c.p_value == pytest.approx(0.0625)
    assert c.verdict == "higher" and c.decided
    # noise: the interval contains 0
    c = paired_comparison({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.85, 1: 0.85, 2: 0.85})
    assert c.within_noise and c.verdict == "within noise"
    # two pairs never get a verdict, however clear
    assert paired_comparison({0: 1.0, 1: 1.0}, {0: 0.0, 1: 0.0}).verdict == "too few seeds"


def test_student_teacher_pairing_uses_the_teacher_of_each_student():
    students = {0: 0.8, 1: 0.7, 2: 0.9, 3: 0.6}
    teachers = {0: 0.75, 1: 0.65}
    c = paired_comparison(students, teachers, pair={s: s % 2 for s in students})
    assert c.pairs == ((0, 0), (1, 1), (2, 0), (3, 1))
    assert c.diffs == pytest.approx((0.05, 0.05, 0.15, -0.05))
    assert paired_comparison({0: None}, {0: 0.5}) is None  # undefined values are left out


def test_youden_threshold_on_validation_scores():
    # separated: the midpoint between the highest HC and the lowest PD score
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9]) == pytest.approx(0.45)
    # overlapping: J = 2/3 + 1 - 1 at t in (0.5, 0.6] beats J = 1 + 1/2 - 1 at t in (0.3, 0.4]
    t = youden_threshold([0, 0, 1, 1, 1], [0.3, 0.5, 0.4, 0.6, 0.9])
    assert t == pytest.approx(0.55)
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([1, 1], [0.2, 0.3])


def test_prevalence_threshold_calls_the_assumed_share_pd_without_labels():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    t = prevalence_threshold(scores, 0.8)
    assert sum(s >= t for s in scores) == 8 and t == pytest.approx(0.25)
    assert all(s >= prevalence_threshold(scores, 1.0) for s in scores)
    assert not any(s >= prevalence_threshold(scores, 0.0) for s in scores)
    with pytest.raises(ValueError, match="prevalence"):
        prevalence_threshold(scores, 1.5)


def test_metrics_from_scores_match_hand_counts():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.3, 0.6, 0.9, 0.2, 0.8])
    # pairs (PD, HC): 4 × 3 = 12; PD 0.6 ties HC 0.6 (1/2), PD 0.2 beats only 0.1
    assert metric_rows(labels, scores, "roc_auc")[0] == pytest.approx((2.5 + 3 + 1 + 3) / 12)
    # at 0.5: TP 3 (0.6, 0.9, 0.8), FN 1, TN 2, FP 1
    assert metric_rows(labels, scores, "accuracy", 0.5)[0] == pytest.approx(5 / 7)
    assert metric_rows(labels, scores, "sensitivity", 0.5)[0] == pytest.approx(3 / 4)
    assert metric_rows(labels, scores, "specificity", 0.5)[0] == pytest.approx(2 / 3)
    assert metric_rows(labels, scores, "f1_macro", 0.5)[0] == pytest.approx((6 / 8 + 4 / 6) / 2)
    with pytest.raises(ValueError, match="metric must be"):
        metric_rows(labels, scores, "auc")


def test_two_level_bootstrap_covers_test_scan_noise_and_stays_paired():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 70)
    base = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, labels.size), 0, 1)
    # identical models: every resample gives exactly 0 (the same scans are drawn for both)
    same = [(base, 0.5, base.copy(), 0.5)] * 3
    assert two_level_bootstrap_ci(labels, same, "roc_auc", n_boot=200) == (0.0, 0.0)
    # a model that separates the classes perfectly beats the noisy one on every resample
    perfect = labels.astype(float)
    low, high = two_level_bootstrap_ci(labels, [(perfect, 0.5, base, 0.5)] * 3, "roc_auc", n_boot=200)
    assert 0 < low <= high
    # seeds that agree exactly still get a non-zero width from the finite test split
    noisy = np.clip(base + rng.normal(0, 0.15, labels.size), 0, 1)
    low, high = two_level_bootstrap_ci(labels, [(noisy, 0.5, base, 0.5)] * 3, "accuracy", n_boot=500)
    assert high - low > 0.02


def test_a_comparison_is_decided_by_its_two_level_interval_when_known():
    from dataclasses import replace

    c = paired_comparison({0: 0.02, 1: 0.03, 2: 0.025}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert c.decided and c.verdict == "higher"  # the seed-level interval excludes 0
    wide = replace(c, scan_ci=(-0.01, 0.06))
    assert not wide.decided and wide.verdict == "within noise"
    assert "[-0.010, +0.060]" in wide.format()


def test_a_difference_of_gains_gets_a_two_level_interval():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 20 + [1] * 40)
    a, b = (np.clip(labels * 0.3 + rng.normal(0.35, 0.2, labels.size), 0, 1) for _ in range(2))
    pairs = [(a, 0.5, b, 0.5)] * 2
    terms = [[(a, 0.5, 1.0), (b, 0.5, -1.0)]] * 2
    # a two-term contrast is the paired difference
    assert two_level_contrast_ci(labels, terms, "roc_auc", n_boot=300) == two_level_bootstrap_ci(
        labels, pairs, "roc_auc", n_boot=300
    )
    # the same gain at both fractions: the difference of gains is exactly 0 on every resample
    same_gain = [[(a, 0.5, 1.0), (b, 0.5, -1.0), (a, 0.5, -1.0), (b, 0.5, 1.0)]] * 3
    assert two_level_contrast_ci(labels, same_gain, "accuracy", n_boot=100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same number of terms"):
        two_level_contrast_ci(labels, [terms[0], terms[0][:1]], "roc_auc")
