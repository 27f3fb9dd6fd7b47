# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
import math

import pytest
import torch
from conftest import BUNDLE_ROOT
from ignite.engine import Engine
from monai.bundle import ConfigParser
from scripts.metrics import classification_report


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


def _config_metrics():
    """The validation postprocessing and metric handlers exactly as ``configs/train_teacher.json`` defines them."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train_teacher.json"))
    parser.parse()
    post = parser.get_parsed_content("validate#postprocessing")
    metrics = {
        **parser.get_parsed_content("validate#key_metric"),
        **parser.get_parsed_content("validate#additional_metrics"),
    }
    return post, metrics


def _run_metrics(logits_batches, label_batches):
    """Run the config's postprocessing + metrics over batches of logits, as the bundle's evaluator does (batch
    postprocessing, no decollation)."""
    post, metrics = _config_metrics()

    def step(engine, batch):
        logits, labels = batch
        return post({"pred": logits, "label": labels})

    engine = Engine(step)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    engine.run(list(zip(logits_batches, label_batches)), max_epochs=1)
    return engine.state.metrics


def test_config_metric_handlers_match_the_hand_computed_report():
    # the hand-counted case above, given as logits whose softmax PD probabilities are the scores
    labels = [1, 1, 1, 1, 0, 0]
    scores = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.6, 0.1], dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(scores), torch.log(scores / (1 - scores))], dim=1).float()
    y = torch.tensor(labels)
    got = _run_metrics([logits[:4], logits[4:]], [y[:4], y[4:]])  # two iterations: metrics accumulate
    want = classification_report(labels, scores.tolist())
    assert got["val_accuracy"] == pytest.approx(want["accuracy"])
    assert got["val_f1_macro"] == pytest.approx(want["f1_macro"])
    assert got["val_auc"] == pytest.approx(want["roc_auc"])
    assert got["val_sensitivity"] == pytest.approx(want["sensitivity"])
    assert got["val_specificity"] == pytest.approx(want["specificity"])


def test_config_metric_handlers_always_pd_and_single_class():
    # always-PD predictions: sensitivity 1, specificity 0, macro-F1 = F1_PD / 2
    logits = torch.tensor([[0.0, 3.0]] * 5)
    got = _run_metrics([logits], [torch.tensor([1, 1, 0, 1, 1])])
    assert got["val_sensitivity"] == 1.0 and got["val_specificity"] == 0.0
    assert got["val_f1_macro"] == pytest.approx((2 * 4 / (2 * 4 + 1)) / 2)
    # a split with one class only: ROC AUC is undefined (MONAI reports nan and warns)
    with pytest.warns(UserWarning):
        got = _run_metrics([torch.tensor([[0.0, 1.0], [1.0, 0.0]])], [torch.tensor([1, 1])])
    assert math.isnan(got["val_auc"])


def _probs(pd_scores: list[float]) -> torch.Tensor:
    p = torch.tensor(pd_scores, dtype=torch.float64)
    return torch.stack([1 - p, p], dim=1)


def test_auc_ce_breaks_ties_by_cross_entropy_and_keeps_the_order_of_different_aucs():
    from scripts.metrics import roc_auc, roc_auc_then_ce

    labels = torch.tensor([1, 1, 1, 0, 0])
    timid, confident = _probs([0.6, 0.55, 0.7, 0.4, 0.45]), _probs([0.99, 0.95, 0.97, 0.02, 0.05])
    assert roc_auc(timid, labels) == roc_auc(confident, labels) == 1.0
    assert roc_auc_then_ce(confident, labels) > roc_auc_then_ce(timid, labels)
    assert 1.0 - 1 / 24 < roc_auc_then_ce(timid, labels) < 1.0  # within a quarter AUC step (1 / (3 * 2)) below
    # one swapped pair (AUC 5/6) however well calibrated the rest stays below any perfect ranking
    swapped = _probs([1.0 - 1e-9, 1.0 - 1e-9, 0.3, 0.4, 1e-9])
    assert roc_auc(swapped, labels) == pytest.approx(5 / 6)
    assert roc_auc_then_ce(swapped, labels) < roc_auc_then_ce(timid, labels)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):  # random pairs, with tied scores (half-pairs): a higher AUC always scores higher
        a, b = (torch.randint(0, 5, (2, 5), generator=generator) / 4).tolist()
        auc_a, auc_b = roc_auc(_probs(a), labels), roc_auc(_probs(b), labels)
        if abs(auc_a - auc_b) > 1e-9:
            assert (roc_auc_then_ce(_probs(a), labels) > roc_auc_then_ce(_probs(b), labels)) == (auc_a > auc_b)
