# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
import math

import pytest
import torch
from ignite.engine import Engine

from scripts.metrics import ClassificationMetric, classification_report, pd_score_and_label


def test_report_matches_hand_counts():
    # 4 PD (3 detected), 2 HC (1 correctly rejected)
    labels = [1, 1, 1, 1, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.2, 0.6, 0.1]
    r = classification_report(labels, scores)
    assert r["confusion_matrix"] == [[1, 1], [1, 3]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["sensitivity"] == pytest.approx(3 / 4)
    assert r["specificity"] == pytest.approx(1 / 2)
    f1_pd, f1_hc = 2 * 3 / (2 * 3 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 1)
    assert r["f1_macro"] == pytest.approx((f1_pd + f1_hc) / 2)
    assert r["f1_weighted"] == pytest.approx((4 * f1_pd + 2 * f1_hc) / 6)
    # AUC: fraction of (PD, HC) pairs ranked correctly: PD scores vs HC {0.6, 0.1}
    pairs = [(p, h) for p in (0.9, 0.8, 0.7, 0.2) for h in (0.6, 0.1)]
    assert r["roc_auc"] == pytest.approx(sum(p > h for p, h in pairs) / len(pairs))
    assert (r["n"], r["n_pd"], r["n_hc"]) == (6, 4, 2)


def test_report_single_class_has_no_auc_and_always_pd_baseline():
    r = classification_report([1, 1, 0, 1, 1], [1.0] * 5)
    assert r["sensitivity"] == 1.0 and r["specificity"] == 0.0
    assert r["f1_macro"] == pytest.approx((2 * 4 / (2 * 4 + 1)) / 2)
    assert classification_report([1, 1], [0.2, 0.9])["roc_auc"] is None


@pytest.mark.parametrize("labels", [[0, 2], [-1, 1]])
def test_report_rejects_bad_labels(labels):
    with pytest.raises(ValueError, match="labels must be 0"):
        classification_report(labels, [0.1, 0.2])


def test_report_rejects_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="same length"):
        classification_report([0, 1], [0.1])
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [])


def test_pd_score_accepts_decollated_and_batched_outputs():
    probs = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    decollated = [{"pred": probs[0], "label": torch.tensor(1)}, {"pred": probs[1], "label": torch.tensor([0])}]
    s, y = pd_score_and_label(decollated)
    assert torch.allclose(s, torch.tensor([0.7, 0.1])) and y.tolist() == [1, 0]
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    s, _ = pd_score_and_label({"pred": logits, "label": torch.tensor([1, 0])})
    assert torch.allclose(s, torch.softmax(logits, 1)[:, 1])


def test_ignite_metric_accumulates_over_iterations():
    batches = [
        [{"pred": torch.tensor([0.2, 0.8]), "label": torch.tensor(1)}],
        [{"pred": torch.tensor([0.6, 0.4]), "label": torch.tensor(0)}],
        [{"pred": torch.tensor([0.7, 0.3]), "label": torch.tensor(1)}],
    ]
    engine = Engine(lambda e, b: b)
    ClassificationMetric("accuracy").attach(engine, "acc")
    ClassificationMetric("roc_auc").attach(engine, "auc")
    engine.run(batches, max_epochs=1)
    assert engine.state.metrics["acc"] == pytest.approx(2 / 3)
    assert engine.state.metrics["auc"] == pytest.approx(0.5)


def test_ignite_metric_reports_nan_for_undefined_auc():
    engine = Engine(lambda e, b: b)
    ClassificationMetric("roc_auc").attach(engine, "auc")
    engine.run([[{"pred": torch.tensor([0.2, 0.8]), "label": torch.tensor(1)}]], max_epochs=1)
    assert math.isnan(engine.state.metrics["auc"])
    with pytest.raises(ValueError, match="metric must be one of"):
        ClassificationMetric("precision")
