# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Striatal binding ratios (SBR) and the lowest-putamen SBR threshold baseline.

For every region ``r`` of the analytic template (:mod:`scripts.anatomy`) evaluated on the image's own grid,

    SBR_r = mean(volume[r]) / mean(volume[occipital]) - 1

for ``caudate_L/R``, ``putamen_L/R``, ``putamen_ant_L/R`` and ``putamen_post_L/R``. Derived features:

* ``lowest_putamen = min(SBR_putamen_L, SBR_putamen_R)``;
* ``mean_striatum``: the mean of the four caudate/putamen SBRs;
* ``putamen_ai``: asymmetry index ``AI = 200 |L - R| / (L + R)`` in per cent (the clinical convention; it
  equals 100 |L - R| / mean(L, R));
* ``caudate_putamen_ratio``: ``(SBR_caudate_L + SBR_caudate_R) / (SBR_putamen_L + SBR_putamen_R)``.

The baseline classifier thresholds the lowest putamen SBR (PD when it is low), with the threshold chosen by
Youden's J on a training split; it is the "DaTQUANT-like" reference the CNNs are compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scripts.anatomy import ROI_NAMES, template_rois

if TYPE_CHECKING:
    import torch

__all__ = [
    "SBR_REGIONS",
    "SBR_FEATURES",
    "compute_sbr",
    "load_volume",
    "sbr_from_file",
    "asymmetry_index",
    "SBRThresholdClassifier",
    "datalist_sbr",
    "evaluate_sbr_baseline",
    "summarize_features",
    "summarize_sbr",
    "main",
]

#: Regions with an SBR value.
SBR_REGIONS: tuple[str, ...] = tuple(name for name in ROI_NAMES if name not in ("striatum", "occipital", "brain"))
#: All keys returned by :func:`compute_sbr`.
SBR_FEATURES: tuple[str, ...] = SBR_REGIONS + ("lowest_putamen", "mean_striatum", "putamen_ai", "caudate_putamen_ratio")


def asymmetry_index(left: float | np.ndarray, right: float | np.ndarray) -> float | np.ndarray:
    """Asymmetry index in per cent, ``AI = 200 |L - R| / (L + R)`` (0 when ``L + R == 0``)."""
    left_a, right_a = np.asarray(left, dtype=np.float64), np.asarray(right, dtype=np.float64)
    total = left_a + right_a
    out = np.where(total != 0, 200.0 * np.abs(left_a - right_a) / np.where(total != 0, total, 1.0), 0.0)
    return float(out) if out.ndim == 0 else out


def _to_numpy(x: Any) -> np.ndarray:
    # torch tensors / MetaTensors are converted without importing torch here, which keeps this module light for
    # worker processes that only need numpy.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _classification_report(*args, **kwargs) -> dict:
    from scripts.metrics import classification_report

    return classification_report(*args, **kwargs)


def _as_volume(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    vol = _to_numpy(volume)
    if vol.ndim == 4 and vol.shape[0] == 1:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z) or channel-first (1, X, Y, Z), got shape {tuple(vol.shape)}.")
    return vol.astype(np.float64, copy=False)


def compute_sbr(volume: np.ndarray | torch.Tensor, affine: np.ndarray | torch.Tensor) -> dict[str, float]:
    """SBR features of one volume, using the template ROIs evaluated on the volume's grid (cached per grid).

    Args:
        volume: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` numpy array or torch tensor (a MetaTensor works too).
        affine: ``(4, 4)`` voxel -> world (MNI mm) affine of ``volume``.

    Returns:
        ``{feature: float}`` for every name in :data:`SBR_FEATURES` (see the module docstring for formulas).

    Raises:
        ValueError: when an ROI holds no voxel on this grid or the occipital mean is not positive.
    """
    vol = _as_volume(volume)
    aff = _to_numpy(affine).astype(np.float64)
    rois = template_rois(vol.shape, aff)
    occ = rois["occipital"]
    if not occ.any():
        raise ValueError(f"the occipital reference region has no voxel on this grid (shape {vol.shape}).")
    ref = float(vol[occ].mean())
    if not ref > 0:
        raise ValueError(f"the occipital reference mean must be positive, got {ref}.")
    out: dict[str, float] = {}
    for name in SBR_REGIONS:
        mask = rois[name]
        if not mask.any():
            raise ValueError(f"ROI {name} has no voxel on this grid (shape {vol.shape}); is the affine in MNI mm?")
        out[name] = float(vol[mask].mean()) / ref - 1.0
    put_l, put_r = out["putamen_L"], out["putamen_R"]
    out["lowest_putamen"] = min(put_l, put_r)
    out["mean_striatum"] = (out["caudate_L"] + out["caudate_R"] + put_l + put_r) / 4.0
    out["putamen_ai"] = float(asymmetry_index(put_l, put_r))
    put_sum = put_l + put_r
    out["caudate_putamen_ratio"] = (out["caudate_L"] + out["caudate_R"]) / put_sum if put_sum != 0 else float("nan")
    return out


def load_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file: ``(volume (X, Y, Z) float32, affine (4, 4))``; errors name the file."""
    import nibabel as nib

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        img = nib.load(str(p))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises several unrelated types for damaged files
        raise ValueError(f"cannot read image {p}: {err}") from err
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"image {p} must be a 3-D volume, got shape {data.shape}.")
    return data, np.asarray(img.affine, dtype=np.float64)


def sbr_from_file(path: str | os.PathLike) -> dict[str, float]:
    """:func:`compute_sbr` of a NIfTI file, using the file's own affine."""
    volume, affine = load_volume(path)
    return compute_sbr(volume, affine)


class SBRThresholdClassifier:
    """PD-vs-HC classifier on the lowest putamen SBR: PD when ``SBR <= threshold``.

    ``pd_score(sbr) = -sbr`` (larger = more PD), so the decision is ``pd_score >= -threshold``. :meth:`fit` picks
    the threshold maximising Youden's ``J = sensitivity + specificity - 1`` over the midpoints between
    consecutive distinct training values (ties broken towards the midpoint of the best plateau).
    """

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = None if threshold is None else float(threshold)

    @staticmethod
    def _check(values: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray | None = None):
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise ValueError("SBR values must be finite.")
        if labels is None:
            return x, None
        y = np.asarray(labels).reshape(-1)
        if y.shape != x.shape:
            raise ValueError(f"values and labels must have the same length, got {x.shape[0]} and {y.shape[0]}.")
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 0 (HC) or 1 (PD), got values {sorted(set(y.tolist()))}.")
        return x, y.astype(np.int64)

    def fit(self, lowest_putamen_sbr: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray):
        """Choose the threshold by Youden's J on ``(lowest_putamen_sbr (N,), labels (N,))``; returns ``self``."""
        x, y = self._check(lowest_putamen_sbr, labels)
        n_pd, n_hc = int(y.sum()), int((1 - y).sum())
        if n_pd == 0 or n_hc == 0:
            raise ValueError(f"fitting the SBR threshold needs both classes, got {n_pd} PD and {n_hc} HC scans.")
        uniq = np.unique(x)
        cands = (uniq[:-1] + uniq[1:]) / 2.0 if uniq.size > 1 else uniq.copy()
        cands = np.concatenate([[uniq[0] - 1e-6], cands, [uniq[-1] + 1e-6]])
        sens = (x[None, y == 1] <= cands[:, None]).sum(axis=1) / n_pd
        spec = (x[None, y == 0] > cands[:, None]).sum(axis=1) / n_hc
        j = sens + spec - 1.0
        best = np.flatnonzero(np.isclose(j, j.max()))
        # Among equally good thresholds, take the middle of the first run of consecutive optima.
        run = best[: 1 + int(np.argmax(np.diff(np.r_[best, best[-1] + 2]) != 1))]
        self.threshold = float(cands[run[len(run) // 2]])
        return self

    def pd_score(self, lowest_putamen_sbr: Sequence[float] | np.ndarray) -> np.ndarray:
        """``(N,)`` PD scores ``-SBR`` (larger = more PD)."""
        x, _ = self._check(lowest_putamen_sbr)
        return -x

    def predict(self, lowest_putamen_sbr: Sequence[float] | np.ndarray) -> np.ndarray:
        """``(N,)`` int labels: 1 (PD) when ``SBR <= threshold``, else 0 (HC)."""
        if self.threshold is None:
            raise RuntimeError("SBRThresholdClassifier has no threshold: call fit() or pass threshold=.")
        x, _ = self._check(lowest_putamen_sbr)
        return (x <= self.threshold).astype(np.int64)

    def report(self, lowest_putamen_sbr: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> dict:
        """:func:`scripts.metrics.classification_report` of the thresholded scores."""
        if self.threshold is None:
            raise RuntimeError("SBRThresholdClassifier has no threshold: call fit() or pass threshold=.")
        x, y = self._check(lowest_putamen_sbr, labels)
        return _classification_report(y, self.pd_score(x), threshold=-self.threshold)


def datalist_sbr(datalist_file: str | os.PathLike, split: str) -> tuple[list[dict], list[dict[str, float]]]:
    """``(entries, SBR features)`` of every item of ``split`` in a datalist (image paths relative to its folder)."""
    from scripts.data import load_datalist  # lazy: keeps this module light for worker processes

    entries = load_datalist(datalist_file, split)
    return entries, [sbr_from_file(entry["image"]) for entry in entries]


def evaluate_sbr_baseline(
    datalist_file: str | os.PathLike,
    fit_split: str = "training",
    eval_split: str = "test",
    fit_datalist: str | os.PathLike | None = None,
) -> dict:
    """Fit the lowest-putamen threshold on ``fit_split`` and evaluate it on ``eval_split``.

    Args:
        datalist_file: the datalist whose ``eval_split`` is evaluated.
        fit_split: the list the threshold is fitted on.
        eval_split: the list it is evaluated on.
        fit_datalist: the datalist holding ``fit_split``; default ``datalist_file``. Use it to score an external
            test set (e.g. one whose scans are all in ``test``) with the threshold of another set's training split.

    Returns:
        ``{"method", "threshold", "fit_datalist", "fit_split", "eval_split", "metrics"}`` where ``metrics`` is
        :func:`scripts.metrics.classification_report` on ``eval_split`` (``roc_auc`` is threshold-free).
    """
    fit_file = datalist_file if fit_datalist is None else fit_datalist
    same = fit_datalist is None or pathlib.Path(fit_datalist).resolve() == pathlib.Path(datalist_file).resolve()
    listed = (
        json.loads(pathlib.Path(fit_file).read_text(encoding="utf-8")).get(fit_split)
        if pathlib.Path(fit_file).is_file()
        else None
    )
    if listed == []:
        raise ValueError(
            f"the {fit_split!r} list of {fit_file} is empty, so no threshold can be fitted on it; fit on another "
            "data set's training split with fit_datalist (CLI: --fit-datalist)."
        )
    fit_entries, fit_feats = datalist_sbr(fit_file, fit_split)
    eval_entries, eval_feats = (
        (fit_entries, fit_feats) if same and eval_split == fit_split else datalist_sbr(datalist_file, eval_split)
    )
    clf = SBRThresholdClassifier().fit([f["lowest_putamen"] for f in fit_feats], [e["label"] for e in fit_entries])
    metrics = clf.report([f["lowest_putamen"] for f in eval_feats], [e["label"] for e in eval_entries])
    return {
        "method": "lowest putamen SBR threshold (Youden's J)",
        "threshold": clf.threshold,
        "fit_datalist": str(fit_file),
        "fit_split": fit_split,
        "eval_split": eval_split,
        "metrics": metrics,
    }


def _nuisance_matrix(entries: Sequence[dict]) -> np.ndarray:
    rows = []
    for e in entries:
        pose = e.get("pose", {})
        rows.append(
            [
                e.get("age", 0.0),
                1.0 if e.get("sex") == "F" else 0.0,
                e.get("fwhm_mm", 0.0),
                e.get("counts", 0.0),
                np.log(e.get("intensity_scale", 1.0)),
                e.get("anatomical_scale", 1.0),
                *pose.get("translation_mm", [0.0, 0.0, 0.0]),
                *pose.get("rotation_deg", [0.0, 0.0, 0.0]),
                pose.get("scale", 1.0),
            ]
        )
    return np.asarray(rows, dtype=np.float64)


def summarize_features(entries: Sequence[dict], feats: Sequence[dict[str, float]]) -> dict:
    """Calibration summary of scans given as datalist ``entries`` (with ``label`` and the phantom's nuisance
    fields) and their :func:`compute_sbr` features, in the same order.

    Returns:
        ``{"n", "n_pd", "n_hc", "groups": {"HC"|"PD": {feature: [mean, sd]}}, "threshold_in_sample": {...},
        "nuisance_cv_auc"}`` where ``threshold_in_sample`` fits and evaluates the lowest-putamen threshold on all
        scans and ``nuisance_cv_auc`` is the 5-fold cross-validated AUC of a logistic regression predicting the
        label from the recorded nuisance variables only (age, sex, FWHM, counts, intensity, size, pose); ~0.5 when
        they carry no label information. ``groups`` also holds the mean caudate and putamen SBR of both sides, and
        ``pd_reduction`` the relative PD reduction ``1 - mean(PD) / mean(HC)`` of four of them.
    """
    if len(entries) != len(feats):
        raise ValueError(f"entries and feats must have the same length, got {len(entries)} and {len(feats)}.")
    if not entries:
        raise ValueError("no scans to summarise.")
    y = np.asarray([e["label"] for e in entries], dtype=np.int64)
    table = {f: np.asarray([d[f] for d in feats]) for f in SBR_FEATURES}
    table["caudate"] = (table["caudate_L"] + table["caudate_R"]) / 2.0
    table["putamen"] = (table["putamen_L"] + table["putamen_R"]) / 2.0
    groups = {}
    for cls, label in (("HC", 0), ("PD", 1)):
        sel = y == label
        if sel.any():
            groups[cls] = {
                k: [round(float(v[sel].mean()), 4), round(float(v[sel].std(ddof=1)) if sel.sum() > 1 else 0.0, 4)]
                for k, v in table.items()
            }
    out: dict = {"n": int(y.size), "n_pd": int(y.sum()), "n_hc": int((1 - y).sum()), "groups": groups}
    if len(groups) == 2:
        # Relative PD reduction of the group means, 1 - mean(PD) / mean(HC) (Marek 2018: striatum ~45 %).
        out["pd_reduction"] = {
            k: round(1.0 - groups["PD"][k][0] / groups["HC"][k][0], 4)
            for k in ("lowest_putamen", "putamen", "caudate", "mean_striatum")
        }
    if 0 < y.sum() < y.size:
        clf = SBRThresholdClassifier().fit(table["lowest_putamen"], y)
        out["threshold_in_sample"] = {"threshold": clf.threshold, "metrics": clf.report(table["lowest_putamen"], y)}
        if all("fwhm_mm" in e for e in entries):
            from scripts.metrics import logistic_cv_scores, roc_auc_rows

            nuisance = logistic_cv_scores(_nuisance_matrix(entries), y, l2=1e-2)
            out["nuisance_cv_auc"] = float(roc_auc_rows(y, nuisance)[0])
    return out


def summarize_sbr(datalist_file: str | os.PathLike, splits: Sequence[str] | None = None) -> dict:
    """Calibration summary of a phantom datalist: :func:`summarize_features` of the pooled ``splits`` (default:
    every one of training, validation and test that the file has), plus ``"splits"``."""
    data = json.loads(pathlib.Path(datalist_file).read_text(encoding="utf-8"))
    names = list(splits) if splits else [k for k in ("training", "validation", "test") if k in data]
    entries, feats = [], []
    for name in names:
        if not data[name]:  # an empty list (e.g. the training list of a set made to be scored only)
            continue
        e, f = datalist_sbr(datalist_file, name)
        entries += e
        feats += f
    return {"splits": names, **summarize_features(entries, feats)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``python -m scripts.sbr --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.sbr", description="Lowest-putamen SBR threshold baseline on a datalist."
    )
    parser.add_argument("--datalist", required=True, help="datalist.json with training/validation/test lists")
    parser.add_argument("--fit-split", default="training")
    parser.add_argument(
        "--fit-datalist",
        default=None,
        help="fit the threshold on --fit-split of this datalist instead (e.g. a benchmark set's training split, to "
        "score an external test set)",
    )
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--summary", action="store_true", help="print per-class SBR statistics of all splits instead")
    parser.add_argument("--out", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    try:
        if args.summary:
            result = summarize_sbr(args.datalist)
        else:
            result = evaluate_sbr_baseline(args.datalist, args.fit_split, args.eval_split, args.fit_datalist)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
