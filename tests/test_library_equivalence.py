# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The library calls that replaced hand-written statistics give the numbers the hand-written code gave.

The expected values below were computed, on the same fixed inputs, by the code these functions replaced: the
study's own bootstrap, sign-flip test and Mann-Whitney AUC (now ``scipy.stats.bootstrap``, ``permutation_test``
and ``rankdata``), the explanation's own rank correlation (now ``scipy.stats.spearmanr``) and the four metric
implementations now in :mod:`scripts.metrics`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc
from scripts.explain import spearman
from scripts.metrics import classification_report, metric_rows, roc_auc_rows
from scripts.study.operating import youden_threshold
from scripts.study.stats import bootstrap_ci, sign_flip_test, two_level_bootstrap_ci

LABELS = np.r_[np.zeros(12, int), np.ones(28, int)]
# scores rounded to two decimals (ties across classes), a second model, and a reversed one
SCORES = np.array(
    [0.3, 0.37, 0.23, 0.08, 0.19, 0.05, 0.32, 0.64, 0.18, 0.14, 0.42, 0.39, 0.73, 0.47, 0.69, 0.87, 0.36, 0.59, 0.22,
     0.38, 0.24, 0.64, 0.38, 0.77, 0.74, 0.65, 0.07, 0.57, 0.69, 0.73, 0.32, 0.58, 0.46, 0.5, 0.97, 0.5, 0.69, 0.92,
     0.55, 0.67]
)  # fmt: skip
OTHER = np.array(
    [0.9, 0.5, 0.8, 0.6, 0.7, 0.1, 0.5, 0.5, 0.9, 0.4, 0.6, 0.1, 0.4, 0.3, 0.2, 0.8, 0.4, 1.0, 0.6, 0.6, 0.6, 0.7, 0.2,
     0.4, 0.2, 0.4, 0.1, 1.0, 0.2, 0.7, 0.3, 0.9, 0.7, 0.1, 0.8, 0.9, 0.9, 0.6, 0.1, 0.2]
)  # fmt: skip
ROWS = np.stack([SCORES, OTHER, 1 - SCORES])
OLD_ROWS = {
    "roc_auc": [0.8601190476190477, 0.46577380952380953, 0.13988095238095238],
    "accuracy": [0.75, 0.425, 0.3],
    "sensitivity": [0.6785714285714286, 0.5, 0.39285714285714285],
    "specificity": [0.9166666666666666, 0.25, 0.08333333333333333],
    "balanced_accuracy": [0.7976190476190477, 0.375, 0.23809523809523808],
    "f1_macro": [0.7395833333333333, 0.3779580797836376, 0.25333333333333335],
}


@pytest.mark.parametrize("metric", sorted(OLD_ROWS))
def test_metric_rows_give_the_old_values(metric):
    assert metric_rows(LABELS, ROWS, metric, 0.5) == pytest.approx(OLD_ROWS[metric], abs=1e-12)
    # per-row thresholds give what one call per row gives
    thresholds = np.array([0.4, 0.5, 0.6])
    each = [metric_rows(LABELS, ROWS[r], metric, thresholds[r])[0] for r in range(3)]
    assert metric_rows(LABELS, ROWS, metric, thresholds) == pytest.approx(each, abs=1e-12)


def test_roc_auc_is_monai_compute_roc_auc_and_one_class_is_undefined():
    for row in ROWS:
        expected = float(compute_roc_auc(torch.as_tensor(row), torch.as_tensor(LABELS)))
        assert roc_auc_rows(LABELS, row)[0] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(roc_auc_rows(np.ones(4, int), np.arange(4.0))[0])


def test_classification_report_and_youden_threshold_give_the_old_values():
    report = classification_report(LABELS, SCORES, 0.45)
    assert report.pop("confusion_matrix") == [[11, 1], [7, 21]]
    assert report == pytest.approx(
        {
            "accuracy": 0.8,
            "sensitivity": 0.75,
            "specificity": 0.9166666666666666,
            "f1_macro": 0.7866666666666666,
            "f1_weighted": 0.808,
            "roc_auc": 0.8601190476190477,
            "n": 40,
            "n_pd": 28,
            "n_hc": 12,
        },
        abs=1e-12,
    )
    assert youden_threshold(LABELS, SCORES) == pytest.approx(0.44, abs=1e-12)


def test_permutation_test_and_bootstrap_give_the_old_values():
    assert sign_flip_test([0.05, 0.06, 0.05, 0.03, 0.06]) == 0.0625
    assert sign_flip_test([0.1, -0.02, 0.03, 0.04, -0.01, 0.02]) == pytest.approx(0.21875)
    # the same resampling draws as before: identical percentile intervals
    assert bootstrap_ci([0.05, 0.06, 0.05, 0.03, 0.06]) == pytest.approx((0.04, 0.058), abs=1e-12)
    assert bootstrap_ci([0.1, -0.02, 0.03, 0.04, -0.01, 0.02]) == pytest.approx(
        (-0.001666666666666667, 0.05833333333333335), abs=1e-12
    )
    pairs = [(SCORES, 0.5, OTHER, 0.5)] * 3
    assert two_level_bootstrap_ci(LABELS, pairs, "accuracy", n_boot=300) == pytest.approx((0.186875, 0.525), abs=1e-12)
    assert two_level_bootstrap_ci(LABELS, pairs, "roc_auc", n_boot=300) == pytest.approx(
        (0.21867559523809527, 0.6145833333333334), abs=1e-12
    )


def test_spearman_gives_the_old_values():
    rng = np.random.default_rng(7)
    a = np.round(rng.random((6, 7)), 1)
    b = np.round(a + rng.normal(0, 0.3, a.shape), 1)
    mask = rng.random(a.shape) > 0.3
    assert spearman(a, b) == pytest.approx(0.7651936279294755, abs=1e-12)
    assert spearman(a, b, mask) == pytest.approx(0.7968612543394884, abs=1e-12)


def test_the_report_page_from_its_template_is_the_page_the_string_building_wrote(tmp_path):
    import hashlib

    from scripts.report import ScanRecord, write_index

    records = [
        ScanRecord(
            image="/d/a<1>.nii.gz",
            name="a<1>",
            png="scans/a.png",
            student_pd=0.91,
            teacher_pd=0.8,
            predicted_label="PD",
            sbr={"lowest_putamen": 0.42},
            warnings=["off & template"],
        ),
        ScanRecord(image="/d/b.nii.gz", name="b", error='unreadable "x"'),
        ScanRecord(image="/d/c.nii.gz", name="c", student_pd=0.1, predicted_label="HC"),
    ]
    page = write_index(tmp_path, records, notes=["note <1>", "n2"]).read_text(encoding="utf-8")
    assert hashlib.sha256(page.encode()).hexdigest() == (
        "148175b0337464a0152521b74b110e1a64611e5939da8e1c76a9eed0a8a2c38a"
    )  # the page the Python string building wrote for these records
