# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Inference preprocessing that computes only the planes of the working grid that the 2D student reads.

The bundle's preprocessing (``configs/inference.json#volume_transforms`` then ``#projection_transform``) loads a
scan, orients it to RAS, resamples the whole volume to the working grid (``Resized``, trilinear, corners
aligned), min-max normalises it and projects it. A slice-based projection with a fixed centre reads only a few
planes of that grid (three axial slices for ``early_fusion_slices``), so :class:`PartialPreprocessing` resamples
just those planes, while giving the same student input as the full chain:

* trilinear resampling is separable, so a plane of the grid is the linear blend of the two input planes around it
  along the slicing axis, resampled bilinearly in-plane;
* min-max normalisation needs the minimum and maximum of the *whole* resampled grid. A resampled voxel is a convex
  combination of its 8 input neighbours, so with ``L`` the largest value of the computed planes, only grid voxels
  whose 2×2×2 input cell holds an input voxel above ``L`` can exceed it; those few voxels are evaluated exactly
  (the same for the minimum). Only when there are many such candidates is the whole grid resampled instead.

Everything else (loading and its checks, orientation, the projection transform itself, the output ``MetaTensor``
and its metadata) is the chain's own transforms, so the student sees the same image as through the full chain
(equal up to float32 rounding, tested for every projection). The chain runs unchanged (whole volume) when the
projection needs it: an automatic (data-driven) slice centre, the whole-stack projections (dynamic image,
entropy), another intensity mode, or another interpolation.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, Resized
from monai.utils import MetaKeys
from scripts.errors import InputError
from scripts.options import parse_bool
from scripts.projections import VIEW_AXIS, AdjacentSlices, Projectiond, template_centre
from scripts.transforms import IntensityNormalized
from torch.nn import functional as nnf

__all__ = ["planes_read_by", "resample_planes", "grid_extrema", "PartialPreprocessing"]

MAX_CANDIDATES = 20000
"""Above this many candidate grid voxels for the exact extrema, the whole grid is resampled instead."""


def planes_read_by(
    projection: Projectiond, spatial_size: Sequence[int], affine: torch.Tensor | None = None
) -> dict[int, list[int]] | None:
    """The planes of the working grid that ``projection`` reads, as ``{spatial axis: [indices]}``.

    ``None`` when the projection needs the whole volume: whole-stack projections, or an automatic slice centre
    (found from the data). A fixed centre out of range is left to the projection to report. A ``"template"``
    centre is the template striatum's centre on the grid ``(spatial_size, affine)``
    (:func:`scripts.projections.template_centre`, clamped as the projection clamps it; ``affine=None`` assumes the
    MNI 2 mm field of view).

    Raises:
        InputError: a ``"template"`` centre on a grid that does not hold the template striatum.
    """
    inner = getattr(getattr(projection, "transform", None), "transform", None)
    if not isinstance(inner, AdjacentSlices):
        return None
    half = inner.num_slices // 2
    planes: dict[int, list[int]] = {}
    for view in inner.views:
        centre = inner.centre[view] if isinstance(inner.centre, dict) else inner.centre
        axis = VIEW_AXIS[view]
        if centre == "template":
            centre = min(max(template_centre(spatial_size, view, affine), half), int(spatial_size[axis]) - 1 - half)
        if isinstance(centre, str) or isinstance(centre, bool) or not isinstance(centre, int):
            return None
        if not half <= centre <= int(spatial_size[axis]) - 1 - half:
            return None  # out of range: the full chain raises the projection's own error
        planes.setdefault(axis, [])
        planes[axis] = sorted(set(planes[axis]) | set(range(centre - half, centre + half + 1)))
    return planes


def _source_coordinates(size_in: int, size_out: int) -> torch.Tensor:
    """Input coordinate of each output index for ``align_corners=True``: ``i · (size_in − 1) / (size_out − 1)``."""
    if size_out == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.arange(size_out, dtype=torch.float64) * ((size_in - 1) / (size_out - 1))


def resample_planes(volume: torch.Tensor, axis: int, indices: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Planes ``indices`` along spatial ``axis`` of the trilinear (``align_corners=True``) resampling of ``volume``.

    Args:
        volume: ``(X, Y, Z)`` float tensor.
        axis: 0, 1 or 2.
        indices: plane indices in the resampled grid along ``axis``.
        size: the resampled grid ``(X', Y', Z')``.

    Returns:
        ``(len(indices), A', B')``: the planes, with the two other axes in their order.
    """
    moved = volume.movedim(axis, 0)
    coords = _source_coordinates(moved.shape[0], int(size[axis]))[list(indices)]
    lower = coords.floor().long().clamp(max=moved.shape[0] - 1)
    upper = (lower + 1).clamp(max=moved.shape[0] - 1)
    weight = (coords - lower).to(volume.dtype)[:, None, None]
    blended = moved[lower] * (1 - weight) + moved[upper] * weight
    in_plane = [int(s) for i, s in enumerate(size) if i != axis]
    return nnf.interpolate(blended[:, None], size=in_plane, mode="bilinear", align_corners=True)[:, 0]


def _trilinear_at(volume: torch.Tensor, points: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Values of the trilinear resampling of ``volume`` (``align_corners=True``, grid ``size``) at integer grid
    ``points`` ``(N, 3)``, evaluated in float64."""
    lows, highs, weights = [], [], []
    for axis in range(3):
        coords = _source_coordinates(volume.shape[axis], int(size[axis]))[points[:, axis]]
        low = coords.floor().long().clamp(max=volume.shape[axis] - 1)
        lows.append(low)
        highs.append((low + 1).clamp(max=volume.shape[axis] - 1))
        weights.append(coords - low)
    out = torch.zeros(points.shape[0], dtype=torch.float64)
    for cx in (0, 1):
        for cy in (0, 1):
            for cz in (0, 1):
                idx = [(highs[a] if c else lows[a]) for a, c in enumerate((cx, cy, cz))]
                w = [(weights[a] if c else 1 - weights[a]) for a, c in enumerate((cx, cy, cz))]
                out += volume[idx[0], idx[1], idx[2]].to(torch.float64) * w[0] * w[1] * w[2]
    return out


@functools.lru_cache(maxsize=32)
def _cells_of(size_in: int, size_out: int) -> torch.Tensor:
    """``(size_in, m)``: for each input index ``j``, the output indices whose interpolation cell
    ``{floor(u), floor(u) + 1}`` holds ``j`` (``u`` the output's input coordinate), padded with ``-1``."""
    low = _source_coordinates(size_in, size_out).floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    outs: list[set[int]] = [set() for _ in range(size_in)]
    for i, (a, b) in enumerate(zip(low.tolist(), high.tolist())):
        outs[a].add(i)
        outs[b].add(i)
    width = max(len(o) for o in outs)
    return torch.tensor([sorted(o) + [-1] * (width - len(o)) for o in outs], dtype=torch.long)


def _candidates(voxels: torch.Tensor, shape: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The grid points ``(M, 3)`` whose interpolation cell holds one of the input ``voxels`` ``(N, 3)``."""
    per_axis = [_cells_of(int(shape[a]), int(size[a]))[voxels[:, a]] for a in range(3)]  # (N, m_a)
    n = voxels.shape[0]
    i = per_axis[0][:, :, None, None].expand(n, per_axis[0].shape[1], per_axis[1].shape[1], per_axis[2].shape[1])
    j = per_axis[1][:, None, :, None].expand_as(i)
    k = per_axis[2][:, None, None, :].expand_as(i)
    valid = (i >= 0) & (j >= 0) & (k >= 0)
    yz = int(size[1]) * int(size[2])
    flat = torch.unique(i[valid] * yz + j[valid] * int(size[2]) + k[valid])
    return torch.stack([flat // yz, (flat // int(size[2])) % int(size[1]), flat % int(size[2])], dim=1)


def _beyond(volume: torch.Tensor, bound: float, above: bool) -> torch.Tensor:
    """``(N, 3)`` indices of the voxels of ``volume`` above (below) ``bound``, searched column by column: the
    columns along the last axis whose extremum passes the bound first (a reduction), then only inside those."""
    column = volume.amax(dim=2) if above else volume.amin(dim=2)
    columns = (column > bound if above else column < bound).nonzero()
    values = volume[columns[:, 0], columns[:, 1]]
    hits = (values > bound if above else values < bound).nonzero()
    return torch.cat([columns[hits[:, 0]], hits[:, 1:]], dim=1)


def grid_extrema(
    volume: torch.Tensor, size: Sequence[int], low: float, high: float, max_candidates: int = MAX_CANDIDATES
) -> tuple[float, float] | None:
    """Exact minimum and maximum of the trilinear (``align_corners=True``) resampling of ``volume`` to ``size``.

    ``low`` / ``high`` are values of the resampled grid already known (e.g. the extrema of some of its planes), so
    the true minimum is at most ``low`` and the maximum at least ``high``. Every resampled voxel is a convex
    combination of the 8 input voxels of its cell, so it can exceed ``high`` only if one of them does: only the
    grid voxels whose cell holds an input voxel above ``high`` (below ``low``) are evaluated.

    Args:
        volume: ``(X, Y, Z)`` input.
        size: the resampled grid.
        low: a value of the resampled grid (an upper bound of its minimum).
        high: a value of the resampled grid (a lower bound of its maximum).
        max_candidates: give up (return ``None``) when more input voxels than this lie beyond the bounds.

    Returns:
        ``(minimum, maximum)``, or ``None`` when there are too many candidates.
    """
    extrema = [low, high]
    vmin, vmax = (float(v) for v in torch.aminmax(volume))
    for n, outside in enumerate((vmin < low, vmax > high)):
        if not outside:  # no input voxel beyond the bound: no grid voxel either
            continue
        voxels = _beyond(volume, low, above=False) if n == 0 else _beyond(volume, high, above=True)
        if voxels.shape[0] == 0:
            continue
        if voxels.shape[0] > max_candidates:
            return None
        values = _trilinear_at(volume, _candidates(voxels, volume.shape, size), size)
        extrema[n] = min(low, float(values.min())) if n == 0 else max(high, float(values.max()))
    return extrema[0], extrema[1]


def _resized_affine(affine: torch.Tensor, shape: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The affine ``Resize`` gives a grid resampled with ``align_corners=True``: the corner voxels keep their
    position and the voxel axes are scaled by ``(n_in − 1) / (n_out − 1)``."""
    scale = [(int(a) - 1) / (int(b) - 1) for a, b in zip(shape, size)]
    out = affine.clone().to(torch.float64)
    out[:3, :3] = out[:3, :3] * torch.tensor(scale, dtype=torch.float64)[None, :]
    return out


class PartialPreprocessing(Compose):
    """The preprocessing chain, computing only the planes of the working grid that the projection reads.

    ``transforms`` is the bundle's chain, ``volume_transforms + [projection_transform]``. When it ends with
    ``Resized`` (trilinear, ``align_corners=True``) → :class:`scripts.transforms.IntensityNormalized` (``minmax``) →
    ``EnsureTyped`` (optional) → :class:`scripts.projections.Projectiond` reading fixed planes
    (:func:`planes_read_by`), and ``enabled`` is true, a call runs the transforms before ``Resized`` (load, checks,
    orientation), resamples only the planes read (:func:`resample_planes`), normalises them with the exact
    extrema of the whole resampled grid (:func:`grid_extrema`; the whole grid is resampled when they cannot be had
    cheaply), and gives the projection a ``MetaTensor`` of the working grid that holds those planes (zeros
    elsewhere) with the metadata that ``Resized`` would have produced. Otherwise the chain runs as written.

    Args:
        transforms: the preprocessing transforms, in order.
        enabled: use the partial path when the chain allows it.
        kwargs: other ``Compose`` arguments.

    Attributes:
        partial: whether calls take the partial path.
        planes: ``{axis: [plane indices]}`` read by the projection (partial path), else ``None``.
    """

    def __init__(self, transforms: Sequence[Any], enabled: bool = True, **kwargs: Any) -> None:
        super().__init__(transforms, **kwargs)
        self.planes: dict[int, list[int]] | None = None
        self._tail_start = None
        chain = list(self.transforms)
        for i, t in enumerate(chain):
            if isinstance(t, Resized):
                self._configure(chain, i)
                break
        self.partial = parse_bool(enabled, "partial_resampling") and self.planes is not None

    def _configure(self, chain: list, start: int) -> None:
        tail = chain[start:]
        if len(tail) == 4 and isinstance(tail[2], EnsureTyped):
            tail = [tail[0], tail[1], tail[3]]
        if len(tail) != 3 or not isinstance(tail[1], IntensityNormalized) or not isinstance(tail[2], Projectiond):
            return
        resize, normalize, projection = tail
        keys = list(resize.keys)
        if len(keys) != 1 or list(normalize.keys) != keys or list(projection.keys) != keys:
            return
        resizer = resize.resizer
        mode = resize.mode[0] if isinstance(resize.mode, (list, tuple)) else resize.mode
        corners = resize.align_corners[0] if isinstance(resize.align_corners, (list, tuple)) else resize.align_corners
        size = resizer.spatial_size
        aliasing = resize.anti_aliasing[0] if isinstance(resize.anti_aliasing, (list, tuple)) else resize.anti_aliasing
        if str(mode) != "trilinear" or corners is not True or aliasing or resizer.size_mode != "all":
            return
        if not isinstance(size, Sequence) or len(size) != 3 or any(int(s) < 2 for s in size):
            return
        if normalize.normalize.mode != "minmax":
            return
        try:
            planes = planes_read_by(projection, size)
        except InputError:  # the grid has no template striatum: the full chain reports it per scan
            return
        if planes is None:
            return
        self.planes, self.key, self.size = planes, keys[0], tuple(int(s) for s in size)
        self.projection = projection
        centre = getattr(projection.transform.transform, "centre", None)
        self.per_scan_planes = "template" in (centre.values() if isinstance(centre, dict) else [centre])
        self.eps = float(normalize.normalize.eps)
        self._tail_start = start
        self._after = chain[start + 2 :]  # EnsureTyped (if any) and the projection

    def __call__(self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy=None):
        if not self.partial or start != 0 or end is not None:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        data = super().__call__(input_, start=0, end=self._tail_start, threading=threading, lazy=lazy)
        return self._partial(data)

    def _partial(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.key]
        volume = (image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image))[0].float()
        affine = _resized_affine(image.affine, volume.shape, self.size) if isinstance(image, MetaTensor) else None
        planes = self.planes
        if self.per_scan_planes:  # template centres depend on the scan's grid
            try:
                planes = planes_read_by(self.projection, self.size, affine)
            except InputError:  # not in MNI space: the full chain raises the projection's error, naming the file
                return super().__call__(d, start=self._tail_start)
        grid = torch.zeros((1, *self.size), dtype=torch.float32)
        computed = {a: resample_planes(volume, a, idx, self.size) for a, idx in planes.items()}
        lo = min(float(p.min()) for p in computed.values())
        hi = max(float(p.max()) for p in computed.values())
        extrema = grid_extrema(volume, self.size, lo, hi)
        if extrema is None:  # many candidates: the whole grid
            full = nnf.interpolate(volume[None, None], size=self.size, mode="trilinear", align_corners=True)[0, 0]
            extrema = (float(full.min()), float(full.max()))
        lo, hi = extrema
        for axis, indices in planes.items():
            values = computed[axis]
            values = (values - lo) / (hi - lo) if hi - lo > self.eps else values * 0
            grid[0].movedim(axis, 0)[indices] = values
        if isinstance(image, MetaTensor):
            meta = dict(image.meta)
            meta[MetaKeys.AFFINE] = affine
            meta[MetaKeys.SPATIAL_SHAPE] = torch.tensor(self.size)
            grid = MetaTensor(grid, meta=meta)
        d[self.key] = grid
        for t in self._after:
            d = t(d)
        return d
