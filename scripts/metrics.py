# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Binary PD-vs-HC classification metrics from per-scan scores, for the paths that have no engine.

The study report and the SBR threshold baseline compute their tables from saved per-scan predictions with
:func:`classification_report`. Engines (training validation, ``configs/evaluate.json``) use MONAI's and
ignite's metric handlers instead (``Fbeta``, ``Accuracy``, ``ROCAUC``, ``ConfusionMatrix``); the tests check that
both give the same numbers.

Label convention everywhere: ``0 = HC`` (healthy control), ``1 = PD`` (Parkinson's disease, the positive
class). Sensitivity is PD recall, specificity is HC recall.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc

__all__ = ["classification_report", "METRIC_NAMES"]

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "f1_macro", "f1_weighted", "roc_auc")


def _f1(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 2.0 * tp / denom if denom > 0 else 0.0


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
    pred = (scores >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    n_pd, n_hc = tp + fn, tn + fp
    f1_pd, f1_hc = _f1(tp, fp, fn), _f1(tn, fn, fp)
    auc = None
    if n_pd > 0 and n_hc > 0:
        auc = float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(labels)))
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
