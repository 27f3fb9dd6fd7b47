# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Rendering a phantom subject's visit to a volume on the MNI grid.

    activity(p) = e * head(q) + (1 - e) * brain(q) + sum_s frac_s(q) * BP_s(t_s(q)),   q = pose^-1(p)
    counts      = Poisson(c * (G_fwhm * activity))
    volume      = k * (G_post * counts)

with ``e`` the extracerebral uptake, ``frac_s`` the anti-aliased membership of striatal structure ``s``,
``BP_s(t)`` its true specific binding (background brain = 1) at the normalised antero-posterior position
``t`` (:mod:`scripts.synthetic.subjects`), ``c`` the counts per background voxel, ``G`` Gaussian kernels and ``k``
the global intensity scale.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from scripts.anatomy import (
    MNI_2MM_AFFINE,
    MNI_2MM_SHAPE,
    SIDES,
    brain_ellipsoid,
    head_ellipsoid,
    striatal_distances,
    striatal_structures,
    world_coordinates,
)
from scripts.synthetic.subjects import PhantomSubject, _local_loss, _structure_parameters, dorsal_position

# Reference voxel volume (mm^3) for the counts-per-voxel parameter: one voxel of the MNI 2 mm grid.
_REFERENCE_VOXEL_MM3 = 8.0
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
# Per-hemisphere centre (mm) about which a subject's striatal size is scaled, so that the striatum stays put.
_STRIATAL_SCALE_CENTRE = {"L": np.array([-20.0, 4.0, 6.0]), "R": np.array([20.0, 4.0, 6.0])}


def _rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _fast_length(n: int) -> int:
    """Smallest 2-3-5-smooth integer >= ``n`` (efficient FFT length)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def gaussian_blur(volume: np.ndarray, sigma_vox: Sequence[float] | float, truncate: float = 4.0) -> np.ndarray:
    """Isotropic/anisotropic Gaussian blur of a 3-D volume by FFT, with zero padding (no wrap-around).

    ``out = irfftn(rfftn(pad(v)) * prod_d exp(-2 pi^2 sigma_d^2 f_d^2))`` cropped back to ``volume.shape``; each axis
    is zero-padded by at least ``truncate * sigma_d`` voxels to an FFT-friendly length, so the result matches a
    linear convolution with a Gaussian of standard deviation ``sigma_d`` voxels up to ``exp(-truncate^2 / 2)``.

    Args:
        volume: ``(X, Y, Z)`` array.
        sigma_vox: standard deviation in voxels, one value or one per axis; 0 leaves an axis untouched.
        truncate: minimum zero padding per axis, in standard deviations.

    Returns:
        float32 ``(X, Y, Z)`` array.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D (X, Y, Z), got shape {vol.shape}.")
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    if np.any(sig < 0):
        raise ValueError(f"sigma_vox must be non-negative, got {tuple(sig)}.")
    if not np.any(sig > 0):
        return vol.copy()
    padded = tuple(_fast_length(n + int(math.ceil(truncate * s)) + 1) for n, s in zip(vol.shape, sig))
    spec = np.fft.rfftn(vol, s=padded, axes=(0, 1, 2))
    gains = []
    for d, (m, s) in enumerate(zip(padded, sig)):
        f = np.fft.rfftfreq(m) if d == 2 else np.fft.fftfreq(m)
        gains.append(np.exp(-2.0 * (np.pi * s * f) ** 2).astype(np.float32))
    spec *= gains[0][:, None, None]
    spec *= gains[1][None, :, None]
    spec *= gains[2][None, None, :]
    out = np.fft.irfftn(spec, s=padded, axes=(0, 1, 2))
    return np.ascontiguousarray(out[: vol.shape[0], : vol.shape[1], : vol.shape[2]], dtype=np.float32)


_GRID_CACHE: dict = {}


def _grid_cache(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    key = (shape, tuple(np.round(np.asarray(affine, dtype=np.float64), 6).ravel().tolist()))
    cached = _GRID_CACHE.get(key)
    if cached is None:
        world = world_coordinates(shape, affine).reshape(-1, 3).astype(np.float32)
        spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
        cached = (world, spacing)
        _GRID_CACHE.clear()
        _GRID_CACHE[key] = cached
    return cached


def _in_box(points: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: rows of ``points`` ``(N, 3)`` inside the axis-aligned box ``[low, high]``."""
    inside = (points[:, 0] >= low[0]) & (points[:, 0] <= high[0])
    for d in (1, 2):
        inside &= (points[:, d] >= low[d]) & (points[:, d] <= high[d])
    return inside


def _membership(distance: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased occupancy ``clip(0.5 - d / width, 0, 1)`` of a voxel whose centre is ``d`` mm from a surface."""
    return np.clip(0.5 - distance / width, 0.0, 1.0)


def activity_map(
    subject: PhantomSubject, visit: int = 0, shape: Sequence[int] = MNI_2MM_SHAPE, affine: np.ndarray = MNI_2MM_AFFINE
) -> np.ndarray:
    """Noise-free, unblurred activity (background brain = 1) of a visit on the grid ``(shape, affine)``.

    Every voxel centre ``p`` is mapped to template space by the visit's inverse pose ``q = R^T (p - t) / s`` and,
    for the striatum, by the subject's size factor about a per-hemisphere centre; shapes are anti-aliased with
    ``clip(0.5 - d / voxel, 0, 1)`` of the signed distance ``d``.

    Args:
        subject: from :func:`sample_subject`.
        visit: 0-based visit index.
        shape: grid shape ``(X, Y, Z)``.
        affine: ``(4, 4)`` voxel -> world (MNI mm) affine of the grid.

    Returns:
        float32 ``(X, Y, Z)`` array: extracerebral layer ``e``, brain 1, striatum ``1 + BP(t)``.
    """
    if isinstance(visit, bool) or not isinstance(visit, (int, np.integer)) or not 0 <= visit < len(subject.visits):
        raise ValueError(
            f"visit must be an int in [0, {len(subject.visits)}) for {subject.subject_id}, got {visit!r} "
            "(the modality is part of the subject's config)."
        )
    shape = tuple(int(s) for s in shape)
    world, spacing = _grid_cache(shape, affine)
    acq, lat = subject.visits[visit], subject.latents
    width = float(spacing.mean())
    # Template coordinates of every voxel centre: q = R^T (p - t) / s.
    rot = _rotation_matrix(acq.rotation_deg)
    inv = rot / acq.scale  # q_j = sum_i (p_i - t_i) R_ij / s, written per column (much faster than an (N, 3) matmul)
    rel = [world[:, i] - np.float32(acq.translation_mm[i]) for i in range(3)]
    q_all = np.empty_like(world)
    for j in range(3):
        q_all[:, j] = rel[0] * np.float32(inv[0, j]) + rel[1] * np.float32(inv[1, j]) + rel[2] * np.float32(inv[2, j])
    act = np.zeros(world.shape[0], dtype=np.float32)
    head = head_ellipsoid()
    low, high = head.bounding_box(2.0 * width)
    in_box = _in_box(q_all, low, high)
    q = np.compress(in_box, q_all, axis=0)
    head_frac = _membership(acq.scale * head.signed_distance(q), width)
    brain_frac = _membership(acq.scale * brain_ellipsoid().signed_distance(q), width)
    values = lat.extracerebral * head_frac + (1.0 - lat.extracerebral) * brain_frac
    params = _structure_parameters(subject, visit)
    s_anat = lat.anatomical_scale
    structs = striatal_structures()
    # Only voxels near the (scaled) striatum need the structure geometry.
    corners = []
    for name, struct in structs.items():
        centre = _STRIATAL_SCALE_CENTRE[name[-1]]
        for corner in struct.bounding_box(2.0 * width):
            corners.append(centre + (corner - centre) * s_anat)
    corners = np.asarray(corners)
    near = np.flatnonzero(_in_box(q, corners.min(axis=0), corners.max(axis=0)))
    q_near = q[near].astype(np.float64)
    striatal = np.zeros(near.size)
    caud_frac = np.zeros(near.size)
    for kind in ("caudate", "putamen"):
        for side in SIDES:
            name = f"{kind}_{side}"
            centre = _STRIATAL_SCALE_CENTRE[side]
            native = centre + (q_near - centre) / s_anat
            dist, t = striatal_distances(native, margin=width, names=(name,))[name]
            frac = _membership(acq.scale * s_anat * dist, width)
            if kind == "caudate":
                caud_frac = caud_frac + frac
            else:
                frac = np.minimum(frac, np.clip(1.0 - caud_frac, 0.0, 1.0))
            p = params[name]
            h = dorsal_position(name, native) if lat.label == 1 and lat.dorsal_ventral else None
            striatal += frac * p["bp"] * (1.0 - _local_loss(p, t, h, lat, subject.config.max_loss))
    values[near] += striatal
    act[in_box] = values
    return act.reshape(shape)


def render_volume(
    subject: PhantomSubject,
    visit: int = 0,
    shape: Sequence[int] = MNI_2MM_SHAPE,
    affine: np.ndarray = MNI_2MM_AFFINE,
    rng: np.random.Generator | None = None,
    noise: bool = True,
) -> np.ndarray:
    """Render one scan of ``subject``: PSF blur, Poisson counts, light smoothing and global intensity.

    ``volume = k * G_post * Poisson(c' * G_fwhm * activity)`` with ``c' = counts * voxel_volume / 8 mm^3``. SPECT
    volumes are in counts (background about ``k * counts``); AV133 volumes are divided by ``c'`` (background about
    ``k``).

    Args:
        subject: from :func:`sample_subject`.
        visit: 0-based visit index.
        shape: output grid shape, default the MNI 2 mm grid ``(91, 109, 91)``.
        affine: ``(4, 4)`` voxel -> world affine of the output grid; any axis-aligned grid works.
        rng: generator for the Poisson noise; default ``default_rng(noise_seed)`` of the visit, so a subject always
            renders to the same volume.
        noise: ``False`` skips the Poisson noise (the expected volume).

    Returns:
        float32 ``(X, Y, Z)`` array.
    """
    shape = tuple(int(s) for s in shape)
    act = activity_map(subject, visit, shape, affine)
    _, spacing = _grid_cache(shape, affine)
    acq, cfg = subject.visits[visit], subject.config
    blurred = gaussian_blur(act, acq.fwhm_mm * _FWHM_TO_SIGMA / spacing)
    np.maximum(blurred, 0.0, out=blurred)
    counts = acq.counts * float(np.prod(spacing)) / _REFERENCE_VOXEL_MM3
    expected = blurred * np.float32(counts)
    if noise:
        if rng is None:
            rng = np.random.default_rng(acq.noise_seed)
        live = np.flatnonzero(expected.ravel() > 1e-3)
        noisy = np.zeros(expected.size, dtype=np.float32)
        noisy[live] = rng.poisson(expected.ravel()[live].astype(np.float64))
        expected = noisy.reshape(shape)
    out = gaussian_blur(expected, cfg.post_sigma_mm / spacing) if cfg.post_sigma_mm > 0 else expected
    scale = acq.intensity_scale / counts if cfg.per_count_units else acq.intensity_scale
    out *= np.float32(scale)
    return out


def _write_nifti(path: pathlib.Path, volume: np.ndarray, affine: np.ndarray, compresslevel: int = 1) -> None:
    """Write a non-negative ``volume`` as int16 with ``scl_slope = max / 32767`` and no intercept (0 stays 0)."""
    import nibabel as nib

    vol = np.maximum(np.asarray(volume, dtype=np.float32), 0.0)
    peak = float(vol.max())
    slope = peak / 32767.0 if peak > 0 else 1.0
    aff = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.round(vol / slope).astype(np.int16), aff)
    img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units("mm")
    img.set_qform(aff, code=4)  # 4 = MNI_152
    img.set_sform(aff, code=4)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0))  # byte-reproducible
    os.replace(tmp, path)
