# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Is this a DaTscan SPECT volume in MNI space? Checks of a loaded scan's content, before it is scored.

The grid and intensity checks of :class:`scripts.transforms.LoadScand` find files that are not volumes on the expected
grid; a volume can pass them and still not be what the model was trained on. A model scores such a volume with the
same confidence as any other, so :func:`plausibility_problems` looks at what the image holds:

* **voxel-to-world transform**: a NIfTI file whose ``qform_code`` and ``sform_code`` are both 0 has no transform (a
  reader then invents one from the voxel sizes), so nothing says where the brain is;
* **intensity sign**: a DaTscan volume is counts (or a ratio of counts), non-negative; an image that is mostly
  negative is inverted or a difference image;
* **striatal position**: the uptake peak (the centroid of the hottest 1 % of voxels) lies on the template striatum
  of the MNI grid; a scan that is upside down, has anterior and posterior swapped or is shifted by centimetres puts
  it elsewhere (left-right flips are symmetric and not detected);
* **striatal contrast**: the template striatum is brighter than the occipital reference (mean striatal binding ratio
  above a floor that even severe PD phantoms clear); inverted intensities or noise fail this;
* **modality**: from the scan's acquisition metadata, not its content: the DICOM Modality (0008,0060) of a series'
  first slice, or the ``Modality`` field of the JSON sidecar that dcm2niix (and BIDS) writes beside a NIfTI file
  (``scan.nii.gz`` → ``scan.json``). A declared modality other than nuclear-medicine SPECT (``NM``, or the retired
  ``ST``) is refused: PET (``PT``, e.g. AV133 or FDOPA), CT, MR. No image feature tried (peak sharpness,
  caudate/putamen ratio, occipital noise) separates the AV133-like phantoms from the SPECT presets without flagging
  SPECT scans, so a PET volume in MNI space *without* such metadata is not recognised.

Thresholds are calibrated on the bundle's synthetic scans (default, benchmark and other-site SPECT presets, 356
scans): the largest values seen are 14.8 mm (peak offset, anterior-posterior/inferior-superior), 10.3 mm (lateral)
and a smallest striatal ratio of 0.67; the limits (20 mm, 16 mm, 0.3) leave a margin, and
``tests/test_plausibility.py`` checks that no phantom of the test set is flagged. An upside-down scan moves the
peak about 28 mm, an anterior-posterior swap about 50 mm; a shift of 2 cm is caught when it is not offset by the
anterior shift of a PD scan's peak. They are heuristics for catching gross mistakes, not a quality control of real
scans; ``--allow_nonstandard_input true`` scores a flagged scan anyway, with the reasons in the ``warnings`` column.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = [
    "THRESHOLDS",
    "SPECT_MODALITIES",
    "declared_modality",
    "plausibility_features",
    "plausibility_problems",
    "PlausibilityCheckd",
]

logger = logging.getLogger(__name__)

THRESHOLDS: dict[str, float] = {
    "max_negative_fraction": 0.05,
    "max_peak_offset_mm": 20.0,
    "max_peak_lateral_offset_mm": 16.0,
    "min_striatal_ratio": 0.3,
}
"""Limits of :func:`plausibility_problems` (see the module docstring and ``tests/test_plausibility.py``)."""


SPECT_MODALITIES = ("NM", "ST", "SPECT")
"""Declared modalities accepted as SPECT: DICOM's nuclear medicine (``NM``) and retired single-photon (``ST``)
codes, and the word itself (some sidecars)."""

MODALITY_NAMES = {"PT": "PET", "CT": "CT", "MR": "MR", "OT": "other"}


def _sidecar(path: Path) -> Path:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def _dicom_modality(path: Path) -> str | None:
    try:
        import itk

        io = itk.GDCMImageIO.New()
        io.SetFileName(str(path))
        io.ReadImageInformation()
        found, value = io.GetValueFromTag("0008|0060", "")
    except Exception as e:  # an unreadable slice is reported by the loader's own checks
        logger.debug(f"{path}: no DICOM modality read ({e})")
        return None
    value = str(value).strip() if found else ""
    return value or None


def declared_modality(path: str | os.PathLike) -> str | None:
    """The acquisition modality a scan's metadata declare (a DICOM Modality code such as ``NM`` or ``PT``).

    Read from the DICOM Modality (0008,0060) of a series' first slice (``path`` a series folder or a DICOM file),
    or from the ``Modality`` field of the JSON sidecar beside a NIfTI file (``scan.nii.gz`` → ``scan.json``, as
    dcm2niix and BIDS write it). None when neither exists or says; an unreadable sidecar counts as absent.
    """
    from scripts.dicom import dicom_files, is_dicom_file

    path = Path(path)
    if path.is_dir():
        files = dicom_files(path)
        return _dicom_modality(files[0]) if files else None
    if is_dicom_file(path):
        return _dicom_modality(path)
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        value = json.loads(sidecar.read_text(encoding="utf-8")).get("Modality")
    except (OSError, ValueError, AttributeError) as e:
        logger.debug(f"{sidecar}: not a JSON sidecar ({e})")
        return None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def _modality_problem(meta: Mapping[str, Any] | None) -> str | None:
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if not name or not isinstance(name, (str, os.PathLike)):
        return None
    modality = declared_modality(name)
    if modality is None or modality.upper() in SPECT_MODALITIES:
        return None
    kind = MODALITY_NAMES.get(modality.upper(), "not SPECT")
    return (
        f"its metadata declare modality {modality} ({kind}), not SPECT (NM): the model was trained on DaTscan SPECT "
        "and its operating point does not transfer to another modality (see docs/new_site.md)"
    )


def _world_centroid(mask: np.ndarray, affine: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    idx = np.argwhere(mask).astype(np.float64)
    w = None if weights is None else weights[mask]
    centre = np.average(idx, axis=0, weights=w)
    return affine[:3, :3] @ centre + affine[:3, 3]


def plausibility_features(volume: Any, affine: Any) -> dict[str, float]:
    """The quantities the checks read, for one ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) volume and its affine.

    Returns:
        ``negative_fraction`` (voxels below -1 % of the maximum), ``peak_offset_mm`` and ``peak_lateral_offset_mm``
        (hottest 1 % vs template striatum: anterior-posterior/inferior-superior distance, left-right distance),
        ``striatal_ratio`` (mean template-striatum / mean occipital - 1); NaN where a region is off the grid.
    """
    from scripts.anatomy import template_rois

    v = np.asarray(volume, dtype=np.float64)
    if v.ndim == 4 and v.shape[0] == 1:
        v = v[0]
    affine = np.asarray(affine, dtype=np.float64)
    names = ("negative_fraction", "peak_offset_mm", "peak_lateral_offset_mm", "striatal_ratio")
    out = dict.fromkeys(names, float("nan"))
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    if peak <= 0:
        return out
    out["negative_fraction"] = float(np.mean(v < -0.01 * peak))
    rois = template_rois(v.shape, affine)
    striatum, occipital = np.asarray(rois["striatum"]), np.asarray(rois["occipital"])
    if striatum.any():
        hot = v >= np.quantile(v, 0.99)
        weights = np.clip(v - np.median(v), 0, None)
        if hot.any() and float(weights[hot].sum()) > 0:
            offset = _world_centroid(hot, affine, weights) - _world_centroid(striatum, affine)
            # left-right: an asymmetric (unilateral PD) striatum moves the peak sideways, anterior-posterior and
            # inferior-superior it stays put
            out["peak_offset_mm"] = float(np.linalg.norm(offset[1:]))
            out["peak_lateral_offset_mm"] = float(abs(offset[0]))
        mean = float(v[striatum].mean())
        if occipital.any():
            ref = float(v[occipital].mean())
            if ref > 0:
                out["striatal_ratio"] = mean / ref - 1.0
    return out


def _transform_problem(meta: Mapping[str, Any] | None) -> str | None:
    if not isinstance(meta, Mapping) or "qform_code" not in meta or "sform_code" not in meta:
        return None
    try:
        codes = int(np.asarray(meta["qform_code"]).reshape(-1)[0]), int(np.asarray(meta["sform_code"]).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return None
    if codes == (0, 0):
        return (
            "no valid voxel-to-world transform (qform_code and sform_code are 0): its position in MNI space is unknown"
        )
    return None


def plausibility_problems(
    volume: Any, affine: Any, meta: Mapping[str, Any] | None = None, thresholds: Mapping[str, float] | None = None
) -> list[str]:
    """Why ``volume`` does not look like a DaTscan SPECT scan in MNI space (empty when it does).

    Args:
        volume: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` intensities, on the grid of ``affine``.
        affine: ``(4, 4)`` voxel-to-world (MNI mm) affine.
        meta: the image's header fields as MONAI reads them (``qform_code``, ``sform_code``, ``filename_or_obj``
            for the declared modality), when known.
        thresholds: replaces :data:`THRESHOLDS` entries.
    """
    limits = {**THRESHOLDS, **(thresholds or {})}
    problems = []
    for problem in (_modality_problem(meta), _transform_problem(meta)):
        if problem:
            problems.append(problem)
    f = plausibility_features(volume, affine)
    if f["negative_fraction"] > limits["max_negative_fraction"]:
        problems.append(
            f"{100 * f['negative_fraction']:.0f}% of the voxels are negative: the intensities look inverted or are "
            "not counts"
        )
    if f["peak_lateral_offset_mm"] > limits["max_peak_lateral_offset_mm"]:
        problems.append(
            f"the uptake peak lies {f['peak_lateral_offset_mm']:.0f} mm to the side of the template striatum (at most "
            f"{limits['max_peak_lateral_offset_mm']:.0f} mm expected): the scan looks shifted or not in MNI space"
        )
    if f["peak_offset_mm"] > limits["max_peak_offset_mm"]:
        problems.append(
            f"the uptake peak lies {f['peak_offset_mm']:.0f} mm from the template striatum (at most "
            f"{limits['max_peak_offset_mm']:.0f} mm expected): the scan looks flipped, upside down, shifted or not in "
            "MNI space"
        )
    if not f["striatal_ratio"] >= limits["min_striatal_ratio"]:
        ratio = "not computable" if np.isnan(f["striatal_ratio"]) else f"{f['striatal_ratio']:.2f}"
        problems.append(
            f"no striatal uptake: the striatum/occipital ratio is {ratio} (at least {limits['min_striatal_ratio']:.2f} "
            "expected of a DaTscan); inverted intensities, noise or another tracer"
        )
    return problems


class PlausibilityCheckd(MapTransform):
    """The inference gate: refuse a loaded scan that :func:`plausibility_problems` flags, or (with
    ``allow_nonstandard``) score it with the reasons added to its warnings.

    Placed right after :class:`scripts.transforms.LoadScand` in the inference preprocessing (``configs/inference.json#
    plausibility_check``), on the scan as stored (its own grid and affine, before reorientation and resampling). A
    refused scan gets an error row in ``predictions.csv`` and the report, and the run's exit status is non-zero, as
    for any scan that could not be scored.

    Args:
        keys: keys of the loaded images.
        allow_nonstandard: score a flagged scan anyway (``--allow_nonstandard_input true``).
        thresholds: replaces :data:`THRESHOLDS` entries.
        allow_missing_keys: as in MONAI.
    """

    def __init__(
        self,
        keys: KeysCollection,
        allow_nonstandard: Any = False,
        thresholds: Mapping[str, float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        from scripts.options import parse_bool

        super().__init__(keys, allow_missing_keys)
        self.allow_nonstandard = parse_bool(allow_nonstandard, "allow_nonstandard_input")
        self.thresholds = dict(thresholds or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from scripts.errors import InputError
        from scripts.transforms import ALLOW_HINT, WARNINGS_KEY

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = img.meta if isinstance(img, MetaTensor) else {}
            affine = img.affine.numpy() if isinstance(img, MetaTensor) else np.eye(4)
            volume = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img)
            problems = plausibility_problems(volume, affine, meta, self.thresholds)
            if not problems:
                continue
            name = meta.get("filename_or_obj", key)
            if not self.allow_nonstandard:
                raise InputError(
                    f"{name}: does not look like a DaTscan SPECT scan in MNI space: {'; '.join(problems)}. "
                    f"Check the scan, or {ALLOW_HINT}."
                )
            for problem in problems:
                logger.warning(f"{name}: {problem} (scored because of --allow_nonstandard_input).")
            previous = d.get(WARNINGS_KEY) or ""
            d[WARNINGS_KEY] = "; ".join([w for w in (previous, *problems) if w])
        return d
