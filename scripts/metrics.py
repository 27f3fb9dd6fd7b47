# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Binary PD-vs-HC classification metrics: one family of functions for every path.

From per-scan scores (paths without an engine): :func:`classification_report` (the study's cells, the SBR
baseline), :func:`metric_rows` (one metric of many score rows at once: the study's bootstrap intervals, operating
points), :func:`roc_auc_rows` and :func:`roc_curve` (the study's figures, the information budget) and
:func:`logistic_cv_scores` (out-of-fold scores of a logistic regression: the information budget, the SBR
calibration's nuisance check).

From a whole validation's tensors (engines, as ignite ``EpochMetric``'s ``compute_fn`` in the configs'
``validate#metrics``): :func:`f1_macro`, :func:`accuracy`, :func:`roc_auc`, :func:`roc_auc_then_ce`,
:func:`sensitivity`, :func:`specificity`, the selectable ones named by :data:`SELECTION_METRICS`.
``configs/evaluate.json`` uses MONAI's and ignite's metric handlers (``Fbeta``, ``Accuracy``, ``ROCAUC``,
``ConfusionMatrix``). The tests check that all of them give the same numbers, and that :func:`roc_auc_rows` (the
Mann-Whitney statistic from ``scipy.stats.rankdata``, vectorised over rows) equals MONAI's ``compute_roc_auc``.

Label convention everywhere: ``0 = HC`` (healthy control), ``1 = PD`` (Parkinson's disease, the positive
class). Sensitivity is PD recall, specificity is HC recall. A scan is predicted PD when ``score >= threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

__all__ = [
    "classification_report",
    "metric_rows",
    "roc_auc_rows",
    "roc_curve",
    "logistic_cv_scores",
    "METRIC_NAMES",
    "ROW_METRICS",
    "SELECTION_METRICS",
    "f1_macro",
    "accuracy",
    "roc_auc",
    "roc_auc_then_ce",
    "sensitivity",
    "specificity",
]

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "f1_macro", "f1_weighted", "roc_auc")
ROW_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1_macro")
"""The metrics :func:`metric_rows` computes."""

SELECTION_METRICS = ("f1_macro", "auc", "auc_ce", "accuracy")
"""Validation metrics a training run may select its best checkpoint (and stop early) by: the ``selection_metric``
option; ``validate#metrics`` in ``configs/train_teacher.json`` holds them. ``f1_macro`` and ``accuracy`` score the
arg-max class, so a network that still calls every validation scan PD scores the same epoch after epoch and the
first such epoch is kept; ``auc`` (ROC AUC) is threshold-free and moves with the ranking, which is what the
operating point chosen on validation uses. On a small validation split ROC AUC saturates too (every epoch after
the first perfect ranking scores 1.000, and the first is kept); ``auc_ce`` (:func:`roc_auc_then_ce`) breaks such
ties by the validation cross-entropy (the study's low-data cells select by it)."""


def _confusion(labels: np.ndarray, scores: np.ndarray, threshold) -> tuple[np.ndarray, ...]:
    """``(tp, tn, fp, fn)`` of each row of ``scores`` ``(R, N)``; ``threshold``: a number or one per row ``(R,)``."""
    t = np.asarray(threshold, dtype=np.float64)
    pred = scores >= (t[:, None] if t.ndim == 1 else t)
    pd, hc = labels == 1, labels == 0
    return (
        np.sum(pred & pd, axis=1),
        np.sum(~pred & hc, axis=1),
        np.sum(pred & hc, axis=1),
        np.sum(~pred & pd, axis=1),
    )


def _f1(tp, fp, fn):
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def roc_auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` ``(R, N)`` against ``labels`` ``(R, N)`` or ``(N,)``.

    The Mann-Whitney U of the PD scores over the HC scores divided by ``n_PD · n_HC`` (ties count one half), from
    average ranks (``scipy.stats.rankdata``). ``nan`` for a row with one class only.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    labels = np.broadcast_to(np.atleast_2d(labels), scores.shape)
    ranks = rankdata(scores, axis=1)
    pd = labels == 1
    n_pd, n_hc = pd.sum(axis=1), (labels == 0).sum(axis=1)
    u = (ranks * pd).sum(axis=1) - n_pd * (n_pd + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pd > 0) & (n_hc > 0), u / (n_pd * n_hc), np.nan)


def metric_rows(labels: np.ndarray, scores: np.ndarray, metric: str, threshold=0.5) -> np.ndarray:
    """One metric (:data:`ROW_METRICS`) of each row of ``scores`` ``(R, N)`` against ``labels`` ``(R, N)``/``(N,)``.

    ``threshold``: a number or one per row ``(R,)`` (ignored by ``roc_auc``). Returns ``(R,)``; a rate whose
    class is absent is ``nan``.
    """
    if metric not in ROW_METRICS:
        raise ValueError(f"metric must be {', '.join(ROW_METRICS[:-1])} or {ROW_METRICS[-1]}; got {metric!r}.")
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    labels = np.broadcast_to(np.atleast_2d(labels), scores.shape)
    if metric == "roc_auc":
        return roc_auc_rows(labels, scores)
    tp, tn, fp, fn = _confusion(labels, scores, threshold)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens, spec = tp / (tp + fn), tn / (tn + fp)
    if metric == "accuracy":
        return (tp + tn) / labels.shape[1]
    if metric == "sensitivity":
        return sens
    if metric == "specificity":
        return spec
    if metric == "balanced_accuracy":
        return (sens + spec) / 2
    return (_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2  # f1_macro


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """``(false positive rate, true positive rate)`` points of the ROC curve of PD ``scores`` (ties as one step).

    Written here because MONAI computes the AUC only (no curve points) and scikit-learn is not a dependency.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(1 - y)[distinct]
    n_pd, n_hc = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    return np.r_[0.0, fp / n_hc], np.r_[0.0, tp / n_pd]


def classification_report(
    y_true: Sequence[int] | np.ndarray | torch.Tensor,
    y_score: Sequence[float] | np.ndarray | torch.Tensor,
    threshold: float = 0.5,
) -> dict:
    """Compute the bundle's standard metrics from labels and PD scores.

    Args:
        y_true: ``(N,)`` integer labels, 0 = HC, 1 = PD.
        y_score: ``(N,)`` PD scores (a probability, or any score where larger means "more PD").
        threshold: a scan is predicted PD when ``y_score >= threshold``.

    Returns:
        a JSON-serialisable dict with ``accuracy``, ``sensitivity`` (PD recall), ``specificity``
        (HC recall), ``f1_macro``, ``f1_weighted`` (class-support weighted, as sklearn), ``roc_auc``
        (``None`` when only one class is present), ``confusion_matrix`` as ``[[TN, FP], [FN, TP]]``
        (rows: true HC, true PD), ``n``, ``n_pd`` and ``n_hc``.
    """
    labels = np.asarray(torch.as_tensor(y_true).detach().cpu(), dtype=np.int64).reshape(-1)
    scores = np.asarray(torch.as_tensor(y_score, dtype=torch.float64).detach().cpu()).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"y_true and y_score must have the same length, got {labels.shape} and {scores.shape}.")
    if labels.size == 0:
        raise ValueError("cannot compute classification metrics on an empty set of scans.")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (HC) or 1 (PD), got values {sorted(set(labels.tolist()))}.")
    tp, tn, fp, fn = (int(c[0]) for c in _confusion(labels[None], scores[None], threshold))
    n_pd, n_hc = tp + fn, tn + fp
    f1_pd, f1_hc = float(_f1(tp, fp, fn)), float(_f1(tn, fn, fp))
    auc = float(roc_auc_rows(labels, scores)[0]) if n_pd > 0 and n_hc > 0 else None
    return {
        "accuracy": (tp + tn) / labels.size,
        "sensitivity": tp / n_pd if n_pd else None,
        "specificity": tn / n_hc if n_hc else None,
        "f1_macro": (f1_pd + f1_hc) / 2.0,
        "f1_weighted": (f1_pd * n_pd + f1_hc * n_hc) / labels.size,
        "roc_auc": auc,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "n": int(labels.size),
        "n_pd": n_pd,
        "n_hc": n_hc,
    }


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> np.ndarray:
    """Weights (bias first) of an L2-penalised logistic regression by Newton's method (no penalty on the bias)."""
    design = np.column_stack([np.ones(len(x)), x])
    w = np.zeros(design.shape[1])
    penalty = l2 * np.r_[0.0, np.ones(x.shape[1])]
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -30, 30)))
        grad = design.T @ (p - y) + penalty * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(w.size)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def logistic_cv_scores(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, l2: float = 1.0) -> np.ndarray:
    """Out-of-fold logits of a stratified ``folds``-fold logistic regression on standardised columns of ``x``.

    L2 penalty ``l2`` on the weights (not the bias), Newton's method. Written here because scikit-learn is not a
    dependency; used by the information budget and the SBR calibration's nuisance check.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(y.size, dtype=np.int64)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        fold_of[idx] = np.arange(idx.size) % folds
    scores = np.empty(y.size)
    for k in range(folds):
        tr, te = fold_of != k, fold_of == k
        mu, sd = x[tr].mean(axis=0), x[tr].std(axis=0) + 1e-12
        w = _fit_logistic((x[tr] - mu) / sd, y[tr], l2=l2)
        scores[te] = w[0] + ((x[te] - mu) / sd) @ w[1:]
    return scores


# --------------------------------------------------------------------------------------------------------------------
# engine validation metrics: a whole validation at once, on device tensors (ignite ``EpochMetric``'s ``compute_fn``)
# --------------------------------------------------------------------------------------------------------------------
def _scores_and_labels(pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities ``(N, C)`` as float32 and integer labels ``(N,)`` of a whole validation."""
    pred = pred.float()
    if pred.ndim == 1:  # ignite's EpochMetric squeezes a single-column prediction
        pred = pred[:, None]
    return pred, label.reshape(-1).long()


def _onehot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(label, num_classes).float()


def _item(value: Any) -> float:
    """A metric's value as MONAI's metric handlers report it (first of a list, a squeezed tensor as a number)."""
    if isinstance(value, (list, tuple)):
        value = value[0]
    if isinstance(value, torch.Tensor):
        value = value.squeeze()
        return float(value.item()) if value.ndim == 0 else value
    return float(value)


def f1_macro(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Macro F1 of every prediction of a validation at once: the mean over classes of the per-class F1, as ignite's
    ``Fbeta(beta=1, average=True)`` computes it (same epsilons).

    Written with tensor operations rather than by calling ignite's metric: ``EpochMetric`` calls this on rank 0 only
    after gathering every rank's predictions, and ignite's own metrics would then wait for an all-reduce that the
    other ranks never join (a multi-GPU run hung at its first validation)."""
    pred, label = _scores_and_labels(pred, label)
    classes = torch.arange(pred.shape[1], device=pred.device)
    predicted = pred.argmax(dim=1)[:, None] == classes
    actual = label[:, None] == classes
    tp = (predicted & actual).sum(dim=0).double()
    precision = tp / (predicted.sum(dim=0).double() + 1e-20)
    recall = tp / (actual.sum(dim=0).double() + 1e-20)
    return float((2 * precision * recall / (precision + recall + 1e-15)).mean().item())


def accuracy(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Accuracy of the arg-max class over a whole validation (tensor operations; see :func:`f1_macro` for why not
    ignite's ``Accuracy``)."""
    pred, label = _scores_and_labels(pred, label)
    return float((pred.argmax(dim=1) == label).double().mean().item())


def roc_auc(pred: torch.Tensor, label: torch.Tensor) -> float:
    """ROC AUC (MONAI ``compute_roc_auc``, macro over the one-hot classes) of a whole validation.

    MONAI's functional forms, not its ``Cumulative`` metric classes: those gather every rank's buffer when they
    aggregate, and ``EpochMetric`` calls this on rank 0 only (see :func:`f1_macro`)."""
    from monai.metrics import compute_roc_auc

    pred, label = _scores_and_labels(pred, label)
    return _item(compute_roc_auc(pred, _onehot(label, pred.shape[1]), average="macro"))


def roc_auc_then_ce(pred: torch.Tensor, label: torch.Tensor) -> float:
    """ROC AUC with ties broken by the lower cross-entropy: ``auc - step / 4 * ce / (1 + ce)`` (not below 0).

    With ``step = 1 / (n_PD * n_HC)``, two ROC AUCs of this split differ by at least ``step / 2`` (a tied PD/HC
    pair counts half), and the penalty stays below ``step / 4``, so the order of two different AUCs never changes;
    among epochs of equal AUC (a saturated 1.000 on a small split) the better-calibrated one scores higher. The
    value is at most the AUC and within ``step / 4`` of it. ``pred`` holds class probabilities (the validation
    postprocessing's softmax)."""
    probs, labels = _scores_and_labels(pred, label)
    auc = roc_auc(pred, label)
    n_pd = int((labels == 1).sum())
    step = 1.0 / max(1, n_pd * (labels.numel() - n_pd))
    picked = probs.gather(1, labels[:, None]).clamp_min(1e-12)
    ce = float(-picked.log().mean())
    return max(0.0, auc - 0.25 * step * ce / (1.0 + ce))


def _confusion_metric(pred: torch.Tensor, label: torch.Tensor, name: str) -> float:
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    pred, label = _scores_and_labels(pred, label)
    onehot = _onehot(pred.argmax(dim=1), pred.shape[1])
    counts = get_confusion_matrix(onehot, _onehot(label, pred.shape[1]), include_background=False).sum(dim=0)
    return _item(compute_confusion_matrix_metric(name, counts).nanmean())


def sensitivity(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Sensitivity of the PD class (MONAI ``ConfusionMatrixMetric``, background excluded) of a whole validation."""
    return _confusion_metric(pred, label, "sensitivity")


def specificity(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Specificity of the PD class (MONAI ``ConfusionMatrixMetric``, background excluded) of a whole validation."""
    return _confusion_metric(pred, label, "specificity")
