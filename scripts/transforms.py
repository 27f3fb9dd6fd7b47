# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The bundle's own preprocessing transforms: checked loading, failure records for batch inference, intensity
normalisation.

The preprocessing chain itself is written out once, in ``configs/inference.json#volume_transforms``: load with
:class:`LoadScand` (clear errors for unusable files), RAS orientation, trilinear resize to the working grid,
:class:`IntensityNormalized`, float32. The training configs include it by macro. MONAI provides every other step;
what it lacks is a loader that refuses an implausible scan with the file's name and reason, a dataset that turns
one scan's failure into an error row instead of ending a batch run, and the occipital-reference normalisation of
DaTscan uptake ratios.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import look_up_option
from scripts.anatomy import MNI_2MM_SHAPE
from scripts.dicom import dicom_files
from scripts.errors import InputError
from scripts.options import parse_bool

__all__ = [
    "grid_problems",
    "intensity_problems",
    "dicom_series_problems",
    "LoadScand",
    "RecordFailuresDataset",
    "failure_record",
    "collate_with_failures",
    "FAILED_KEY",
    "WARNINGS_KEY",
    "INTENSITY_MODES",
    "IntensityNormalize",
    "IntensityNormalized",
    "Softmaxd",
]

logger = logging.getLogger(__name__)

MNI_SHAPE = MNI_2MM_SHAPE
"""The expected grid: MNI152 at 2 mm (what PPMI's processed DaTscan volumes use)."""
MNI_VOXEL_MM = 2.0
VOXEL_MM_RANGE = (1.0, 4.0)
"""Voxel sizes (mm) accepted without a warning."""
FOV_RATIO_RANGE = (0.7, 1.45)
"""Field of view per axis, as a fraction of the MNI grid's (182 x 218 x 182 mm), accepted without a warning."""
MIN_SIGNAL_FRACTION = 0.01
"""A volume with fewer voxels than this fraction above 5 % of its intensity range is near-empty."""
WARNINGS_KEY = "input_warnings"
"""Item key of the checks' warnings for a scan used despite them (``--allow_nonstandard_input true``)."""
ALLOW_HINT = "pass --allow_nonstandard_input true to use it anyway"


def _world_axes(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(voxel sizes, world axis of each voxel axis, worst alignment cosine)`` of a 4x4 voxel-to-world affine."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.sqrt((columns**2).sum(axis=0))
    unit = columns / np.where(sizes > 0, sizes, 1.0)
    axes = np.argmax(np.abs(unit), axis=0)
    alignment = float(np.min(np.max(np.abs(unit), axis=0))) if np.all(sizes > 0) else 0.0
    return sizes, axes, alignment


def grid_problems(shape: Sequence[int], affine: np.ndarray) -> list[str]:
    """Why a volume's grid is far from the MNI 91x109x91 2 mm grid (empty when it is close enough).

    Checks the voxel sizes (1-4 mm), the field of view per world axis (0.7-1.45 times MNI's 182 x 218 x 182 mm)
    and that the voxel axes are aligned with the world axes (not oblique, no two along one axis).
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    dims = "x".join(str(s) for s in shape)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        return [f"grid {dims} has no valid voxel-to-world affine (orientation and voxel size unknown)"]
    sizes, axes, alignment = _world_axes(affine)
    voxels = "x".join(f"{v:.3g}" for v in sizes)
    problems = []
    if not all(VOXEL_MM_RANGE[0] <= v <= VOXEL_MM_RANGE[1] for v in sizes):
        problems.append(f"voxels of {voxels} mm (expected about {MNI_VOXEL_MM:g} mm)")
    if alignment < 0.99 or len(set(axes.tolist())) != 3:
        problems.append("an oblique orientation (voxel axes not along the world axes)")
    else:
        fov = np.zeros(3)
        fov[axes] = np.asarray(shape, dtype=np.float64) * sizes
        expected = np.asarray(MNI_SHAPE, dtype=np.float64) * MNI_VOXEL_MM
        ratio = fov / expected
        if not np.all((ratio >= FOV_RATIO_RANGE[0]) & (ratio <= FOV_RATIO_RANGE[1])):
            fov_text = "x".join(f"{v:.0f}" for v in fov)
            problems.append(f"a field of view of {fov_text} mm (MNI: 182x218x182 mm)")
    if problems:
        problems[0] = f"grid {dims} with " + problems[0]
        problems[-1] += "; expected a scan registered to the MNI 91x109x91 grid of 2 mm voxels"
    return ["; ".join(problems)] if problems else []


def intensity_problems(volume: torch.Tensor) -> list[str]:
    """Why a volume holds no usable signal: constant (all-zero included) or near-empty."""
    x = volume.float()
    lo, hi = float(x.min()), float(x.max())
    if not hi - lo > 1e-6 * max(abs(hi), abs(lo), 1.0):
        return [f"the volume is {'empty (all voxels 0)' if hi == 0 == lo else f'constant (all voxels {lo:g})'}"]
    fraction = float(((x - lo) > 0.05 * (hi - lo)).float().mean())
    if fraction < MIN_SIGNAL_FRACTION:
        return [f"the volume is nearly empty (only {100 * fraction:.2g}% of voxels above 5% of its range)"]
    return []


def dicom_series_problems(folder: str | os.PathLike, n_slices: int) -> list[str]:
    """Why a DICOM series folder did not give a complete volume: unreadable or missing slices.

    Compares the slice files in ``folder`` with the ``n_slices`` slices ITK read, and the slice positions
    (ImagePositionPatient along the slice normal, when the files record them) with a regular spacing.
    """
    import itk

    folder = Path(folder)
    files = dicom_files(folder)
    problems = []
    io = itk.GDCMImageIO.New()
    unreadable, positions = [], []
    for path in files:
        io.SetFileName(str(path))
        try:
            io.ReadImageInformation()
        except RuntimeError:
            unreadable.append(path.name)
            continue
        meta = io.GetMetaDataDictionary()
        if meta.HasKey("0020|0032") and meta.HasKey("0020|0037"):
            try:
                ipp = [float(v) for v in str(meta["0020|0032"]).strip().split("\\")]
                iop = [float(v) for v in str(meta["0020|0037"]).strip().split("\\")]
                normal = np.cross(iop[:3], iop[3:6])
                positions.append(float(np.dot(ipp[:3], normal)))
            except (ValueError, IndexError):
                pass
    if unreadable:
        problems.append(
            f"{len(unreadable)} of {len(files)} slice files could not be read ({', '.join(unreadable[:3])}"
            f"{', ...' if len(unreadable) > 3 else ''}); the volume has {n_slices} slices"
        )
    elif n_slices < len(files):
        problems.append(f"the volume has {n_slices} slices but the folder holds {len(files)} slice files")
    if len(positions) >= 3 and len(positions) == len(files) - len(unreadable):
        steps = np.diff(np.sort(np.asarray(positions)))
        spacing = float(np.median(steps))
        if spacing <= 0 or np.any(steps < 0.5 * spacing):
            problems.append("slices share a position (duplicate slices)")
        elif np.any(steps > 1.5 * spacing):
            gaps = steps[steps > 1.5 * spacing]
            missing = int(sum(round(g / spacing) - 1 for g in gaps))
            problems.append(
                f"about {missing} slice(s) missing ({len(gaps)} gap(s), the largest {float(gaps.max()):g} mm; "
                f"slice spacing {spacing:g} mm)"
            )
    return problems


class LoadScand(MapTransform):
    """Load a 3D scan (NIfTI with nibabel, DICOM series folder with ITK) as a channel-first MetaTensor and check it.

    Always refused (``InputError`` naming the file): a file that cannot be read, non-finite values, fewer than 8
    voxels along an axis, a 4D image of several volumes when not allowed.

    Refused unless ``allow_nonstandard`` (then used, with the reasons in ``data[WARNINGS_KEY]`` and the log):

    * a grid far from the MNI 91x109x91 2 mm grid (voxel size, field of view, oblique orientation: see
      :func:`grid_problems`);
    * an empty, constant or near-empty volume (:func:`intensity_problems`);
    * a DICOM series with unreadable or missing slices (:func:`dicom_series_problems`);
    * a 4D image of several volumes (the first volume is used).

    ``data[WARNINGS_KEY]`` is ``""`` for a scan that passes every check.

    Args:
        keys: keys of the image paths.
        allow_nonstandard: use a nonstandard scan with a warning instead of refusing it.
        allow_missing_keys: as in MONAI.
    """

    def __init__(self, keys: KeysCollection, allow_nonstandard: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self._loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
        self.allow_nonstandard = parse_bool(allow_nonstandard, "allow_nonstandard_input")

    def _load(self, path: str) -> MetaTensor:
        try:
            return self._loader(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name and a short reason
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{path}: could not be read as a NIfTI file or DICOM series ({reason}).") from None

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        warnings: list[str] = []
        for key in self.key_iterator(d):
            path = d[key]
            if isinstance(path, (torch.Tensor, np.ndarray)):
                continue  # already loaded
            if not os.path.exists(str(path)):
                raise InputError(f"{path}: scan not found.")
            img = self._load(str(path))
            problems: list[str] = []
            if img.ndim == 5 and img.shape[-1] == 1:  # (C, X, Y, Z, 1) from some NIfTI writers
                img = img[..., 0]
            if img.ndim != 4:
                raise InputError(f"{path}: expected a single 3D volume, got an image of shape {_stored_shape(img)}.")
            if img.shape[0] != 1:
                shape = _stored_shape(img)
                if not self.allow_nonstandard:
                    raise InputError(
                        f"{path}: a 4D image of shape {shape} ({img.shape[0]} volumes); expected a single 3D volume. "
                        f"Save one volume per file, or {ALLOW_HINT} (the first volume)."
                    )
                problems.append(f"4D image of shape {shape}: only the first of {img.shape[0]} volumes used")
                img = img[:1]
            if min(img.shape[1:]) < 8:
                raise InputError(f"{path}: volume of shape {tuple(img.shape[1:])} is too small (< 8 voxels per axis).")
            if not torch.isfinite(img).all():
                raise InputError(f"{path}: the volume holds NaN or infinite values.")
            if os.path.isdir(str(path)):
                problems += dicom_series_problems(str(path), int(img.shape[-1]))
            problems += grid_problems(img.shape[1:], img.affine.numpy())
            problems += intensity_problems(img)
            if problems and not self.allow_nonstandard:
                raise InputError(f"{path}: {'; '.join(problems)}. Check the scan, or {ALLOW_HINT}.")
            for problem in problems:
                logger.warning(f"{path}: {problem} (used because of --allow_nonstandard_input).")
            warnings += problems
            d[key] = img
        d[WARNINGS_KEY] = "; ".join(warnings)
        return d


def _stored_shape(img: torch.Tensor) -> tuple[int, ...]:
    """The shape of the image as stored in the file (the channel axis of a loaded image last, as in NIfTI)."""
    shape = tuple(int(s) for s in img.shape)
    return shape[1:] + (shape[0],) if len(shape) > 1 and shape[0] != 1 else shape[1:]


def failure_record(data: Mapping[Hashable, Any], error: BaseException, image_key: str = "image") -> dict[str, str]:
    """``{"image": <path>, FAILED_KEY: <reason>}`` for a scan whose preprocessing raised ``error``; the reason is the
    :class:`InputError` message when the chain holds one, else the exception's first line."""
    from scripts.errors import find_input_error

    found = find_input_error(error)
    if found is not None:
        reason = str(found)
    else:
        first = (str(error).strip().splitlines() or [""])[0]
        reason = f"{type(error).__name__}: {first}"
    image = data.get(image_key, "") if isinstance(data, Mapping) else ""
    return {image_key: str(image), FAILED_KEY: reason}


class RecordFailuresDataset(Dataset):
    """MONAI ``Dataset`` for batch inference: a scan that the transform refuses becomes a failure record.

    Where ``Dataset`` would raise (and end the whole run), an item is ``{"image": <path>, FAILED_KEY: "<reason>"}``
    (see :func:`failure_record`). :func:`collate_with_failures` keeps such records out of the batch tensors, the
    evaluator's iteration (``scripts.handlers.skip_failed_scans``) does not run the network on them and
    ``scripts.handlers.PredictionSaver`` writes an error row for each. Arguments are MONAI's.
    """

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:  # noqa: BLE001 - every failure of one scan becomes its error row
            return failure_record(self.data[index], e)


FAILED_KEY = "failure"
"""Key of a failed item's reason (see :class:`RecordFailuresDataset`) and of a batch's failures."""


def collate_with_failures(items: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
    """``list_data_collate`` of the items that were preprocessed; failures as ``batch[FAILED_KEY]``.

    ``batch[FAILED_KEY]`` is a list of ``{"image": path, "reason": text}`` (empty when every scan was read); a
    batch of failures only has no ``"image"`` tensor.
    """
    from monai.data import list_data_collate

    good = [item for item in items if FAILED_KEY not in item]
    failed = [
        {"image": str(item.get("image", "")), "reason": str(item[FAILED_KEY])} for item in items if FAILED_KEY in item
    ]
    batch = list_data_collate(good) if good else {}
    batch[FAILED_KEY] = failed
    return batch


class IntensityNormalize(Transform):
    """Intensity normalisation of a channel-first volume.

    Modes:
        - ``"minmax"``: ``(v - min) / (max - min)`` per scan, in ``[0, 1]`` (the original study's choice).
        - ``"occipital"``: ``v / mean(v[occipital])``, the uptake ratio against the occipital reference region
          (so the striatum reads ``SBR + 1``); the region comes from the bundle's MNI template and the image
          affine, so the scan must be in MNI space.
        - ``"zscore"``: ``(v - mean) / std`` per scan.
    A constant volume maps to zeros (``minmax``/``zscore``) instead of dividing by zero.
    """

    MODES = ("minmax", "occipital", "zscore")

    def __init__(self, mode: str = "minmax", eps: float = 1e-8) -> None:
        self.mode = look_up_option(mode, self.MODES)
        self.eps = eps

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
        x = x.float()
        if self.mode == "minmax":
            lo, hi = x.min(), x.max()
            return (x - lo) / (hi - lo) if hi - lo > self.eps else x * 0
        if self.mode == "zscore":
            std = x.std()
            return (x - x.mean()) / std if std > self.eps else x * 0
        from scripts.anatomy import template_rois

        affine = img.affine.numpy() if isinstance(img, MetaTensor) else np.eye(4)
        mask = template_rois(tuple(x.shape[1:]), affine)["occipital"]
        if not mask.any():
            raise ValueError("the occipital reference region falls outside this image; is the scan in MNI space?")
        ref = x[0][torch.tensor(mask)].mean()  # a copy: the cached template masks are read-only
        if ref <= self.eps:
            raise ValueError(f"the occipital reference mean is {float(ref):.3g}; cannot normalise by it.")
        return x / ref


INTENSITY_MODES = IntensityNormalize.MODES
"""Names accepted by :class:`IntensityNormalize` (the configs' ``intensity``)."""


class IntensityNormalized(MapTransform):
    """Dictionary version of :class:`IntensityNormalize`."""

    def __init__(self, keys: KeysCollection, mode: str = "minmax", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = IntensityNormalize(mode)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.normalize(d[key])
            except ValueError as e:
                name = d[key].meta.get("filename_or_obj", key) if isinstance(d[key], MetaTensor) else key
                raise InputError(f"{name}: {e}") from None
        return d


class Softmaxd(MapTransform):
    """Softmax of a batch of logits over ``dim``, as a plain tensor: the engines' postprocessing.

    MONAI's ``Activationsd(softmax=True)`` computes the same values but wraps them in a ``MetaTensor``, after which
    every operation of the metrics that read them (ignite's ``Accuracy``, the validation metrics) goes through
    ``MetaTensor.__torch_function__``. Measured for a batch of 8 (postprocessing, then ignite's ``Accuracy.update``,
    one thread): 0.55-0.60 ms per iteration with ``Activationsd``, 0.09-0.11 ms with this (docs/performance.md).

    Args:
        keys: keys of the logits (e.g. ``"pred"``).
        dim: the class dimension (1 for a batch).
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    def __init__(self, keys: KeysCollection, dim: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dim = int(dim)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            d[key] = torch.softmax(x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x), dim=self.dim)
        return d
