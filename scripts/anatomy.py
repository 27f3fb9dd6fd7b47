# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Analytic (atlas-free) striatal anatomy in MNI millimetre coordinates.

Every structure is a closed-form shape, so the anatomy can be evaluated at *any* world point: on the MNI 2 mm
grid, on a resampled 64³ grid, or at the pose-transformed coordinates of a synthetic subject. World
coordinates follow MNI/RAS: ``+x`` = right, ``+y`` = anterior, ``+z`` = superior. The left hemisphere is at
``x < 0``.

Shapes (sizes and positions follow the AAL3 striatal labels, see ``docs/calibration.md``):

* **Caudate**: a tapered tube swept along a smooth curved centreline through
  ``(±11, 20, 2) -> (±13, 8, 12) -> (±17, -8, 20) -> (±20, -24, 18)`` mm, radius 8 mm at the head tapering
  linearly to 2.5 mm at the tail (about 6 ml per side).
* **Putamen**: an ellipsoid centred at ``(±26, 2, 0)`` mm with semi-axes 21 mm (antero-posterior) x 12 mm
  (supero-inferior) x 7.5 mm (medio-lateral), about 7.9 ml. Its long axis is rotated in the axial plane so
  that the posterior pole lies 18 degrees more lateral, and tilted 14 degrees so that it is higher
  posteriorly. Voxels shared with the caudate belong to the caudate.
* **Anterior / posterior putamen**: split by the anterior-commissure plane ``y = 0`` mm.
* **Brain**: an ellipsoid centred at ``(0, -18, 8)`` mm with semi-axes ``(68, 88, 66)`` mm; the **head** adds
  an 8 mm extracerebral layer around it.
* **Occipital reference**: a cortical shell of the brain (4-22 mm below the brain surface) restricted to
  ``-107 <= y <= -44`` mm and ``-16 <= z <= 36`` mm, far from the striatum.

Each striatal structure also carries a normalised antero-posterior coordinate ``t`` in ``[0, 1]``
(0 = posterior end, 1 = anterior end) used by the phantom's disease gradient: for the putamen it is the
position along the ellipsoid's long axis, for the caudate the arc length along the centreline (1 at the head,
0 at the tail).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MNI_2MM_SHAPE",
    "MNI_2MM_AFFINE",
    "ROI_NAMES",
    "STRIATAL_STRUCTURES",
    "SIDES",
    "EllipsoidStructure",
    "TubeStructure",
    "striatal_structures",
    "brain_ellipsoid",
    "head_ellipsoid",
    "world_coordinates",
    "resized_affine",
    "occipital_region",
    "striatal_distances",
    "evaluate_rois",
    "template_rois",
    "roi_mean_ap_position",
]

#: Shape of the MNI152 2 mm grid used by processed PPMI DaTscan volumes.
MNI_2MM_SHAPE: tuple[int, int, int] = (91, 109, 91)
#: Voxel -> world (mm) affine of the MNI152 2 mm grid, FSL convention (x flipped: voxel 0 is at x = +90 mm).
MNI_2MM_AFFINE: np.ndarray = np.array(
    [[-2.0, 0.0, 0.0, 90.0], [0.0, 2.0, 0.0, -126.0], [0.0, 0.0, 2.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
)
MNI_2MM_AFFINE.setflags(write=False)

#: Hemispheres: ``"L"`` at x < 0 mm, ``"R"`` at x > 0 mm.
SIDES: tuple[str, str] = ("L", "R")
#: Striatal structures with a disease gradient, per hemisphere.
STRIATAL_STRUCTURES: tuple[str, ...] = ("caudate_L", "caudate_R", "putamen_L", "putamen_R")
#: Keys returned by :func:`template_rois` / :func:`evaluate_rois`.
ROI_NAMES: tuple[str, ...] = (
    "caudate_L",
    "caudate_R",
    "putamen_L",
    "putamen_R",
    "putamen_ant_L",
    "putamen_ant_R",
    "putamen_post_L",
    "putamen_post_R",
    "striatum",
    "occipital",
    "brain",
)

# Occipital reference definition (template mm).
_OCC_Y_RANGE = (-107.0, -44.0)
_OCC_Z_RANGE = (-16.0, 36.0)
_OCC_DEPTH_RANGE = (4.0, 22.0)
_CHUNK = 32768
# The antero-posterior split of the putamen (anterior-commissure plane), in template mm.
AC_PLANE_Y: float = 0.0


def _as_points(points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points)
    if pts.dtype != np.float32:
        pts = pts.astype(np.float64, copy=False)
    if pts.shape[-1] != 3:
        raise ValueError(f"points must have a last dimension of size 3 (x, y, z in mm), got shape {pts.shape}.")
    return pts


@dataclass(frozen=True)
class EllipsoidStructure:
    """A rotated ellipsoid ``{p : |D^-1 A (p - c)| <= 1}``.

    Args:
        centre: ``(3,)`` centre ``c`` in mm.
        semi_axes: ``(3,)`` semi-axis lengths ``D`` in mm, ordered like ``axes``.
        axes: ``(3, 3)`` orthonormal rows ``A``; row 0 is the long (antero-posterior) axis and points anteriorly.
    """

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]

    def _local_components(self, points: np.ndarray) -> list[np.ndarray]:
        pts = _as_points(points)
        rel = [pts[..., i] - pts.dtype.type(self.centre[i]) for i in range(3)]
        if np.array_equal(np.asarray(self.axes), np.eye(3)):
            return rel
        return [sum(pts.dtype.type(self.axes[j][i]) * rel[i] for i in range(3)) for j in range(3)]

    def local(self, points: np.ndarray) -> np.ndarray:
        """Coordinates ``u = A (p - c)`` along ``axes`` relative to the centre, shape ``(..., 3)`` in mm."""
        return np.stack(self._local_components(points), axis=-1)

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """First-order signed distance ``f / |grad f|`` with ``f = |D^-1 u|^2 - 1`` (mm, negative inside).

        Exact on the surface and accurate to well under a voxel within a few mm of it, which is all that the
        rasterisation and anti-aliasing need.
        """
        u = self._local_components(points)
        inv_a2 = [1.0 / a**2 for a in self.semi_axes]
        u2 = [ui * ui for ui in u]
        f = u2[0] * inv_a2[0] + u2[1] * inv_a2[1] + u2[2] * inv_a2[2] - 1.0
        grad = 2.0 * np.sqrt(u2[0] * inv_a2[0] ** 2 + u2[1] * inv_a2[1] ** 2 + u2[2] * inv_a2[2] ** 2)
        return f / np.maximum(grad, 1e-6)

    def bounding_box(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned ``(low, high)`` corners (mm) enclosing the ellipsoid, grown by ``margin``."""
        half = np.sqrt(((np.asarray(self.axes) * np.asarray(self.semi_axes)[:, None]) ** 2).sum(axis=0))
        return np.asarray(self.centre) - half - margin, np.asarray(self.centre) + half + margin

    def ap_position(self, points: np.ndarray) -> np.ndarray:
        """Normalised position ``t = (u_0 / D_0 + 1) / 2`` along the long axis, clipped to ``[0, 1]``.

        0 is the posterior pole and 1 the anterior pole.
        """
        u0 = self._local_components(points)[0]
        return np.clip(0.5 * (u0 / self.semi_axes[0] + 1.0), 0.0, 1.0)


@dataclass(frozen=True)
class TubeStructure:
    """A tapered tube: the union of balls of radius ``r(s)`` centred on a polyline ``c(s)``.

    Args:
        centreline: ``(K, 3)`` densely sampled centreline in mm, from the anterior end (head) to the posterior
            end (tail).
        radii: ``(K,)`` radius at each centreline sample in mm.
    """

    centreline: tuple[tuple[float, float, float], ...]
    radii: tuple[float, ...]

    def _closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(signed distance, normalised arc length from the head)`` for ``points``."""
        pts = _as_points(points)
        flat = pts.reshape(-1, 3)
        c = np.asarray(self.centreline, dtype=np.float64)
        r = np.asarray(self.radii, dtype=np.float64)
        seg = c[1:] - c[:-1]  # (K-1, 3)
        seg_len2 = np.einsum("ki,ki->k", seg, seg)
        seg_len = np.sqrt(seg_len2)
        cum = np.concatenate([[0.0], np.cumsum(seg_len)])
        best_d = np.empty(flat.shape[0])
        best_s = np.empty(flat.shape[0])
        for start in range(0, flat.shape[0], _CHUNK):
            rel = flat[start : start + _CHUNK, None, :] - c[None, :-1, :]  # (n, K-1, 3)
            lam = np.clip(np.einsum("nki,ki->nk", rel, seg) / seg_len2, 0.0, 1.0)
            diff = rel - lam[..., None] * seg
            dist = np.sqrt(np.einsum("nki,nki->nk", diff, diff)) - (r[:-1] + lam * (r[1:] - r[:-1]))
            k = np.argmin(dist, axis=1)
            rows = np.arange(k.size)
            best_d[start : start + _CHUNK] = dist[rows, k]
            best_s[start : start + _CHUNK] = cum[k] + lam[rows, k] * seg_len[k]
        shape = pts.shape[:-1]
        return best_d.reshape(shape), (best_s / cum[-1]).reshape(shape)

    def bounding_box(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned ``(low, high)`` corners (mm) enclosing the tube, grown by ``margin``."""
        c = np.asarray(self.centreline)
        r = np.asarray(self.radii)[:, None]
        return (c - r).min(axis=0) - margin, (c + r).max(axis=0) + margin

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """Distance to the tube surface in mm (negative inside), ``min_s |p - c(s)| - r(s)``."""
        return self._closest(points)[0]

    def ap_position(self, points: np.ndarray) -> np.ndarray:
        """Normalised position ``t = 1 - s / S`` along the centreline: 1 at the head, 0 at the tail."""
        return 1.0 - self._closest(points)[1]

    def distance_and_position(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both :meth:`signed_distance` and :meth:`ap_position` in a single pass."""
        d, s = self._closest(points)
        return d, 1.0 - s


def _catmull_rom(control: np.ndarray, samples_per_span: int) -> np.ndarray:
    """Uniform Catmull-Rom spline through the ``control`` points, returned as ``(K, 3)`` samples."""
    pts = np.vstack([2 * control[0] - control[1], control, 2 * control[-1] - control[-2]])
    out = []
    for i in range(1, len(pts) - 2):
        p0, p1, p2, p3 = pts[i - 1], pts[i], pts[i + 1], pts[i + 2]
        last = i == len(pts) - 3
        for u in np.linspace(0.0, 1.0, samples_per_span + 1)[: None if last else -1]:
            u2, u3 = u * u, u * u * u
            out.append(
                0.5
                * (2 * p1 + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u2 + (-p0 + 3 * p1 - 3 * p2 + p3) * u3)
            )
    return np.asarray(out)


def _putamen_axes(side: str) -> tuple[tuple[float, float, float], ...]:
    """Orthonormal (antero-posterior, supero-inferior, medio-lateral) axes of the putamen on ``side``."""
    yaw, tilt = np.deg2rad(18.0), np.deg2rad(14.0)
    medial = 1.0 if side == "L" else -1.0  # direction of +x that points medially
    # Going anteriorly the putamen moves medially and downwards (the posterior pole is lateral and high).
    e_ap = np.array([medial * np.sin(yaw) * np.cos(tilt), np.cos(yaw) * np.cos(tilt), -np.sin(tilt)])
    e_ml = np.cross(e_ap, [0.0, 0.0, 1.0])
    e_ml /= np.linalg.norm(e_ml)
    e_si = np.cross(e_ml, e_ap)
    if e_si[2] < 0:
        e_si = -e_si
    return tuple(tuple(float(v) for v in e) for e in (e_ap, e_si, e_ml))


@functools.lru_cache(maxsize=1)
def striatal_structures() -> dict[str, EllipsoidStructure | TubeStructure]:
    """The four template striatal structures, keyed ``caudate_L``, ``caudate_R``, ``putamen_L``, ``putamen_R``."""
    out: dict[str, EllipsoidStructure | TubeStructure] = {}
    control = np.array([[11.0, 20.0, 2.0], [13.0, 8.0, 12.0], [17.0, -8.0, 20.0], [20.0, -24.0, 18.0]])
    line = _catmull_rom(control, samples_per_span=8)
    seg_len = np.linalg.norm(np.diff(line, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg_len)]) / seg_len.sum()
    radii = 8.0 + (2.5 - 8.0) * s
    for side in SIDES:
        sign = -1.0 if side == "L" else 1.0
        pts = line * np.array([sign, 1.0, 1.0])
        out[f"caudate_{side}"] = TubeStructure(
            centreline=tuple(tuple(float(v) for v in p) for p in pts), radii=tuple(float(r) for r in radii)
        )
        out[f"putamen_{side}"] = EllipsoidStructure(
            centre=(sign * 26.0, 2.0, 0.0), semi_axes=(21.0, 12.0, 7.5), axes=_putamen_axes(side)
        )
    return out


def brain_ellipsoid() -> EllipsoidStructure:
    """The template brain: ellipsoid centred at (0, -18, 8) mm, semi-axes (68, 88, 66) mm along x, y, z."""
    return EllipsoidStructure(
        centre=(0.0, -18.0, 8.0), semi_axes=(68.0, 88.0, 66.0), axes=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    )


def head_ellipsoid() -> EllipsoidStructure:
    """The template head: the brain ellipsoid grown by an 8 mm extracerebral layer."""
    b = brain_ellipsoid()
    return EllipsoidStructure(centre=b.centre, semi_axes=tuple(a + 8.0 for a in b.semi_axes), axes=b.axes)


def occipital_region(points: np.ndarray) -> np.ndarray:
    """Boolean occipital reference membership at ``points`` ``(..., 3)`` (template mm).

    A cortical shell: 4-22 mm below the brain surface, ``-107 <= y <= -44`` mm and ``-16 <= z <= 36`` mm.
    """
    pts = _as_points(points)
    depth = -brain_ellipsoid().signed_distance(pts)
    y, z = pts[..., 1], pts[..., 2]
    return (
        (depth >= _OCC_DEPTH_RANGE[0])
        & (depth <= _OCC_DEPTH_RANGE[1])
        & (y >= _OCC_Y_RANGE[0])
        & (y <= _OCC_Y_RANGE[1])
        & (z >= _OCC_Z_RANGE[0])
        & (z <= _OCC_Z_RANGE[1])
    )


def striatal_distances(
    points: np.ndarray, margin: float = 4.0, names: Sequence[str] = STRIATAL_STRUCTURES
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Signed distance and antero-posterior coordinate of every striatal structure at ``points``.

    Only points inside each structure's bounding box grown by ``margin`` mm are evaluated (the structures fill
    a few per cent of a brain volume, so this is what makes whole-grid evaluation fast).

    Args:
        points: ``(..., 3)`` world coordinates in mm (template space).
        margin: points further than this (per axis) from a structure's bounding box are not evaluated.
        names: the structures to evaluate, a subset of :data:`STRIATAL_STRUCTURES`.

    Returns:
        ``{structure: (signed distance in mm, t in [0, 1])}`` for each of ``names``, arrays of shape
        ``points.shape[:-1]``. Unevaluated points get distance ``+inf`` (they lie more than ``margin`` mm
        outside) and ``t = 0``.
    """
    pts = _as_points(points)
    flat = pts.reshape(-1, 3)
    structs = striatal_structures()
    unknown = sorted(set(names) - set(structs))
    if unknown:
        raise ValueError(f"unknown striatal structure(s) {unknown}; expected names from {STRIATAL_STRUCTURES}.")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        struct = structs[name]
        low, high = struct.bounding_box(margin)
        inside = np.all((flat >= low) & (flat <= high), axis=1)
        dist = np.full(flat.shape[0], np.inf)
        pos = np.zeros(flat.shape[0])
        sub = flat[inside]
        if isinstance(struct, TubeStructure):
            dist[inside], pos[inside] = struct.distance_and_position(sub)
        else:
            dist[inside], pos[inside] = struct.signed_distance(sub), struct.ap_position(sub)
        out[name] = (dist.reshape(pts.shape[:-1]), pos.reshape(pts.shape[:-1]))
    return out


def evaluate_rois(points: np.ndarray) -> dict[str, np.ndarray]:
    """Evaluate every template ROI at arbitrary world points.

    Args:
        points: ``(..., 3)`` world coordinates in mm (template / MNI space).

    Returns:
        ``{name: bool array of shape points.shape[:-1]}`` for every name in :data:`ROI_NAMES`. The putamen
        excludes voxels that also lie in the caudate; ``putamen_ant_*`` / ``putamen_post_*`` split it at
        ``y = 0`` mm (anterior: ``y >= 0``); ``striatum`` is the union of caudate and putamen on both sides.
    """
    pts = _as_points(points)
    dist = striatal_distances(pts, margin=1.0)
    rois: dict[str, np.ndarray] = {}
    caud_any = np.zeros(pts.shape[:-1], dtype=bool)
    for side in SIDES:
        rois[f"caudate_{side}"] = dist[f"caudate_{side}"][0] <= 0.0
        caud_any |= rois[f"caudate_{side}"]
    anterior = pts[..., 1] >= AC_PLANE_Y
    for side in SIDES:
        put = (dist[f"putamen_{side}"][0] <= 0.0) & ~caud_any
        rois[f"putamen_{side}"] = put
        rois[f"putamen_ant_{side}"] = put & anterior
        rois[f"putamen_post_{side}"] = put & ~anterior
    rois["striatum"] = caud_any | rois["putamen_L"] | rois["putamen_R"]
    rois["occipital"] = occipital_region(pts)
    rois["brain"] = brain_ellipsoid().signed_distance(pts) <= 0.0
    return {k: rois[k] for k in ROI_NAMES}


def world_coordinates(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of every voxel centre.

    Args:
        shape: spatial shape ``(X, Y, Z)``.
        affine: ``(4, 4)`` voxel -> world affine.

    Returns:
        ``(X, Y, Z, 3)`` float64 array, ``world[i, j, k] = affine @ (i, j, k, 1)``.
    """
    shape = tuple(int(s) for s in shape)
    aff = np.asarray(affine, dtype=np.float64)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (X, Y, Z), got {shape}.")
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 voxel-to-world matrix, got shape {aff.shape}.")
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def resized_affine(
    affine: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int], align_corners: bool = True
) -> np.ndarray:
    """Affine of a volume of ``in_shape`` resampled to ``out_shape`` over the same field of view.

    With ``align_corners=True`` (the reference pipeline's ``linspace(0, n - 1, m)`` sampling) the first and
    last voxel centres are kept: output voxel ``j`` sits at input voxel ``j (n - 1) / (m - 1)``. With
    ``align_corners=False`` the outer voxel edges are kept: ``(j + 0.5) n / m - 0.5``.

    Returns:
        ``(4, 4)`` float64 voxel -> world affine of the resampled grid.
    """
    aff = np.asarray(affine, dtype=np.float64)
    n = np.asarray(in_shape, dtype=np.float64)
    m = np.asarray(out_shape, dtype=np.float64)
    if aff.shape != (4, 4) or n.shape != (3,) or m.shape != (3,):
        raise ValueError(
            f"expected a 4x4 affine and two 3-element shapes, got {aff.shape}, {tuple(in_shape)}, {tuple(out_shape)}."
        )
    if align_corners:
        scale = np.where(m > 1, (n - 1) / np.maximum(m - 1, 1), 1.0)
        offset = np.zeros(3)
    else:
        scale = n / m
        offset = 0.5 * scale - 0.5
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = offset
    return aff @ index_map


def _grid_key(shape: Sequence[int], affine: np.ndarray) -> tuple:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 voxel-to-world matrix, got shape {aff.shape}.")
    return tuple(int(s) for s in shape), tuple(np.round(aff, 6).ravel().tolist())


@functools.lru_cache(maxsize=16)
def _template_rois_cached(shape: tuple[int, ...], affine_key: tuple[float, ...]) -> dict[str, np.ndarray]:
    affine = np.asarray(affine_key, dtype=np.float64).reshape(4, 4)
    rois = evaluate_rois(world_coordinates(shape, affine))
    for mask in rois.values():
        mask.setflags(write=False)
    return rois


def template_rois(shape: Sequence[int] = MNI_2MM_SHAPE, affine: np.ndarray = MNI_2MM_AFFINE) -> dict[str, np.ndarray]:
    """Boolean template ROIs on the grid ``(shape, affine)``; cached per grid.

    Args:
        shape: spatial shape ``(X, Y, Z)`` of the grid, default the MNI 2 mm grid ``(91, 109, 91)``.
        affine: ``(4, 4)`` voxel -> world affine of the grid (e.g. :func:`resized_affine` for a 64³ resample).

    Returns:
        ``{name: read-only bool array (X, Y, Z)}`` for every name in :data:`ROI_NAMES`.
    """
    shape_key, affine_key = _grid_key(shape, affine)
    if len(shape_key) != 3 or min(shape_key) < 1:
        raise ValueError(f"shape must be three positive sizes (X, Y, Z), got {shape_key}.")
    return _template_rois_cached(shape_key, affine_key)


@functools.lru_cache(maxsize=1)
def roi_mean_ap_position(spacing_mm: float = 1.0) -> dict[str, float]:
    """Mean antero-posterior coordinate ``t`` of each striatal ROI's template voxels (sampled at ``spacing_mm``).

    A disease loss that is linear in ``t`` therefore has the ROI-mean value ``loss(mean t)``; the phantom
    uses this to report each region's true (pre partial-volume) binding exactly.

    Returns:
        ``{roi: mean t}`` for the caudate, putamen and anterior/posterior putamen ROIs of both sides.
    """
    axis = np.arange(-60.0, 60.0 + spacing_mm / 2, spacing_mm)
    pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    pts = pts[
        (np.abs(pts[:, 0]) <= 50) & (pts[:, 1] >= -45) & (pts[:, 1] <= 45) & (pts[:, 2] >= -30) & (pts[:, 2] <= 40)
    ]
    rois = evaluate_rois(pts)
    dist = striatal_distances(pts, margin=1.0)
    out: dict[str, float] = {}
    for side in SIDES:
        for name in (f"caudate_{side}", f"putamen_{side}", f"putamen_ant_{side}", f"putamen_post_{side}"):
            t = dist[f"caudate_{side}" if name.startswith("caudate") else f"putamen_{side}"][1]
            out[name] = float(t[rois[name]].mean())
    return out
