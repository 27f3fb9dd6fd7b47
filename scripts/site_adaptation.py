# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Label-free adaptation of the operating point to a new site (another camera, tracer or referral mix).

A model applied unchanged at another site usually keeps its ranking (ROC AUC) but not its decision: its scores
move, so the in-domain threshold calls too few (or too many) scans PD. The methods below re-derive the operating
point from the site's own *unlabelled* scans; none of them needs a label or the site's PD share.

Score methods (they read the site's ``P(PD)`` scores only):

``em``
    EM re-estimation of the class prior (Saerens, Latinne & Decaestecker 2002). The model's posteriors are first
    calibrated on its in-domain validation scores (Platt scaling; the scores are recorded in the checkpoint), then
    the site's prior is iterated to its maximum-likelihood value. The estimated PD share ``π̂`` sets the threshold:
    the top ``π̂`` of the site's scans are called PD (:func:`scripts.study.operating.prevalence_threshold`).
``bbse``
    Black-box shift estimation (Lipton, Wang & Smola 2018): the share of scans the model calls PD at its in-domain
    threshold, corrected by the in-domain validation confusion matrix (``π̂ = (r - FPR) / (TPR - FPR)``); the
    threshold is then set from ``π̂`` as for ``em``.
``mixture``
    A two-component Gaussian mixture with a shared variance fitted to the site's logits ``log(p / (1 - p))``. The
    threshold is where the two components' posteriors cross with equal class weights (the likelihood-ratio-one
    point, the Youden-optimal threshold of two Gaussians, matching the in-domain Youden operating point; with a
    shared variance, the midpoint of the two means); ``π̂`` is the weight of the upper component. Refused when the
    logits do not form two separated groups. The shared variance was chosen on development sites (other subjects
    than the study's external sets): PD logits have a long tail towards HC (mild and unilateral PD), which a
    narrow free-variance PD component leaves to the HC component, moving the crossing into the PD group.

Feature method (it re-runs the network):

``adabn``
    AdaBN (Li et al. 2016): the batch-norm layers' running means and variances are re-estimated on the site's
    scans (weights untouched), then the scans are scored with the in-domain threshold. It can be combined with a
    score method: ``adabn+em``, ``adabn+bbse``, ``adabn+mixture``.

Each method returns what it estimated (the site's PD share, the threshold on ``P(PD)``) and refuses with a
:class:`SiteAdaptationRefusedError` (one line saying why) when the site's sample is too small or its scores are not
separable enough to fit. On the command line (``configs/inference.json``, ``--site_adaptation``) a refusal ends
the run with exit status :data:`EXIT_REFUSED` after the unadapted predictions are written.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import norm
from scripts.errors import InputError
from scripts.metrics import roc_auc_rows
from torch import nn

__all__ = [
    "SCORE_METHODS",
    "EXIT_REFUSED",
    "MIN_SCANS",
    "SiteAdaptationRefusedError",
    "SourceScores",
    "parse_methods",
    "em_prior",
    "bbse_prior",
    "fit_mixture",
    "adapt_scores",
    "adapt_batchnorm",
]

logger = logging.getLogger(__name__)

SCORE_METHODS = ("none", "em", "bbse", "mixture")
"""Methods that re-derive the threshold from the site's scores (``none`` keeps the in-domain threshold)."""
EXIT_REFUSED = 3
"""Exit status of ``python -m monai.bundle run`` when the site adaptation was refused (the predictions are kept)."""
MIN_SCANS = 40
"""Default minimum number of a site's scans below which every method refuses (see ``docs/new_site.md``)."""
_LOW, _HIGH = 1e-30, 2.0**-24


class SiteAdaptationRefusedError(InputError):
    """The site's scans do not allow the requested adaptation (too few, or scores not separable)."""


def parse_methods(spec: str) -> tuple[bool, str]:
    """``(adabn, score method)`` of a ``--site_adaptation`` value: ``none``, ``em``, ``bbse``, ``mixture``,
    ``adabn`` or ``adabn+<score method>``.

    Raises:
        InputError: for any other value, listing the valid ones.
    """
    parts = [p.strip().lower() for p in str(spec).split("+") if p.strip()]
    adabn = "adabn" in parts
    rest = [p for p in parts if p != "adabn"]
    valid = ", ".join(["none", "adabn", *SCORE_METHODS[1:], *(f"adabn+{m}" for m in SCORE_METHODS[1:])])
    if not parts or len(rest) > 1 or parts.count("adabn") > 1 or (rest and rest[0] not in SCORE_METHODS):
        raise InputError(f"--site_adaptation {spec!r} is not a method; valid: {valid}.")
    method = rest[0] if rest else "none"
    if adabn and method == "none" and "none" in parts:
        raise InputError(f"--site_adaptation {spec!r} is not a method; valid: {valid}.")
    return adabn, method


def _scores(scores: Sequence[float], what: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(s > 1):
        raise SiteAdaptationRefusedError(f"{what} must be probabilities P(PD) in [0, 1].")
    return s


def _logit(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` within what a float32 softmax resolves: ``p`` down to 1e-30 (a confident HC keeps its
    margin), ``1 - p`` down to 2**-24 (float32 resolution near 1)."""
    p = np.clip(p, _LOW, 1.0 - _HIGH)
    return np.log(p) - np.log1p(-p)


def _check_size(n: int, min_scans: int, method: str) -> None:
    if n < min_scans:
        raise SiteAdaptationRefusedError(
            f"{method}: the site has {n} scored scans, at least {min_scans} are needed to estimate its operating "
            "point; score more of the site's scans or keep the in-domain threshold (--site_adaptation none)."
        )


@dataclass
class SourceScores:
    """The in-domain validation scores recorded with a checkpoint: what ``em`` and ``bbse`` calibrate on.

    Attributes:
        scores: validation ``P(PD)`` per scan.
        labels: validation labels (1 = PD).
        threshold: the in-domain operating point on ``P(PD)`` (Youden's J on the validation scores).
    """

    scores: np.ndarray
    labels: np.ndarray
    threshold: float

    @classmethod
    def from_arrays(cls, scores: Sequence[float], labels: Sequence[int], threshold: float | None = None):
        from scripts.study.operating import youden_threshold

        s = _scores(scores, "validation scores")
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        if s.size != y.size or s.size == 0 or not np.isin(y, (0, 1)).all():
            raise InputError("validation scores and labels must be non-empty, of equal length, labels 0/1.")
        if y.min() == y.max():
            raise SiteAdaptationRefusedError("the recorded validation scores hold one class only; cannot calibrate.")
        t = youden_threshold(y, s) if threshold is None else float(threshold)
        return cls(scores=s, labels=y, threshold=t)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> SourceScores | None:
        """The validation scores recorded in ``path`` (see :class:`scripts.checkpoints.DescribedModel`), or
        ``None`` for a checkpoint saved without them."""
        from scripts.checkpoints import read_checkpoint

        _, info = read_checkpoint(path)
        validation = (info or {}).get("validation") or {}
        scores, labels = validation.get("pd_scores"), validation.get("labels")
        if not scores or not labels:
            return None
        return cls.from_arrays(scores, labels)

    @property
    def prior(self) -> float:
        return float(self.labels.mean())

    @property
    def auc(self) -> float:
        return float(roc_auc_rows(self.labels, self.scores)[0])


def _platt(scores: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iterations: int = 100) -> tuple[float, float]:
    """Logistic regression of ``labels`` on the logit of ``scores`` (Newton's method, a small ridge): ``(a, b)``
    with calibrated ``P(PD) = sigmoid(a · logit(p) + b)`` under the validation prior."""
    z = _logit(scores)
    scale = max(float(np.std(z)), 1e-3)
    x = np.stack([z / scale, np.ones_like(z)], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = expit(x @ w)
        grad = x.T @ (p - labels) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0] / scale), float(w[1])


def em_prior(
    scores: Sequence[float], source: SourceScores, min_scans: int = MIN_SCANS, tol: float = 1e-8, max_iter: int = 10_000
) -> dict[str, Any]:
    """Maximum-likelihood PD share of a site (Saerens et al. 2002) from its ``P(PD)`` scores ``(N,)``.

    The posteriors are calibrated on ``source`` (Platt scaling on the validation logits, so they are posteriors
    under the validation prior ``π_s``), then ``π`` is iterated: ``q_i ∝ (π/π_s)·p_i`` against
    ``((1-π)/(1-π_s))·(1-p_i)``, ``π ← mean(q_i)``.

    Returns:
        ``{"pd_share", "iterations", "converged", "calibration": {"a", "b"}, "source_prior"}``.

    Raises:
        SiteAdaptationRefusedError: too few scans, or the calibration finds no ranking in the validation scores.
    """
    s = _scores(scores, "site scores")
    _check_size(s.size, min_scans, "em")
    if source.auc < 0.75:
        raise SiteAdaptationRefusedError(
            f"em: the model's validation scores barely separate the classes (ROC AUC {source.auc:.2f} < 0.75); "
            "its posteriors cannot be calibrated."
        )
    a, b = _platt(source.scores, source.labels)
    if a <= 0:
        raise SiteAdaptationRefusedError("em: the calibration of the validation scores has a non-positive slope.")
    p = expit(a * _logit(s) + b)
    prior_s = source.prior
    pi, converged, iterations = prior_s, False, 0
    while iterations < max_iter:
        iterations += 1
        num = (pi / prior_s) * p
        q = num / (num + ((1 - pi) / (1 - prior_s)) * (1 - p))
        new = float(q.mean())
        if abs(new - pi) < tol:
            pi, converged = new, True
            break
        pi = new
    return {
        "pd_share": pi,
        "iterations": iterations,
        "converged": converged,
        "calibration": {"a": a, "b": b},
        "source_prior": prior_s,
    }


def bbse_prior(scores: Sequence[float], source: SourceScores, min_scans: int = MIN_SCANS) -> dict[str, Any]:
    """Black-box shift estimate of a site's PD share (Lipton et al. 2018) from its ``P(PD)`` scores ``(N,)``.

    With the model's hard decisions at the in-domain threshold, the validation confusion matrix gives
    ``TPR`` and ``FPR``; the share called PD at the site, ``r``, estimates ``π̂ = (r - FPR) / (TPR - FPR)``
    (clipped to [0, 1]).

    Returns:
        ``{"pd_share", "called_pd", "tpr", "fpr", "clipped"}``.

    Raises:
        SiteAdaptationRefusedError: too few scans, or a confusion matrix too close to singular (``TPR - FPR < 0.5``).
    """
    s = _scores(scores, "site scores")
    _check_size(s.size, min_scans, "bbse")
    called = source.scores >= source.threshold
    tpr = float(called[source.labels == 1].mean())
    fpr = float(called[source.labels == 0].mean())
    if tpr - fpr < 0.5:
        raise SiteAdaptationRefusedError(
            f"bbse: the validation confusion matrix is nearly singular (TPR {tpr:.2f} - FPR {fpr:.2f} < 0.5)."
        )
    r = float((s >= source.threshold).mean())
    raw = (r - fpr) / (tpr - fpr)
    return {
        "pd_share": float(min(1.0, max(0.0, raw))),
        "called_pd": r,
        "tpr": tpr,
        "fpr": fpr,
        "clipped": raw != min(1.0, max(0.0, raw)),
    }


def _crossing(m0: float, s0: float, m1: float, s1: float, w0: float = 0.5, w1: float = 0.5) -> float:
    """The point between ``m0 < m1`` where ``w0·N(m0, s0)`` and ``w1·N(m1, s1)`` are equal (the midpoint of the
    means when no crossing lies between them)."""
    a = 1 / (2 * s1**2) - 1 / (2 * s0**2)
    b = m0 / s0**2 - m1 / s1**2
    c = m1**2 / (2 * s1**2) - m0**2 / (2 * s0**2) - math.log((w1 * s0) / (w0 * s1))
    if abs(a) < 1e-12:
        roots = [-c / b] if abs(b) > 1e-12 else []
    else:
        disc = b * b - 4 * a * c
        roots = [] if disc < 0 else [(-b + sgn * math.sqrt(disc)) / (2 * a) for sgn in (1, -1)]
    inside = [r for r in roots if m0 <= r <= m1]
    return float(inside[0]) if inside else float((m0 + m1) / 2)


def fit_mixture(
    scores: Sequence[float],
    min_scans: int = MIN_SCANS,
    min_separation: float = 2.0,
    min_weight: float = 0.05,
    max_iter: int = 500,
) -> dict[str, Any]:
    """Two-component Gaussian mixture with one shared variance on the logits of a site's ``P(PD)`` scores ``(N,)``.

    Fitted by EM (initial means at the 25th and 75th percentiles). The threshold is the logit where the two
    components' densities cross between their means (equal class weights: the likelihood-ratio-one point, which
    for two Gaussians is the Youden-optimal threshold); ``bayes_threshold`` is the crossing with the fitted
    weights (the minimum-error threshold at the estimated share), recorded for information.

    Args:
        scores: the site's ``P(PD)`` per scan.
        min_scans: fewer scans are refused.
        min_separation: smallest Ashman's ``D`` accepted.
        min_weight: smallest component weight accepted.
        max_iter: EM iterations at most.

    Returns:
        ``{"pd_share", "threshold", "logit_threshold", "bayes_threshold", "means", "sds", "weights",
        "separation", "bic_gain"}`` (thresholds on ``P(PD)`` unless named ``logit_``).

    Raises:
        SiteAdaptationRefusedError: too few scans; or the logits are not two separated groups: Ashman's
            ``D = √2·|μ1 - μ0| / √(σ0² + σ1²)`` below ``min_separation``, a component weight below
            ``min_weight``, or one Gaussian fitting as well (BIC).
    """
    s = _scores(scores, "site scores")
    _check_size(s.size, min_scans, "mixture")
    z = _logit(s)
    sd_all = float(np.std(z))
    if sd_all < 1e-6:
        raise SiteAdaptationRefusedError("mixture: every site scan has the same score; nothing to separate.")
    floor = max(0.25, 0.05 * sd_all)
    means = np.percentile(z, [25, 75]).astype(np.float64)
    if means[1] - means[0] < 1e-6:
        means = np.array([z.min(), z.max()], dtype=np.float64)
    sds = np.full(2, max(sd_all / 2, floor))
    weights = np.array([0.5, 0.5])
    loglik = -np.inf
    for _ in range(max_iter):
        dens = np.stack([w * norm.pdf(z, m, sd) for w, m, sd in zip(weights, means, sds)], axis=1) + 1e-300
        total = dens.sum(axis=1, keepdims=True)
        resp = dens / total
        nk = resp.sum(axis=0) + 1e-12
        weights = nk / z.size
        means = (resp * z[:, None]).sum(axis=0) / nk
        sq = (resp * (z[:, None] - means) ** 2).sum(axis=0)
        sds = np.full(2, max(math.sqrt(sq.sum() / z.size), floor))
        new = float(np.log(total).sum())
        if abs(new - loglik) < 1e-9 * max(1.0, abs(new)):
            loglik = new
            break
        loglik = new
    order = np.argsort(means)
    means, sds, weights = means[order], sds[order], weights[order]
    loglik1 = float(np.log(norm.pdf(z, float(z.mean()), max(sd_all, floor)) + 1e-300).sum())
    bic_gain = (2 * math.log(z.size) - 2 * loglik1) - (5 * math.log(z.size) - 2 * loglik)  # BIC(1) - BIC(2)
    separation = float(math.sqrt(2) * (means[1] - means[0]) / math.sqrt(sds[0] ** 2 + sds[1] ** 2))
    fit = {
        "means": means.tolist(),
        "sds": sds.tolist(),
        "weights": weights.tolist(),
        "separation": separation,
        "bic_gain": float(bic_gain),
    }
    if bic_gain <= 0 or separation < min_separation or weights.min() < min_weight:
        if bic_gain <= 0:
            why = "one Gaussian fits the logits as well as two"
        elif separation < min_separation:
            why = f"separation D = {separation:.2f} < {min_separation:g}"
        else:
            why = f"a component holds only {weights.min():.0%} of the scans (< {min_weight:.0%})"
        raise SiteAdaptationRefusedError(
            f"mixture: the site's scores do not form two separated groups ({why}); the threshold cannot be fitted."
        )
    t = _crossing(means[0], sds[0], means[1], sds[1])
    t_bayes = _crossing(means[0], sds[0], means[1], sds[1], weights[0], weights[1])
    return {
        "pd_share": float(weights[1]),
        "threshold": float(expit(t)),
        "logit_threshold": t,
        "bayes_threshold": float(expit(t_bayes)),
        **fit,
    }


def adapt_scores(
    method: str,
    scores: Sequence[float],
    source: SourceScores | None,
    in_domain_threshold: float | None = None,
    min_scans: int = MIN_SCANS,
) -> dict[str, Any]:
    """The operating point of a site by ``method`` (one of :data:`SCORE_METHODS`) from its ``P(PD)`` scores.

    Args:
        method: ``none`` (the in-domain threshold), ``em``, ``bbse`` or ``mixture``.
        scores: the site's ``P(PD)`` per scan ``(N,)``.
        source: the model's validation scores (needed by ``em`` and ``bbse``).
        in_domain_threshold: the threshold of ``none``; defaults to ``source.threshold``, else 0.5.
        min_scans: below this many scans every method but ``none`` refuses.

    Returns:
        ``{"method", "threshold", "pd_share" (estimated; ``None`` for ``none``), "called_pd", "n_scans",
        "details"}``.

    Raises:
        SiteAdaptationRefusedError: the method cannot be applied to these scans (the message says why).
    """
    from scripts.study.operating import prevalence_threshold

    s = _scores(scores, "site scores")
    if method not in SCORE_METHODS:
        raise InputError(f"unknown score method {method!r}; valid: {', '.join(SCORE_METHODS)}.")
    if in_domain_threshold is None:
        in_domain_threshold = source.threshold if source is not None else 0.5
    if method in ("em", "bbse") and source is None:
        raise SiteAdaptationRefusedError(
            f"{method}: the checkpoint holds no validation scores to calibrate on (it predates their recording); "
            "retrain it with this bundle, or use --site_adaptation mixture."
        )
    details: dict[str, Any] = {}
    if method == "none":
        threshold, share = float(in_domain_threshold), None
    elif method == "mixture":
        details = fit_mixture(s, min_scans=min_scans)
        threshold, share = details.pop("threshold"), details.pop("pd_share")
    else:
        details = em_prior(s, source, min_scans=min_scans) if method == "em" else bbse_prior(s, source, min_scans)
        share = details.pop("pd_share")
        threshold = prevalence_threshold(s, share)
    return {
        "method": method,
        "threshold": float(threshold),
        "pd_share": None if share is None else float(share),
        "called_pd": float((s >= threshold).mean()) if s.size else 0.0,
        "n_scans": int(s.size),
        "details": details,
    }


# ----------------------------------------------------------------------------------------------------------------
# AdaBN
# ----------------------------------------------------------------------------------------------------------------
_BN = (nn.modules.batchnorm._BatchNorm,)


@torch.no_grad()
def adapt_batchnorm(network: nn.Module, batches: Iterable[torch.Tensor], min_scans: int = MIN_SCANS) -> int:
    """AdaBN: replace the running mean and variance of every batch-norm layer of ``network`` by the statistics of
    the site's inputs ``batches`` (cumulative average over all batches); weights and every other buffer are left
    untouched, and the network ends in eval mode. Returns the number of inputs seen.

    Raises:
        SiteAdaptationRefusedError: fewer than ``min_scans`` inputs, or a network without batch-norm layers.
    """
    layers = [m for m in network.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not layers:
        raise SiteAdaptationRefusedError("adabn: the network has no batch-norm layer to adapt.")
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers}
    momenta = {m: m.momentum for m in layers}
    network.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    seen = 0
    try:
        for x in batches:
            if x.shape[0] < 2:  # a single scan gives no variance; it is still scored later
                continue
            network(x)
            seen += int(x.shape[0])
    finally:
        for m in layers:
            m.momentum = momenta[m]
            m.eval()
    if seen < min_scans:
        for m, (mean, var, n) in saved.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
        raise SiteAdaptationRefusedError(
            f"adabn: {seen} of the site's scans could be used to re-estimate the batch-norm statistics, at least "
            f"{min_scans} are needed."
        )
    return seen
