# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Operating points: the PD-score threshold at which a model's sensitivity and specificity are read.

Every model of the study outputs a PD score per scan (the softmax P(PD) of a network, ``-SBR`` of the SBR
baseline). The study reads each model at three thresholds:

``default``
    the model's own decision rule: ``P(PD) >= 0.5`` (the argmax that ``configs/inference.json`` reports) for the
    networks; the Youden threshold fitted on the training split for the SBR baseline; "PD" for always-PD.
``validation`` (the in-domain operating point of the tables)
    the threshold that maximises Youden's ``J = sensitivity + specificity - 1`` on the in-domain *validation*
    split (:func:`youden_threshold`); never tuned on a test split. On an imbalanced set (80 % PD) a network's
    argmax tends to favour the majority class; Youden's J weighs both classes equally.
``recalibrated`` (label-free, for a new site)
    the threshold at which the share of the new site's scans called PD equals an assumed PD prevalence ``π`` of
    that site (:func:`prevalence_threshold`): the ``1 - π`` quantile of the site's own scores. It needs the
    site's scans but none of its labels; ``π`` defaults to the PD share of the development data (training and
    validation) and should be set from the site's referral mix when it is known (``--prevalence NAME=π``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scripts.metrics import metric_rows

__all__ = ["OPERATING_POINTS", "youden_threshold", "prevalence_threshold", "maximin_point"]

OPERATING_POINTS = ("default", "validation", "recalibrated")
"""Names of the operating points (see the module docstring)."""


def _arrays(labels: Sequence[int] | None, scores: Sequence[float]) -> tuple[np.ndarray | None, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("an operating point needs at least one score.")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite.")
    if labels is None:
        return None, s
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (HC) or 1 (PD), got {sorted(set(y.tolist()))}.")
    return y, s


def _candidates(s: np.ndarray) -> np.ndarray:
    """Thresholds between consecutive distinct scores, plus one below the lowest and one above the highest."""
    u = np.unique(s)
    mids = (u[:-1] + u[1:]) / 2.0
    pad = max(1e-6, 1e-6 * float(np.abs(u).max()))
    return np.concatenate([[u[0] - pad], mids, [u[-1] + pad]])


def youden_threshold(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Threshold maximising Youden's J on ``(labels (N,), scores (N,))``; a scan is PD when ``score >= t``.

    Candidates are the midpoints between consecutive distinct scores (and one beyond each end). Among equally
    good candidates the middle one of the first run of consecutive optima is taken, so a perfectly separated
    set gets the midpoint between its highest HC and its lowest PD score.

    Raises:
        ValueError: when one class is absent (J is undefined).
    """
    y, s = _arrays(labels, scores)
    n_pd, n_hc = int(y.sum()), int((1 - y).sum())
    if n_pd == 0 or n_hc == 0:
        raise ValueError(f"Youden's J needs both classes, got {n_pd} PD and {n_hc} HC scans.")
    cands = _candidates(s)
    rows = np.broadcast_to(s, (cands.size, s.size))
    j = 2.0 * metric_rows(y, rows, "balanced_accuracy", cands) - 1.0  # sensitivity + specificity - 1
    best = np.flatnonzero(np.isclose(j, j.max()))
    run = best[: 1 + int(np.argmax(np.diff(np.r_[best, best[-1] + 2]) != 1))]
    return float(cands[run[len(run) // 2]])


def prevalence_threshold(scores: Sequence[float], prevalence: float) -> float:
    """Label-free threshold calling the top ``round(prevalence · N)`` of ``scores`` ``(N,)`` PD.

    The threshold lies halfway between the lowest score called PD and the highest score called HC (scans with
    tied scores fall on the same side, so the realised share can differ from ``prevalence`` when scores tie).
    """
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence must be in [0, 1], got {prevalence}.")
    _, s = _arrays(None, scores)
    ordered = np.sort(s)[::-1]
    k = int(round(prevalence * s.size))
    pad = max(1e-6, 1e-6 * float(np.abs(s).max()))
    if k <= 0:
        return float(ordered[0] + pad)
    if k >= s.size:
        return float(ordered[-1] - pad)
    return float((ordered[k - 1] + ordered[k]) / 2.0)


def maximin_point(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float, float]:
    """``(threshold, sensitivity, specificity)`` of the threshold with the highest ``min(sensitivity,
    specificity)`` on ``(labels (N,), scores (N,))``, chosen *with* the labels.

    Not an operating point to use: it is the ceiling that no threshold chosen without labels can exceed on these
    scans (the site-adaptation tables report it beside the label-free methods). Ties: the first best candidate.

    Raises:
        ValueError: when one class is absent.
    """
    y, s = _arrays(labels, scores)
    if y.all() or not y.any():
        raise ValueError("the best balanced threshold needs both PD and HC scans.")
    cands = _candidates(s)
    rows = np.broadcast_to(s, (cands.size, s.size))
    sens = metric_rows(y, rows, "sensitivity", cands)
    spec = metric_rows(y, rows, "specificity", cands)
    best = int(np.argmax(np.minimum(sens, spec)))
    return float(cands[best]), float(sens[best]), float(spec[best])
