# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Binary PD-vs-HC classification metrics from per-scan scores, for the paths that have no engine.

One family of functions, used by every such path: :func:`classification_report` (the study's cells, the SBR
baseline), :func:`metric_rows` (one metric of many score rows at once: the study's bootstrap intervals, operating
points), :func:`roc_auc_rows` and :func:`roc_curve` (the study's figures, the information budget) and
:func:`logistic_cv_scores` (out-of-fold scores of a logistic regression: the information budget, the SBR
calibration's nuisance check). Engines (training validation,
``configs/evaluate.json``) use MONAI's and ignite's metric handlers instead (``Fbeta``, ``Accuracy``, ``ROCAUC``,
``ConfusionMatrix``); the tests check that both give the same numbers, and that :func:`roc_auc_rows` (the
Mann-Whitney statistic from ``scipy.stats.rankdata``, vectorised over rows) equals MONAI's ``compute_roc_auc``.

Label convention everywhere: ``0 = HC`` (healthy control), ``1 = PD`` (Parkinson's disease, the positive
class). Sensitivity is PD recall, specificity is HC recall. A scan is predicted PD when ``score >= threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence

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
]

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "f1_macro", "f1_weighted", "roc_auc")
ROW_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1_macro")
"""The metrics :func:`metric_rows` computes."""


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
