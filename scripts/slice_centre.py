# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The slice a projection is centred on: the template striatum's slice (:func:`template_centre`) or the slice of
peak striatal uptake (:func:`find_slice_centre`), per view (the public names are re-exported by
:mod:`scripts.projections`; the centre modes are described there)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.config.type_definitions import NdarrayOrTensor
from scripts.errors import InputError
from scripts.projection_common import (
    _AXIS_NAMES,
    VIEW_AXIS,
    _check_centre_method,
    _check_smoothing,
    _check_view,
    _slices_first,
    _volume_any,
)

__all__ = ["find_slice_centre", "template_centre", "template_grid_affine"]

logger = logging.getLogger("scripts.projections")  # the logger the projections document

# ---------------------------------------------------------------------------------------------------------------
# Centre slice
# ---------------------------------------------------------------------------------------------------------------


def _gaussian_smooth_1d(signal: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return signal
    radius = max(1, math.ceil(3.0 * sigma))
    j = torch.arange(-radius, radius + 1, dtype=signal.dtype, device=signal.device)
    kernel = torch.exp(-0.5 * (j / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return torch.nn.functional.conv1d(signal[None, None], kernel[None, None], padding=radius)[0, 0]


def _uptake_excess(vol: torch.Tensor, quantile: float) -> torch.Tensor:
    """``(v − median) · [v ≥ quantile-quantile]`` of an ``(X, Y, Z)`` volume, in float64."""
    v = vol.to(torch.float64)
    flat = v.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError(f"cannot find a slice centre in an empty volume of shape {tuple(vol.shape)}.")
    k = min(n, max(1, math.ceil(quantile * n)))  # the threshold is the k-th smallest value
    threshold = torch.topk(flat, n - k + 1).values[-1]
    median = torch.kthvalue(flat, (n + 1) // 2).values
    return torch.where(v >= threshold, v - median, torch.zeros_like(v))


def _centre_from_excess(excess: torch.Tensor, view: str, method: str, sigma: float) -> int:
    score = _slices_first(excess, view).sum(dim=(1, 2))
    size = score.shape[0]
    if not bool(score.sum() > 0):
        return (size - 1) // 2
    if method == "centroid":
        t = torch.arange(size, dtype=score.dtype, device=score.device)
        return int(math.floor(float((t * score).sum() / score.sum()) + 0.5))
    return int(torch.argmax(_gaussian_smooth_1d(score, sigma)))


def find_slice_centre(
    volume: NdarrayOrTensor, view: str, method: str = "centroid", sigma: float = 2.0, quantile: float = 0.99
) -> int:
    """Centre slice of the striatal uptake along ``view``, found from the data.

    With ``v`` the volume, ``m`` its median and ``q`` its ``quantile``-quantile (so that the hottest
    ``1 − quantile`` share of the voxels counts as uptake: the striatum in a DaTscan), the uptake score of slice
    ``t`` is the background-subtracted mass of its hottest voxels

        s_t = Σ_{voxels p of slice t, v_p ≥ q} (v_p − m).

    * ``method="centroid"`` (default): the uptake-weighted mean slice ``round(Σ_t t·s_t / Σ_t s_t)`` (halves
      round up). It follows the whole striatum, so in the sagittal view, where the two hemispheres give two
      peaks, it lands between them (on the midline of a symmetric scan) instead of on one side.
    * ``method="peak"``: the slice of maximum smoothed uptake, ``argmax_t (G_σ * s)_t`` with ``G_σ`` a
      normalised 1D Gaussian of ``sigma`` slices (truncated at ``⌈3σ⌉``, zero padding at the stack ends;
      lowest index on ties). In the sagittal view it picks the hotter hemisphere.

    Both only assume that the striatum holds the hottest voxels of the scan, not that the scan is aligned to a
    template. A volume with no voxel above its median (e.g. a constant volume) gives the middle slice
    ``(T − 1) // 2``.

    Args:
        volume: ``(1, X, Y, Z)`` channel-first or ``(X, Y, Z)`` volume (numpy, torch or MetaTensor).
        view: ``"axial"`` (along z), ``"coronal"`` (along y) or ``"sagittal"`` (along x).
        method: ``"centroid"`` or ``"peak"``.
        sigma: Gaussian standard deviation in slices for ``"peak"`` (0: no smoothing); unused by ``"centroid"``.
        quantile: in ``[0.5, 1)``; voxels at or above this quantile of the volume count as uptake.

    Returns:
        the slice index ``t`` in ``0 .. T − 1``, ``T`` being the volume size along the view's axis.
    """
    view = _check_view(view)
    method = _check_centre_method(method)
    sigma, quantile = _check_smoothing(sigma, quantile)
    return _centre_from_excess(_uptake_excess(_volume_any(volume), quantile), view, method, sigma)


def template_grid_affine(shape: Sequence[int]) -> np.ndarray:
    """Voxel → MNI affine of the MNI152 2 mm field of view in RAS voxel order, resampled to ``shape`` with aligned
    corners: the grid of the bundle's preprocessing (``Orientationd`` RAS, ``Resized``) of a PPMI-style scan."""
    from scripts.anatomy import MNI_2MM_AFFINE, MNI_2MM_SHAPE, resized_affine

    flip = np.eye(4)
    if MNI_2MM_AFFINE[0, 0] < 0:  # FSL stores x right-to-left; RAS voxel order runs left-to-right
        flip[0, 0], flip[0, 3] = -1.0, MNI_2MM_SHAPE[0] - 1
    return resized_affine(MNI_2MM_AFFINE @ flip, MNI_2MM_SHAPE, tuple(int(s) for s in shape))


def template_centre(shape: Sequence[int], view: str, affine: torch.Tensor | np.ndarray | None = None) -> int:
    """Centre slice of the template striatum along ``view`` on the grid ``(shape, affine)``.

    The template striatum (caudate and putamen of both sides, :func:`scripts.anatomy.template_rois`) is evaluated
    on the grid; with ``d0`` and ``d1`` the first and last slice along the view's axis that hold any of it, the
    centre is ``⌊(d0 + d1) / 2⌋``, the atlas-based centre of the original study. It depends only on the grid, so
    every scan on the same grid gets the same slice (e.g. axial 27, coronal 37, sagittal 31 on the bundle's 64³
    grid of an MNI 2 mm scan).

    Args:
        shape: spatial shape ``(X, Y, Z)``.
        view: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        affine: ``(4, 4)`` voxel → MNI (mm) affine of the grid, e.g. a ``MetaTensor``'s; ``None`` assumes the MNI
            2 mm field of view resampled to ``shape`` (:func:`template_grid_affine`).

    Raises:
        InputError: when the template striatum falls outside the grid (the scan is not in MNI space).
    """
    from scripts.anatomy import template_rois

    view = _check_view(view)
    shape = tuple(int(s) for s in shape)
    aff = template_grid_affine(shape) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), np.float64)
    mask = template_rois(shape, aff)["striatum"]
    axis = VIEW_AXIS[view]
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    if present.size == 0:
        raise InputError(
            f"the template striatum falls outside this image of shape {shape} (affine {aff[:3].round(2).tolist()}); "
            "is the scan in MNI space? Use slice_centre 'auto' for scans that are not."
        )
    return int((present[0] + present[-1]) // 2)


def _resolve_centres(
    vol: torch.Tensor,
    views: tuple[str, ...],
    centre: int | str | dict,
    half: int,
    method: str,
    sigma: float,
    quantile: float,
    affine: torch.Tensor | np.ndarray | None = None,
) -> dict[str, int]:
    """Centre slice per view, each with ``half`` neighbours on both sides (a named centre is clamped)."""
    wanted = {v: centre[v] if isinstance(centre, dict) else centre for v in views}
    excess = _uptake_excess(vol, quantile) if "auto" in wanted.values() else None
    centres = {}
    for view, c in wanted.items():
        axis = VIEW_AXIS[view]
        size = vol.shape[axis]
        if size < 2 * half + 1:
            raise ValueError(
                f"{2 * half + 1} adjacent slices are needed along {_AXIS_NAMES[axis]} for the {view} view, but the"
                f" volume of shape (X, Y, Z) = {tuple(vol.shape)} has only {size}."
            )
        if c == "auto":
            c = min(max(_centre_from_excess(excess, view, method, sigma), half), size - 1 - half)
        elif c == "template":
            c = min(max(template_centre(vol.shape, view, affine), half), size - 1 - half)
        elif not half <= c <= size - 1 - half:
            raise ValueError(
                f"centre {c} for the {view} view is outside the volume or too close to its border: it needs slices"
                f" {c - half}..{c + half}, but the volume has {size} slices along {_AXIS_NAMES[axis]} (indices"
                f" 0..{size - 1}), so the centre must be in {half}..{size - 1 - half}."
            )
        centres[view] = c
    if "auto" in wanted.values():
        logger.debug("automatic slice centres %s", centres)
    return centres
