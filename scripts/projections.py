# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""3D → 2D projections of a DaTscan volume ("partial input restriction"), as MONAI transforms.

The 2D student only sees a 2D image computed from the 3D volume. This module provides those projections,
a registry of their names and a dispatcher used by every config.

Input
    A channel-first single-channel volume ``(1, X, Y, Z)`` as a numpy array, a torch tensor or a MONAI
    ``MetaTensor``, in NIfTI voxel order as loaded by MONAI: ``x`` = left–right, ``y`` = posterior–anterior,
    ``z`` = inferior–superior. The projections are meant for the raw (e.g. min–max 0–255) intensities; any
    standardisation is applied afterwards to the 2D image.

Views
    A view is the axis the slices are taken along; a slice is the plane of the two other axes, in stored order
    (no rotation or flip):

    ==========  =============  ======================  ==========  ==========
    view        slicing axis   slice ``t``             H (rows)    W (columns)
    ==========  =============  ======================  ==========  ==========
    axial       z              ``img[:, :, :, t]``     x           y
    coronal     y              ``img[:, :, t, :]``     x           z
    sagittal    x              ``img[:, t, :, :]``     y           z
    ==========  =============  ======================  ==========  ==========

    Multi-view projections stack channels in the order ``[axial, coronal, sagittal]``; they need equal in-plane
    shapes for the three views, i.e. a cubic grid ``X = Y = Z`` (such as 64³).

Output
    A channel-first 2D image ``(C', H, W)`` of the same type family as the input: numpy in, numpy out; tensor
    in, tensor out; ``MetaTensor`` in, ``MetaTensor`` out. The dtype is the input's when it is floating point,
    else float32. For a ``MetaTensor`` the meta data are kept (``filename_or_obj`` etc.) except the stale 3D
    ``spatial_shape`` (removed) and ``affine`` (replaced by the 3×3 in-plane affine of the projected view, see
    :func:`plane_affine`; for multi-view outputs that of the first view, axial, since the other channels lie in
    other planes); ``meta["projection"]`` records the projection name and ``meta["projection_planes"]`` where
    each channel came from: an int64 ``(C', 2)`` tensor of rows ``(axis, index)``, the spatial axis sliced
    (0 = x, 1 = y, 2 = z, see :data:`VIEW_AXIS`) and the slice index along it, or ``-1`` for a channel computed
    from the whole stack of slices (dynamic image, entropy); it is what maps a 2D result (e.g. a saliency map)
    back to its place in the volume, whatever the centre mode. The applied-operation trace is
    reset, because the 3D operations cannot be inverted through a projection. Lists of outputs collate with
    ``monai.data.list_data_collate``.

Centre slice
    The slice-based projections take ``centre``: a fixed slice index; ``"template"``, the centre of the template
    striatum (:mod:`scripts.anatomy`) in each view of the image's own grid (:func:`template_centre`: the same slice
    for every scan on one grid, as the atlas-based centre of the original study); or ``"auto"``, which locates
    the striatum in each view from the data with :func:`find_slice_centre` (default: the uptake-weighted mean
    slice of the hottest 1 % of the voxels), for scans that are not aligned to the template. ``"auto"`` depends
    on the scan's own uptake, so the anatomy a model sees can depend on the class (a PD scan's hottest voxels
    sit elsewhere than a control's) and a hot spot outside the striatum moves it; the bundle's configs use
    ``"template"``. A ``MetaTensor`` output records the centres used in ``meta["slice_centre"]`` (``{view:
    index}``), and ``"auto"`` logs them at debug level (logger ``scripts.projections``).

Whole-stack projections
    The dynamic image (approximate rank pooling, rescaled to ``[0, 1]`` in floating point, without any 8-bit
    quantisation) and the entropy-weighted projection use every slice along the view axis; see
    :class:`DynamicImage` and :class:`EntropyProjection`.

Registry (:data:`PROJECTIONS`, :func:`projection_spec`, :class:`Projection`, :class:`Projectiond`)

    ===========================  ==============  ========  =================================================
    name                         channels        fusion    image
    ===========================  ==============  ========  =================================================
    single_slice                 1 (2g+1)        early     centre slice (gap g > 0: slices c−g..c+g, "mean")
    early_fusion_slices          k               early     k adjacent slices c−k//2..c+k//2 of one view
    joint_fusion_slices          k               joint     same image as early_fusion_slices
    early_fusion_views           3               early     centre slice of each view
    joint_fusion_views           3               joint     same image as early_fusion_views
    early_fusion_views_slices    3k              early     k adjacent slices of each view
    dynamic_image                1               early     rank-pooling dynamic image of one view
    dynamic_image_views          3               early     dynamic image of each view
    entropy                      1               early     entropy-weighted mean of the slices of one view
    entropy_views                3               early     entropy-weighted mean of each view
    ===========================  ==============  ========  =================================================

    ``fusion`` tells the network how to read the channels: ``"early"``: one CNN over all channels; ``"joint"``:
    a shared 1-channel encoder per channel with the embeddings concatenated; ``"mean"``: a shared 1-channel
    encoder per channel with the outputs averaged (one prediction per scan, not per slice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Transform
from monai.utils import MetaKeys, TransformBackends
from scripts.errors import InputError

__all__ = [
    "VIEWS",
    "VIEW_AXIS",
    "FUSIONS",
    "PROJECTIONS",
    "DYNAMIC_IMAGE_VARIANTS",
    "CENTRE_METHODS",
    "ProjectionSpec",
    "projection_spec",
    "find_slice_centre",
    "template_centre",
    "template_grid_affine",
    "CENTRE_MODES",
    "rank_pooling_coefficients",
    "slice_entropy",
    "plane_affine",
    "AdjacentSlices",
    "AdjacentSlicesd",
    "DynamicImage",
    "DynamicImaged",
    "EntropyProjection",
    "EntropyProjectiond",
    "Projection",
    "Projectiond",
]

VIEWS = ("axial", "coronal", "sagittal")
"""View names, in the channel order of the multi-view projections."""

VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
"""Spatial axis (0 = x, 1 = y, 2 = z) that each view slices along."""

_AXIS_NAMES = ("x", "y", "z")

FUSIONS = ("early", "joint", "mean")
"""How a network reads the channels of a projection (see :class:`ProjectionSpec`)."""

PROJECTIONS = (
    "single_slice",
    "early_fusion_slices",
    "early_fusion_views",
    "early_fusion_views_slices",
    "joint_fusion_slices",
    "joint_fusion_views",
    "dynamic_image",
    "dynamic_image_views",
    "entropy",
    "entropy_views",
)
"""Names accepted by :func:`projection_spec`, :class:`Projection` and :class:`Projectiond`."""

DYNAMIC_IMAGE_VARIANTS = ("canonical", "reference")
"""Rank-pooling coefficient variants (see :func:`rank_pooling_coefficients`)."""

CENTRE_METHODS = ("centroid", "peak")
"""Ways :func:`find_slice_centre` locates the striatal uptake."""

CENTRE_MODES = ("template", "auto")
"""Named centres (besides a fixed slice index): the template striatum's centre, or one found from the data."""

logger = logging.getLogger(__name__)

CentreLike = int | str | Sequence[int | str] | Mapping[str, int | str]


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectionSpec:
    """What a projection produces and how a network should read it.

    Attributes:
        name: projection name, one of :data:`PROJECTIONS`.
        in_channels: number of channels ``C'`` of the projected ``(C', H, W)`` image.
        fusion: ``"early"``: one CNN over all channels; ``"joint"``: a shared 1-channel encoder per channel,
            embeddings concatenated; ``"mean"``: a shared 1-channel encoder per channel, outputs averaged.
    """

    name: str
    in_channels: int
    fusion: str


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_num_slices(num_slices) -> int:
    if isinstance(num_slices, bool) or not isinstance(num_slices, (int, np.integer)) or num_slices < 1:
        raise ValueError(f"num_slices must be an odd integer >= 1, got {num_slices!r}.")
    if num_slices % 2 == 0:
        raise ValueError(
            f"num_slices must be odd so that the slices are centred on the centre slice, got {num_slices}."
        )
    return int(num_slices)


def _check_projection_name(name) -> str:
    if name not in PROJECTIONS:
        raise ValueError(f"unknown projection {name!r}; valid projections are: {', '.join(PROJECTIONS)}.")
    return name


def projection_spec(name: str, num_slices: int = 3, gap: int = 0) -> ProjectionSpec:
    """Channels and fusion mode of projection ``name``.

    Args:
        name: one of :data:`PROJECTIONS`.
        num_slices: ``k``, the odd number of adjacent slices of the ``*_slices`` projections.
        gap: ``g``, the half-width of ``single_slice``: ``g = 0`` gives the centre slice (1 channel, ``"early"``),
            ``g > 0`` gives the ``2g + 1`` slices ``c − g .. c + g`` as channels, read with ``"mean"`` fusion.

    ``num_slices`` only affects the ``*_slices`` projections and ``gap`` only ``single_slice``; both are validated
    for every name.

    Raises:
        ValueError: unknown name, even or non-positive ``num_slices``, negative ``gap``.
    """
    name = _check_projection_name(name)
    k = _check_num_slices(num_slices)
    g = _check_int(gap, "gap", 0)
    table = {
        "single_slice": (2 * g + 1, "mean" if g > 0 else "early"),
        "early_fusion_slices": (k, "early"),
        "early_fusion_views": (3, "early"),
        "early_fusion_views_slices": (3 * k, "early"),
        "joint_fusion_slices": (k, "joint"),
        "joint_fusion_views": (3, "joint"),
        "dynamic_image": (1, "early"),
        "dynamic_image_views": (3, "early"),
        "entropy": (1, "early"),
        "entropy_views": (3, "early"),
    }
    channels, fusion = table[name]
    return ProjectionSpec(name=name, in_channels=channels, fusion=fusion)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks and tensor helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_view(view) -> str:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; valid views are: {', '.join(VIEWS)}.")
    return view


def _check_views(view: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(view, str):
        return (_check_view(view),)
    views = tuple(view)
    if not views:
        raise ValueError("at least one view is required, got an empty sequence.")
    for v in views:
        _check_view(v)
    if len(set(views)) != len(views):
        raise ValueError(f"views must not repeat, got {views}.")
    return views


def _check_centre_value(value, where: str) -> int | str:
    if isinstance(value, str) and value in CENTRE_MODES:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where} must be a slice index (int), 'template' or 'auto', got {value!r}.")
    if value < 0:
        raise ValueError(f"{where} must be a non-negative slice index, got {value}.")
    return int(value)


def _check_centre(centre: CentreLike) -> int | str | dict[str, int | str]:
    """Normalise ``centre`` to a name of :data:`CENTRE_MODES`, an int, or a ``{view: int | name}`` dict covering
    every view."""
    if isinstance(centre, Mapping):
        unknown = [k for k in centre if k not in VIEWS]
        missing = [v for v in VIEWS if v not in centre]
        if unknown or missing:
            raise ValueError(
                f"a centre mapping must have exactly the keys {VIEWS}, got {tuple(centre)}"
                f" (unknown: {unknown}, missing: {missing})."
            )
        return {v: _check_centre_value(centre[v], f"centre[{v!r}]") for v in VIEWS}
    if isinstance(centre, Sequence) and not isinstance(centre, str):
        if len(centre) != len(VIEWS):
            raise ValueError(
                f"a centre sequence must give one centre per view in the order {VIEWS}, got {len(centre)} values:"
                f" {list(centre)}."
            )
        return {v: _check_centre_value(c, f"centre[{i}] ({v})") for i, (v, c) in enumerate(zip(VIEWS, centre))}
    return _check_centre_value(centre, "centre")


def _check_bins(bins) -> int:
    return _check_int(bins, "bins", 2)


def _check_variant(variant) -> str:
    if variant not in DYNAMIC_IMAGE_VARIANTS:
        raise ValueError(
            f"unknown dynamic image variant {variant!r}; valid variants are: {', '.join(DYNAMIC_IMAGE_VARIANTS)}."
        )
    return variant


def _check_centre_method(method) -> str:
    if method not in CENTRE_METHODS:
        raise ValueError(f"unknown centre method {method!r}; valid methods are: {', '.join(CENTRE_METHODS)}.")
    return method


def _check_smoothing(sigma, quantile) -> tuple[float, float]:
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma >= 0:
        raise ValueError(f"centre_sigma must be a number >= 0 (in slices), got {sigma!r}.")
    if not isinstance(quantile, (int, float)) or isinstance(quantile, bool) or not 0.5 <= quantile < 1:
        raise ValueError(f"centre_quantile must be in [0.5, 1), got {quantile!r}.")
    return float(sigma), float(quantile)


def _as_tensor(img: NdarrayOrTensor) -> torch.Tensor:
    """Plain tensor view of ``img`` (no copy, no meta)."""
    if isinstance(img, MetaTensor):
        return img.as_tensor()
    if isinstance(img, torch.Tensor):
        return img
    if isinstance(img, np.ndarray):
        return torch.as_tensor(np.ascontiguousarray(img))
    raise TypeError(f"expected a numpy array, a torch tensor or a MetaTensor, got {type(img).__name__}.")


def _volume(img: NdarrayOrTensor) -> torch.Tensor:
    """The ``(X, Y, Z)`` volume of a ``(1, X, Y, Z)`` channel-first input."""
    x = _as_tensor(img)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(
            f"expected a channel-first single-channel 3D volume of shape (1, X, Y, Z), got shape {tuple(x.shape)}."
        )
    return x[0]


def _volume_any(volume: NdarrayOrTensor) -> torch.Tensor:
    """Accept ``(1, X, Y, Z)`` or ``(X, Y, Z)``."""
    x = _as_tensor(volume)
    if x.ndim == 3:
        return x
    return _volume(x)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


def _slices_first(vol: torch.Tensor, view: str) -> torch.Tensor:
    """``(T, H, W)`` stack of the slices of ``vol`` ``(X, Y, Z)`` along ``view``; the in-plane axes keep their order."""
    return vol.movedim(VIEW_AXIS[view], 0)


def _check_same_planes(vol: torch.Tensor, views: tuple[str, ...]) -> None:
    if len(views) < 2:
        return
    planes = {v: tuple(_slices_first(vol, v).shape[1:]) for v in views}
    if len(set(planes.values())) > 1:
        desc = ", ".join(f"{v} {p}" for v, p in planes.items())
        raise ValueError(
            f"multi-view projections stack the views as channels, so every view needs the same in-plane shape"
            f" (a cubic grid X = Y = Z); the volume has (X, Y, Z) = {tuple(vol.shape)}, giving in-plane shapes"
            f" {desc}. Resample the volume first, e.g. with monai.transforms.Resized(spatial_size=(64, 64, 64))."
        )


def plane_affine(affine: torch.Tensor | np.ndarray, view: str) -> torch.Tensor:
    """3×3 affine of the 2D image of ``view``, from the 4×4 affine of the 3D volume.

    It keeps the columns of the two in-plane voxel axes (H, W) and the translation, and the rows of the two world
    axes the slicing axis is least aligned with (the world axis with the largest ``|A[r, view_axis]|`` is dropped).
    For the usual axis-aligned affine this is exactly the in-plane block of the 3D affine: pixel spacing,
    direction and origin of the plane. Any other input shape gives the 3×3 identity.
    """
    a = torch.as_tensor(affine, dtype=torch.float64)
    if a.shape != (4, 4):
        return torch.eye(3, dtype=torch.float64)
    axis = VIEW_AXIS[_check_view(view)]
    cols = [i for i in range(3) if i != axis] + [3]
    drop_row = int(torch.argmax(a[:3, axis].abs()))
    rows = [i for i in range(3) if i != drop_row] + [3]
    return a[rows][:, cols].clone()


def _wrap_output(
    out: torch.Tensor,
    img: NdarrayOrTensor,
    view: str,
    name: str,
    planes: Sequence[tuple[int, int]],
    centres: dict[str, int] | None = None,
) -> NdarrayOrTensor:
    """Return ``out`` in the type family of ``img``; for a ``MetaTensor`` carry over and fix the meta data.

    ``planes`` gives, per output channel, ``(axis, slice index)`` or ``(axis, -1)`` for a whole-stack channel;
    ``centres`` the centre slice used per view (slice-based projections).
    """
    if isinstance(img, MetaTensor):
        if not get_track_meta():
            return out
        meta = {k: deepcopy(v) for k, v in img.meta.items() if k not in (MetaKeys.SPATIAL_SHAPE, MetaKeys.AFFINE)}
        meta["projection"] = name
        meta["projection_planes"] = torch.as_tensor(planes, dtype=torch.int64).reshape(-1, 2)
        if centres is not None:
            meta["slice_centre"] = dict(centres)
        return MetaTensor(out, affine=plane_affine(img.affine, view), meta=meta, spatial_ndim=2)
    if isinstance(img, np.ndarray):
        return out.cpu().numpy()
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# Dynamic image and entropy weights
# ---------------------------------------------------------------------------------------------------------------


def rank_pooling_coefficients(
    num_frames: int, variant: str = "canonical", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Approximate rank pooling coefficients ``α_t``, ``t = 1 .. T``.

    ``"canonical"``: ``α_t = Σ_{i=t}^{T} (2i − T − 1) / i`` (they sum to 0).
    ``"reference"``: ``α_t = Σ_{i=t}^{T} (2i − T) / i`` (they sum to ``T``; the variant of a widely used
    implementation).

    Returns:
        ``(T,)`` tensor; entry ``t − 1`` is ``α_t``.
    """
    n = _check_int(num_frames, "num_frames", 1)
    variant = _check_variant(variant)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    terms = (2 * i - n - 1) / i if variant == "canonical" else (2 * i - n) / i
    return torch.flip(torch.cumsum(torch.flip(terms, (0,)), 0), (0,)).to(dtype)


def slice_entropy(volume: NdarrayOrTensor, view: str, bins: int = 256) -> torch.Tensor:
    """Shannon entropy (natural log) of the grey-level histogram of every slice along ``view``.

    The whole volume is first quantised to ``bins`` levels over its own range:
    ``level = min(⌊bins · (v − min) / (max − min)⌋, bins − 1)`` (all level 0 for a constant volume). For slice
    ``t`` with level frequencies ``p_b``, ``H_t = −Σ_b p_b ln p_b`` (``0 ln 0 = 0``).

    Args:
        volume: ``(1, X, Y, Z)`` channel-first or ``(X, Y, Z)`` volume.
        view: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        bins: number of grey levels (>= 2).

    Returns:
        ``(T,)`` float64 tensor of entropies, ``T`` being the volume size along the view's axis.
    """
    view = _check_view(view)
    bins = _check_bins(bins)
    vol = _volume_any(volume).to(torch.float64)
    lo, hi = vol.min(), vol.max()
    if bool(hi > lo):
        levels = torch.floor((vol - lo) / (hi - lo) * bins).clamp_(0, bins - 1).long()
    else:
        levels = torch.zeros(vol.shape, dtype=torch.long, device=vol.device)
    stack = _slices_first(levels, view).reshape(vol.shape[VIEW_AXIS[view]], -1)
    counts = torch.zeros(stack.shape[0], bins, dtype=torch.float64, device=vol.device)
    counts.scatter_add_(1, stack, torch.ones_like(stack, dtype=torch.float64))
    p = counts / stack.shape[1]
    return -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Array transforms
# ---------------------------------------------------------------------------------------------------------------


class AdjacentSlices(Transform):
    """Adjacent slices around a centre slice, as channels, for one or several views.

    For each view ``v`` (in the given order) with centre ``c_v`` and ``h = num_slices // 2``, the channels are
    the slices ``S_v[c_v − h], …, S_v[c_v + h]`` in increasing index order, where ``S_v[t]`` is slice ``t`` along
    the view's axis (see the module table for the H and W axes). Output ``(len(views) · num_slices, H, W)``.

    ``num_slices = 1`` is the single centre slice; ``num_slices = k`` with one view is 2D+ε; the three views
    with ``k`` slices give ``[axial slices…, coronal slices…, sagittal slices…]``.

    Args:
        view: a view name or a sequence of view names (channel order); several views need a cubic grid.
        centre: ``"template"`` (:func:`template_centre` on the image's grid: its ``MetaTensor`` affine, or the MNI
            2 mm field of view for a plain array), ``"auto"`` (:func:`find_slice_centre`), both per view and then
            clamped so that all ``num_slices`` slices fit; an int slice index (the same for every view); a sequence
            of three ints / names in the order ``(axial, coronal, sagittal)``; or a mapping ``{view: int | name}``
            for all three views. A fixed centre without ``h`` neighbours on both sides raises ``ValueError``.
        num_slices: odd number ``k >= 1`` of adjacent slices per view.
        centre_method: ``"centroid"`` or ``"peak"``, how :func:`find_slice_centre` finds an automatic centre.
        centre_sigma: Gaussian smoothing (slices) of an automatic ``"peak"`` centre.
        centre_quantile: uptake quantile of an automatic centre.
        name: value recorded in ``meta["projection"]`` of a ``MetaTensor`` output.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        view: str | Sequence[str] = "axial",
        centre: CentreLike = "auto",
        num_slices: int = 1,
        centre_method: str = "centroid",
        centre_sigma: float = 2.0,
        centre_quantile: float = 0.99,
        name: str = "adjacent_slices",
    ) -> None:
        self.views = _check_views(view)
        self.centre = _check_centre(centre)
        self.num_slices = _check_num_slices(num_slices)
        self.centre_method = _check_centre_method(centre_method)
        self.centre_sigma, self.centre_quantile = _check_smoothing(centre_sigma, centre_quantile)
        self.name = name

    def _centres(self, vol: torch.Tensor, img: NdarrayOrTensor) -> dict[str, int]:
        return _resolve_centres(
            vol,
            self.views,
            self.centre,
            self.num_slices // 2,
            self.centre_method,
            self.centre_sigma,
            self.centre_quantile,
            img.affine if isinstance(img, MetaTensor) else None,
        )

    def centres(self, img: NdarrayOrTensor) -> dict[str, int]:
        """The centre slice index used for each view of ``img`` ``(1, X, Y, Z)``."""
        try:
            return self._centres(_volume(img), img)
        except InputError as e:
            name = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
            raise InputError(f"{name}: {e}" if name else str(e)) from None

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(1, X, Y, Z)`` → ``(len(views) · num_slices, H, W)``."""
        vol = _volume(img)
        _check_same_planes(vol, self.views)
        half = self.num_slices // 2
        channels, planes = [], []
        centres = self.centres(img)
        for v, c in centres.items():
            channels.append(_slices_first(vol, v)[c - half : c + half + 1])
            planes += [(VIEW_AXIS[v], t) for t in range(c - half, c + half + 1)]
        out = torch.cat(channels, dim=0).to(_out_dtype(vol))
        return _wrap_output(out, img, self.views[0], self.name, planes, centres)


class DynamicImage(Transform):
    """Dynamic image by approximate rank pooling over all slices of a view.

    The slices along the view axis are the frames, in index order (frame ``t`` = slice ``t − 1``, ``t = 1..T``):

        DI = Σ_{t=1}^{T} α_t V_t,   then   DI' = (DI − min DI) / (max DI − min DI) ∈ [0, 1],

    with ``α_t`` from :func:`rank_pooling_coefficients` (``variant``), computed in float64. A DI that is constant
    up to rounding (range ≤ 1e-10 · Σ|α_t| · max|V|, e.g. a constant volume or one whose slices are all equal)
    gives zeros. Several views give one channel per view, in the given order.

    Args:
        view: a view name or a sequence of view names (channel order); several views need a cubic grid.
        variant: ``"canonical"`` or ``"reference"``.
        name: value recorded in ``meta["projection"]`` of a ``MetaTensor`` output.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self, view: str | Sequence[str] = "axial", variant: str = "canonical", name: str = "dynamic_image"
    ) -> None:
        self.views = _check_views(view)
        self.variant = _check_variant(variant)
        self.name = name

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(1, X, Y, Z)`` → ``(len(views), H, W)`` in ``[0, 1]``."""
        vol = _volume(img)
        _check_same_planes(vol, self.views)
        v64 = vol.to(torch.float64)
        vmax = float(v64.abs().max()) if v64.numel() else 0.0
        channels = []
        for v in self.views:
            stack = _slices_first(v64, v)
            alpha = rank_pooling_coefficients(stack.shape[0], self.variant).to(stack.device)
            di = torch.tensordot(alpha, stack, dims=1)
            lo, hi = di.min(), di.max()
            tol = 1e-10 * float(alpha.abs().sum()) * vmax
            channels.append((di - lo) / (hi - lo) if float(hi - lo) > tol else torch.zeros_like(di))
        out = torch.stack(channels, dim=0).to(_out_dtype(vol))
        return _wrap_output(out, img, self.views[0], self.name, [(VIEW_AXIS[v], -1) for v in self.views])


class EntropyProjection(Transform):
    """Entropy-weighted mean of all slices of a view.

        image = Σ_t H_t V_t / (Σ_t H_t + 1e-5),

    with ``H_t`` the grey-level entropy of slice ``t`` from :func:`slice_entropy` (``bins`` levels over the
    volume's range) and ``V_t`` the float (not quantised) slice values; computed in float64. Slices with more
    grey-level variety get more weight; an all-constant volume gives zeros. Several views give one channel per
    view, in the given order.

    Args:
        view: a view name or a sequence of view names (channel order); several views need a cubic grid.
        bins: number of grey levels of the histogram.
        name: value recorded in ``meta["projection"]`` of a ``MetaTensor`` output.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, view: str | Sequence[str] = "axial", bins: int = 256, name: str = "entropy") -> None:
        self.views = _check_views(view)
        self.bins = _check_bins(bins)
        self.name = name

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(1, X, Y, Z)`` → ``(len(views), H, W)``."""
        vol = _volume(img)
        _check_same_planes(vol, self.views)
        v64 = vol.to(torch.float64)
        channels = []
        for v in self.views:
            weights = slice_entropy(v64, v, self.bins)
            channels.append(torch.tensordot(weights, _slices_first(v64, v), dims=1) / (weights.sum() + 1e-5))
        out = torch.stack(channels, dim=0).to(_out_dtype(vol))
        return _wrap_output(out, img, self.views[0], self.name, [(VIEW_AXIS[v], -1) for v in self.views])


class Projection(Transform):
    """Apply the projection named ``projection`` (one of :data:`PROJECTIONS`; see the module table).

    Args:
        projection: projection name; :func:`projection_spec` gives its channels and fusion mode.
        view: view of the single-view projections (``single_slice``, ``*_fusion_slices``, ``dynamic_image``,
            ``entropy``); validated but unused by the multi-view ones, which always use
            ``(axial, coronal, sagittal)``.
        centre: centre slice of the slice-based projections, as in :class:`AdjacentSlices`; unused otherwise.
        num_slices: ``k`` of the ``*_slices`` projections (odd).
        gap: ``g`` of ``single_slice``: the ``2g + 1`` slices ``c − g .. c + g``.
        dynamic_image_variant: ``"canonical"`` or ``"reference"`` coefficients of the dynamic images.
        bins: grey levels of the entropy projections.
        centre_method: ``"centroid"`` or ``"peak"``, how :func:`find_slice_centre` finds an automatic centre.
        centre_sigma: Gaussian smoothing (slices) of an automatic ``"peak"`` centre.
        centre_quantile: uptake quantile of an automatic centre.

    Every argument is validated, also those the chosen projection does not use, so that a typo in a config
    fails early whatever the projection.

    Raises:
        ValueError: unknown projection (listing the valid ones), view, variant or centre method, even
            ``num_slices``, negative ``gap``, a malformed centre, ``bins < 2``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        projection: str,
        view: str = "axial",
        centre: CentreLike = "auto",
        num_slices: int = 3,
        gap: int = 0,
        dynamic_image_variant: str = "canonical",
        bins: int = 256,
        centre_method: str = "centroid",
        centre_sigma: float = 2.0,
        centre_quantile: float = 0.99,
    ) -> None:
        self.spec = projection_spec(projection, num_slices, gap)
        # every argument is validated, also those the chosen projection does not use
        view = _check_view(view)
        _check_variant(dynamic_image_variant)
        _check_bins(bins)
        _check_centre(centre)
        _check_centre_method(centre_method)
        _check_smoothing(centre_sigma, centre_quantile)
        name = self.spec.name
        slices = {
            "centre": centre,
            "centre_method": centre_method,
            "centre_sigma": centre_sigma,
            "centre_quantile": centre_quantile,
            "name": name,
        }
        if name == "single_slice":
            self.transform: Transform = AdjacentSlices(view, num_slices=2 * int(gap) + 1, **slices)
        elif name in ("early_fusion_slices", "joint_fusion_slices"):
            self.transform = AdjacentSlices(view, num_slices=num_slices, **slices)
        elif name in ("early_fusion_views", "joint_fusion_views"):
            self.transform = AdjacentSlices(VIEWS, num_slices=1, **slices)
        elif name == "early_fusion_views_slices":
            self.transform = AdjacentSlices(VIEWS, num_slices=num_slices, **slices)
        elif name in ("dynamic_image", "dynamic_image_views"):
            views = VIEWS if name.endswith("_views") else view
            self.transform = DynamicImage(views, variant=dynamic_image_variant, name=name)
        else:
            views = VIEWS if name.endswith("_views") else view
            self.transform = EntropyProjection(views, bins=bins, name=name)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(1, X, Y, Z)`` → ``(spec.in_channels, H, W)``."""
        return self.transform(img)


# ---------------------------------------------------------------------------------------------------------------
# Dictionary transforms
# ---------------------------------------------------------------------------------------------------------------


class _ArrayMapd(MapTransform):
    """Apply ``self.transform`` to every key."""

    transform: Transform
    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class AdjacentSlicesd(_ArrayMapd):
    """Dictionary version of :class:`AdjacentSlices`."""

    def __init__(
        self,
        keys: KeysCollection,
        view: str | Sequence[str] = "axial",
        centre: CentreLike = "auto",
        num_slices: int = 1,
        centre_method: str = "centroid",
        centre_sigma: float = 2.0,
        centre_quantile: float = 0.99,
        name: str = "adjacent_slices",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = AdjacentSlices(view, centre, num_slices, centre_method, centre_sigma, centre_quantile, name)


class DynamicImaged(_ArrayMapd):
    """Dictionary version of :class:`DynamicImage`."""

    def __init__(
        self,
        keys: KeysCollection,
        view: str | Sequence[str] = "axial",
        variant: str = "canonical",
        name: str = "dynamic_image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = DynamicImage(view, variant, name)


class EntropyProjectiond(_ArrayMapd):
    """Dictionary version of :class:`EntropyProjection`."""

    def __init__(
        self,
        keys: KeysCollection,
        view: str | Sequence[str] = "axial",
        bins: int = 256,
        name: str = "entropy",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = EntropyProjection(view, bins, name)


class Projectiond(_ArrayMapd):
    """Dictionary version of :class:`Projection`: replaces each ``keys`` volume by its named 2D projection.

    Typical use keeps the volume for a 3D teacher under another key first (e.g. ``CopyItemsd``), then
    ``Projectiond(keys="image", projection="early_fusion_slices")``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        projection: str,
        view: str = "axial",
        centre: CentreLike = "auto",
        num_slices: int = 3,
        gap: int = 0,
        dynamic_image_variant: str = "canonical",
        allow_missing_keys: bool = False,
        bins: int = 256,
        centre_method: str = "centroid",
        centre_sigma: float = 2.0,
        centre_quantile: float = 0.99,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Projection(
            projection,
            view,
            centre,
            num_slices,
            gap,
            dynamic_image_variant,
            bins,
            centre_method,
            centre_sigma,
            centre_quantile,
        )
        self.spec = self.transform.spec
