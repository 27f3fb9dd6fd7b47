# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Where a saliency map lies: 2D maps placed in the working grid and the attention metrics, for
:mod:`scripts.explain` and the reports.

Placement in the working grid
    A student's input channels are slices (or whole-stack projections) of the 64³ working-grid volume; the
    projection records which in ``meta["projection_planes"]`` (rows ``(axis, index)``, index ``-1`` for a
    whole-stack channel; see :mod:`scripts.projections`). :func:`place_in_volume` puts each channel's map back
    at its slice (whole-stack channels are spread along their axis) and :func:`sample_planes` reads a 3D map
    (the teacher's) on the same planes, so teacher and student are compared voxel for voxel.

Attention metrics (:func:`attention_metrics`)
    * ROI share: ``Σ_{p ∈ ROI} s_p / Σ_p s_p``, the share of the saliency mass inside ``striatum``, ``caudate``
      (L + R), ``putamen`` (L + R) and ``putamen_post`` (L + R) of the template ROIs on the working grid. The
      teacher's is computed over the volume; a student's over the planes it saw (for a whole-stack channel, a
      pixel counts as inside when its ray crosses the ROI). Each share comes with its chance level, the ROI's
      share of the domain (what a uniform map would give).
    * Teacher–student agreement on the student's planes: Spearman's rank correlation of the two maps over the
      striatal pixels, and the IoU of the top ``top_percent`` % pixels of each map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from scipy.stats import spearmanr

__all__ = [
    "ROI_GROUPS",
    "projection_planes",
    "place_in_volume",
    "sample_planes",
    "roi_planes",
    "roi_groups",
    "roi_share",
    "spearman",
    "top_percent_iou",
    "attention_metrics",
]

ROI_GROUPS = {
    "striatum": ("striatum",),
    "caudate": ("caudate_L", "caudate_R"),
    "putamen": ("putamen_L", "putamen_R"),
    "putamen_post": ("putamen_post_L", "putamen_post_R"),
}
"""Regions of the attention metrics, as unions of :data:`scripts.anatomy.ROI_NAMES`."""


# ---------------------------------------------------------------------------------------------------------------
# Placement of 2D maps in the working grid
# ---------------------------------------------------------------------------------------------------------------


def projection_planes(image: torch.Tensor) -> torch.Tensor:
    """The ``(C, 2)`` rows ``(axis, index)`` a projected image records in ``meta["projection_planes"]``.

    Raises:
        ValueError: when ``image`` is not a ``MetaTensor`` from :mod:`scripts.projections` or the record does not
            match its channels.
    """
    planes = image.meta.get("projection_planes") if isinstance(image, MetaTensor) else None
    if planes is None:
        raise ValueError(
            "the image does not record its source planes (meta['projection_planes']): pass the MetaTensor that"
            " scripts.projections produced."
        )
    planes = torch.as_tensor(planes, dtype=torch.int64).reshape(-1, 2)
    if planes.shape[0] != image.shape[0]:
        raise ValueError(f"meta['projection_planes'] has {planes.shape[0]} rows for {image.shape[0]} channels.")
    return planes


def _plane_view(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """``(T, H, W)`` view of an ``(X, Y, Z)`` volume with ``axis`` first (the projections' slice layout)."""
    return volume.movedim(axis, 0)


def _check_planes(planes: torch.Tensor | np.ndarray, shape: Sequence[int]) -> list[tuple[int, int]]:
    rows = [(int(a), int(i)) for a, i in torch.as_tensor(planes).reshape(-1, 2).tolist()]
    for axis, index in rows:
        if axis not in (0, 1, 2) or not -1 <= index < shape[axis]:
            raise ValueError(f"plane (axis {axis}, index {index}) is outside a volume of shape {tuple(shape)}.")
    return rows


def place_in_volume(
    maps: torch.Tensor, planes: torch.Tensor, shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put per-channel 2D maps back into the ``(X, Y, Z)`` working grid.

    A slice channel fills its slice; a whole-stack channel (index ``-1``) is spread along its axis. Where
    planes cross (several views), the larger value is kept.

    Args:
        maps: ``(C, H, W)``.
        planes: ``(C, 2)`` rows ``(axis, index)`` (:func:`projection_planes`).
        shape: ``(X, Y, Z)``.

    Returns:
        ``(volume map (X, Y, Z), support (X, Y, Z) bool)``; the support marks the voxels the maps cover.
    """
    shape = tuple(int(s) for s in shape)
    rows = _check_planes(planes, shape)
    if maps.ndim != 3 or maps.shape[0] != len(rows):
        raise ValueError(f"expected maps (C, H, W) with C = {len(rows)} planes, got shape {tuple(maps.shape)}.")
    volume = torch.zeros(shape, dtype=maps.dtype, device=maps.device)
    support = torch.zeros(shape, dtype=torch.bool, device=maps.device)
    for m, (axis, index) in zip(maps, rows):
        target, cover = _plane_view(volume, axis), _plane_view(support, axis)
        if tuple(target.shape[1:]) != tuple(m.shape):
            raise ValueError(f"a map of shape {tuple(m.shape)} does not fit the planes {tuple(target.shape[1:])}.")
        if index < 0:
            target.copy_(torch.maximum(target, m.expand_as(target)))
            cover.fill_(True)
        else:
            target[index] = torch.maximum(target[index], m)
            cover[index] = True
    return volume, support


def sample_planes(volume: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """A 3D map read on a student's planes: ``(C, H, W)``, the slice, or the mean along the axis for index ``-1``."""
    volume = torch.as_tensor(volume)
    rows = _check_planes(planes, volume.shape)
    return torch.stack(
        [_plane_view(volume, a).float().mean(0) if i < 0 else _plane_view(volume, a)[i] for a, i in rows]
    )


def roi_planes(mask: np.ndarray | torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """A 3D ROI on a student's planes: ``(C, H, W)`` bool, the slice, or "the ray crosses the ROI" for index ``-1``."""
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    rows = _check_planes(planes, mask.shape)
    return torch.stack([_plane_view(mask, a).any(0) if i < 0 else _plane_view(mask, a)[i] for a, i in rows])


def roi_groups(rois: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The :data:`ROI_GROUPS` unions of template ROIs (``scripts.anatomy.template_rois``)."""
    return {name: np.logical_or.reduce([np.asarray(rois[p]) for p in parts]) for name, parts in ROI_GROUPS.items()}


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _flat(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def roi_share(saliency, mask, domain=None) -> float:
    """Share of the saliency mass inside ``mask``: ``Σ_{p ∈ mask ∩ domain} s_p / Σ_{p ∈ domain} s_p``.

    ``nan`` when the map has no mass in the domain (default: everywhere).
    """
    s, m = _flat(saliency), _flat(mask) > 0
    d = np.ones_like(m) if domain is None else _flat(domain) > 0
    total = s[d].sum()
    return float(s[d & m].sum() / total) if total > 0 else float("nan")


def spearman(a, b, mask=None) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``) of two maps over ``mask`` (default: all elements);
    ``nan`` if one is constant."""
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"maps must have the same number of elements, got {x.size} and {y.size}.")
    if mask is not None:
        keep = _flat(mask) > 0
        x, y = x[keep], y[keep]
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _top_set(x: np.ndarray, percent: float) -> np.ndarray:
    threshold = np.quantile(x, 1.0 - percent / 100.0)
    return (x >= threshold) & (x > 0)


def top_percent_iou(a, b, percent: float = 10.0, mask=None) -> float:
    """IoU of the top ``percent`` % elements of each map (positive values only) over ``mask``.

    1 for identical maps, 0 for maps with disjoint supports; ``nan`` when a map has no positive value there
    (an empty map agrees with nothing and disagrees with nothing).
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}.")
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"maps must have the same number of elements, got {x.size} and {y.size}.")
    if mask is not None:
        keep = _flat(mask) > 0
        x, y = x[keep], y[keep]
    if x.size == 0:
        return float("nan")
    sa, sb = _top_set(x, percent), _top_set(y, percent)
    if not (sa.any() and sb.any()):
        return float("nan")
    return float((sa & sb).sum() / (sa | sb).sum())


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and np.isfinite(a) else float("nan")


def attention_metrics(
    rois: Mapping[str, np.ndarray],
    teacher_map: torch.Tensor | None = None,
    student_maps: torch.Tensor | None = None,
    planes: torch.Tensor | None = None,
    top_percent: float = 10.0,
) -> dict[str, float]:
    """ROI shares of a teacher and/or a student map and their agreement (see the module docstring).

    Args:
        rois: template ROIs on the working grid (``scripts.anatomy.template_rois(shape, affine)``).
        teacher_map: ``(X, Y, Z)`` teacher saliency.
        student_maps: ``(C, H, W)`` student saliency, one map per input channel.
        planes: ``(C, 2)`` source planes of the student's channels (needed with ``student_maps``).
        top_percent: ``k`` of the top-``k`` % IoU.

    Returns:
        ``teacher_<roi>_share`` / ``_chance`` / ``_enrichment`` (share / chance; teacher over the volume),
        ``student_<roi>_share`` / ``_chance`` / ``_enrichment`` (student over its planes),
        ``teacher_on_planes_<roi>_share`` / ``_enrichment`` (the teacher's map read on the student's planes) and
        ``spearman_striatum`` / ``top<k>_iou`` (agreement on those planes), for the maps given.
    """
    groups = roi_groups(rois)
    out: dict[str, float] = {}
    if teacher_map is not None:
        t = torch.as_tensor(teacher_map).float()
        for name, mask in groups.items():
            out[f"teacher_{name}_share"] = roi_share(t, mask)
            out[f"teacher_{name}_chance"] = float(mask.mean())
            out[f"teacher_{name}_enrichment"] = _ratio(out[f"teacher_{name}_share"], out[f"teacher_{name}_chance"])
    if student_maps is not None:
        if planes is None:
            raise ValueError("student maps need their source planes (projection_planes) to be placed.")
        s = torch.as_tensor(student_maps).float()
        plane_masks = {name: roi_planes(mask, planes) for name, mask in groups.items()}
        for name, mask in plane_masks.items():
            out[f"student_{name}_share"] = roi_share(s, mask)
            out[f"student_{name}_chance"] = float(mask.float().mean())
            out[f"student_{name}_enrichment"] = _ratio(out[f"student_{name}_share"], out[f"student_{name}_chance"])
        if teacher_map is not None:
            t_planes = sample_planes(torch.as_tensor(teacher_map).float(), planes)
            for name, mask in plane_masks.items():
                out[f"teacher_on_planes_{name}_share"] = roi_share(t_planes, mask)
                out[f"teacher_on_planes_{name}_enrichment"] = _ratio(
                    out[f"teacher_on_planes_{name}_share"], out[f"student_{name}_chance"]
                )
            out["spearman_striatum"] = spearman(s, t_planes, plane_masks["striatum"])
            out[f"top{top_percent:g}_iou"] = top_percent_iou(s, t_planes, top_percent)
    return out
