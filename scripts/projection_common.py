# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Names, specifications, argument checks and tensor helpers shared by :mod:`scripts.projections` and
:mod:`scripts.slice_centre` (the public names are re-exported by :mod:`scripts.projections`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.utils import MetaKeys

__all__ = [
    "VIEWS",
    "VIEW_AXIS",
    "FUSIONS",
    "PROJECTIONS",
    "DYNAMIC_IMAGE_VARIANTS",
    "CENTRE_METHODS",
    "ProjectionSpec",
    "projection_spec",
    "CENTRE_MODES",
    "plane_affine",
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
