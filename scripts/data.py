# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Datalists (loading, validation, subject-level splits) and the bundle's own preprocessing transforms.

The preprocessing chain itself is written out once, in ``configs/inference.json#volume_transforms``: load with
:class:`LoadScand` (clear errors for unusable files), RAS orientation, trilinear resize to the working grid,
:class:`IntensityNormalized`, float32. The training configs include it by macro.

Datalist format (JSON)::

    {
        "training":   [{"image": "images/sub-0001_ses-01.nii.gz", "label": 1, "subject": "sub-0001"}, ...],
        "validation": [...],
        "test":       [...],
        "metadata":   {...}              # optional, free form
    }

``image`` is a NIfTI file or a DICOM series folder, absolute or relative to the datalist's folder; ``label``
is 0 (HC) or 1 (PD); ``subject`` groups the scans (visits) of one person. Splits are made by subject so that
no person contributes scans to two splits. Extra keys (age, sex, true SBRs, ...) are kept and ignored.

Bring-your-own data: ``python -m scripts.data --images DIR --labels labels.csv --out datalist.json``
builds such a file from a folder of scans and a CSV with columns ``image,label[,subject]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import look_up_option
from scripts.errors import InputError

__all__ = [
    "SPLITS",
    "DatalistError",
    "DATALIST_FIELDS",
    "load_datalist",
    "validate_datalist",
    "split_by_subject",
    "subsample_by_subject",
    "build_datalist",
    "list_scans",
    "LoadScand",
    "IntensityNormalize",
    "IntensityNormalized",
]

SPLITS = ("training", "validation", "test")
LABEL_NAMES = {"0": 0, "1": 1, "hc": 0, "nc": 0, "control": 0, "healthy": 0, "pd": 1, "parkinson": 1}
_SCAN_SUFFIXES = (".nii", ".nii.gz", ".dcm")


class DatalistError(InputError):
    """A datalist or an entry of it is not usable; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------------------------
# datalists
# --------------------------------------------------------------------------------------------------------------------
def _parse_label(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise DatalistError(f"{where}: label must be 0 (HC) or 1 (PD), got {value!r}.")
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return int(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_NAMES:
        return LABEL_NAMES[value.strip().lower()]
    raise DatalistError(f"{where}: label must be 0/HC or 1/PD, got {value!r}.")


def validate_datalist(entries: Sequence[Mapping], source: str, check_files: bool = True) -> list[dict]:
    """Check datalist entries and return copies with integer labels.

    Raises:
        DatalistError: naming ``source`` and the entry when an image is missing, a label is not 0/1, or a key is
            absent.
    """
    out = []
    for i, entry in enumerate(entries):
        where = f"{source}, entry {i}"
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise DatalistError(f"{where}: each entry needs an 'image' key, got {entry!r}.")
        item = dict(entry)
        where = f"{source}, entry {i} ({item['image']})"
        if check_files and not os.path.exists(item["image"]):
            raise DatalistError(f"{where}: image file not found.")
        if "label" in item:
            item["label"] = _parse_label(item["label"], where)
        item.setdefault("subject", _subject_from_path(str(item["image"])))
        out.append(item)
    return out


DATALIST_FIELDS = ("image", "label", "subject")
"""The entry keys a data loader receives: other keys (age, true SBRs, ...) stay in the file."""


def load_datalist(
    datalist_file: str | os.PathLike,
    split: str = "training",
    require_labels: bool = True,
    fields: Sequence[str] | None = DATALIST_FIELDS,
) -> list[dict]:
    """Read one split of a datalist JSON file with MONAI's ``load_decathlon_datalist`` and validate every entry.

    Relative image paths are resolved against the datalist's folder; labels become 0 (HC) / 1 (PD); entries
    without a ``subject`` get one from the file name (see :func:`validate_datalist`).

    Args:
        datalist_file: path of the datalist JSON.
        split: ``"training"``, ``"validation"``, ``"test"`` or any other list-valued key of the file.
        require_labels: raise when an entry has no ``label``.
        fields: keep only these keys of each entry (by default image, label and subject: a data loader collates
            every value, and subject-level subsampling needs the subject); ``None`` keeps all.

    Raises:
        DatalistError: naming the file (and entry) when the file is missing or not JSON, the split is absent, an
            image is missing or a label is not 0/HC or 1/PD.
    """
    path = Path(datalist_file)
    if not path.is_file():
        raise DatalistError(f"datalist file {path} not found.")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatalistError(f"datalist file {path} is not valid JSON: {e}") from None
    if not isinstance(content, dict) or not isinstance(content.get(split), list):
        keys = sorted(k for k, v in content.items() if isinstance(v, list)) if isinstance(content, dict) else []
        raise DatalistError(f"datalist file {path} has no list named {split!r}; available: {keys}.")
    for i, entry in enumerate(content[split]):
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise DatalistError(f"{path} [{split}], entry {i}: each entry needs an 'image' key, got {entry!r}.")
    entries = load_decathlon_datalist(path, is_segmentation=False, data_list_key=split, base_dir=path.parent.resolve())
    entries = validate_datalist(entries, f"{path} [{split}]")
    if require_labels:
        for i, item in enumerate(entries):
            if "label" not in item:
                raise DatalistError(f"{path} [{split}], entry {i} ({item['image']}): no 'label'.")
    if fields is not None:
        entries = [{k: v for k, v in item.items() if k in fields} for item in entries]
    return entries


def _subject_from_path(path: str) -> str:
    """Subject id from a BIDS-like file name (``sub-XXXX_...``), else the file name without suffix."""
    name = os.path.basename(path.rstrip("/"))
    match = re.match(r"(sub-[A-Za-z0-9]+)", name)
    if match:
        return match.group(1)
    for suffix in _SCAN_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_by_subject(
    entries: Sequence[Mapping], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[dict]]:
    """Split scans into ``training``/``validation``/``test`` by subject, stratified by label.

    All scans of one subject land in the same split. Within each class, subjects are shuffled with ``seed`` and
    allocated by largest remainder so that every split gets ``round(fraction * n)`` subjects of that class.

    Raises:
        DatalistError: if the fractions are invalid or a subject has scans with different labels.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DatalistError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}.")
    by_subject: dict[str, list[dict]] = {}
    for entry in entries:
        by_subject.setdefault(str(entry["subject"]), []).append(dict(entry))
    subject_label = {}
    for subject, scans in by_subject.items():
        labels = {int(s["label"]) for s in scans}
        if len(labels) != 1:
            raise DatalistError(f"subject {subject} has scans with different labels {sorted(labels)}.")
        subject_label[subject] = labels.pop()
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label in (0, 1):
        subjects = sorted(s for s, lab in subject_label.items() if lab == label)
        rng.shuffle(subjects)
        n = len(subjects)
        raw = [f * n for f in fractions]
        counts = [int(math.floor(r)) for r in raw]
        for i in sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
            counts[i] += 1
        start = 0
        for split, count in zip(SPLITS, counts):
            for subject in subjects[start : start + count]:
                out[split].extend(by_subject[subject])
            start += count
    for split in SPLITS:
        out[split].sort(key=lambda e: (str(e["subject"]), str(e["image"])))
    return out


def subsample_by_subject(entries: Sequence[Mapping], fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """Keep about ``fraction`` of the subjects of each class (all their scans), e.g. for low-data experiments.

    Subjects are drawn with ``seed`` separately per label, at least one per class present, so the subset keeps
    the class balance. ``fraction = 1`` returns the entries unchanged.
    """
    if not 0.0 < fraction <= 1.0:
        raise DatalistError(f"train fraction must be in (0, 1], got {fraction}.")
    entries = [dict(e) for e in entries]
    if fraction == 1.0:
        return entries
    subjects: dict[int, list[str]] = {}
    for e in entries:
        subject = str(e.get("subject", e["image"]))
        if subject not in subjects.setdefault(int(e["label"]), []):
            subjects[int(e["label"])].append(subject)
    rng = random.Random(seed)
    keep = set()
    for label in sorted(subjects):
        names = sorted(subjects[label])
        rng.shuffle(names)
        keep.update(names[: max(1, round(fraction * len(names)))])
    return [e for e in entries if str(e.get("subject", e["image"])) in keep]


def build_datalist(
    images_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out_file: str | os.PathLike,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a datalist from a folder of scans and a CSV of labels (bring-your-own data).

    The CSV needs the columns ``image`` (a path relative to ``images_dir``, or absolute) and ``label``
    (0/1 or HC/PD); ``subject`` is optional and defaults to the ``sub-XXXX`` prefix of the file name (or the file
    name). Other columns are copied into the entries. Image paths are written relative to the datalist's folder
    when possible, so the folder can be moved as a whole.
    """
    images_dir, labels_csv, out_file = Path(images_dir), Path(labels_csv), Path(out_file)
    if out_file.exists() and not overwrite:
        raise DatalistError(f"{out_file} already exists; pass --overwrite to replace it.")
    if not images_dir.is_dir():
        raise DatalistError(f"images folder {images_dir} not found.")
    if not labels_csv.is_file():
        raise DatalistError(f"labels file {labels_csv} not found.")
    with labels_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DatalistError(f"{labels_csv}: missing column(s) {sorted(missing)}; found {reader.fieldnames}.")
        rows = list(reader)
    if not rows:
        raise DatalistError(f"{labels_csv}: no rows.")
    entries, seen = [], set()
    out_dir = out_file.parent.resolve()
    for line, row in enumerate(rows, start=2):
        where = f"{labels_csv}, line {line}"
        image = Path(row["image"])
        image = image if image.is_absolute() else (images_dir / image)
        if not image.exists():
            raise DatalistError(f"{where}: image {image} not found.")
        if str(image.resolve()) in seen:
            raise DatalistError(f"{where}: image {image} is listed twice.")
        seen.add(str(image.resolve()))
        entry = {k: v for k, v in row.items() if k not in ("image", "label", "subject") and v not in (None, "")}
        try:
            rel = os.path.relpath(image.resolve(), out_dir)
        except ValueError:  # different drive
            rel = str(image.resolve())
        entry["image"] = rel
        entry["label"] = _parse_label(row["label"], where)
        entry["subject"] = (row.get("subject") or "").strip() or _subject_from_path(str(image))
        entries.append(entry)
    splits = split_by_subject(entries, fractions, seed)
    splits["metadata"] = {"source": str(labels_csv), "split_seed": seed, "split_fractions": list(fractions)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(splits, indent=2))
    return out_file


def _is_dicom_series(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() == ".dcm" for p in folder.iterdir())


def list_scans(path: str | os.PathLike, split: str = "test") -> list[dict]:
    """The scans to run inference on, as datalist entries ``{"image": ...}``.

    Args:
        path: one scan (a NIfTI file, or a folder holding one DICOM series), a folder of scans (NIfTI files and
            DICOM series sub-folders, sorted by name), or a datalist JSON.
        split: for a datalist, the list to read (``"all"`` concatenates training, validation and test).
    """
    p = Path(path)
    if not p.exists():
        raise DatalistError(f"inference input {p} not found.")
    if p.is_file() and p.suffix == ".json":
        if split == "all":
            content = json.loads(p.read_text())
            splits = [s for s in SPLITS if isinstance(content.get(s), list)]
            return [e for s in splits for e in load_datalist(p, s, require_labels=False, fields=["image"])]
        return load_datalist(p, split, require_labels=False, fields=["image"])
    if p.is_file():
        if not str(p).endswith((".nii", ".nii.gz")):
            raise DatalistError(f"{p}: expected a .nii/.nii.gz file, a DICOM series folder, a folder or a datalist.")
        return [{"image": str(p.resolve())}]
    if _is_dicom_series(p):
        return [{"image": str(p.resolve())}]
    scans = sorted(q for q in p.iterdir() if q.name.endswith((".nii", ".nii.gz")) or _is_dicom_series(q))
    if not scans:
        raise DatalistError(f"{p}: no NIfTI files or DICOM series found.")
    return [{"image": str(q.resolve())} for q in scans]


# --------------------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------------------
class LoadScand(MapTransform):
    """Load a 3D scan (NIfTI with nibabel, DICOM series folder with ITK) as a channel-first MetaTensor.

    Unlike a bare ``LoadImaged``, a file that cannot be read, is not a single 3D volume, or holds non-finite
    values raises a ``ValueError`` naming the file and the problem.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self._loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if isinstance(path, (torch.Tensor, np.ndarray)):
                continue  # already loaded
            if not os.path.exists(str(path)):
                raise InputError(f"{path}: scan not found.")
            try:
                img = self._loader(path)
            except Exception as e:  # noqa: BLE001 - re-raised with the file name and a short reason
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(f"{path}: could not be read as a NIfTI file or DICOM series ({reason}).") from None
            if img.ndim == 5 and img.shape[-1] == 1:  # (C, X, Y, Z, 1) from some NIfTI writers
                img = img[..., 0]
            if img.ndim != 4 or img.shape[0] != 1:
                shape = tuple(img.shape[1:]) if img.ndim > 1 else tuple(img.shape)
                raise InputError(f"{path}: expected a single 3D volume, got an image of shape {shape}.")
            if min(img.shape[1:]) < 8:
                raise InputError(f"{path}: volume of shape {tuple(img.shape[1:])} is too small (< 8 voxels per axis).")
            if not torch.isfinite(img).all():
                raise InputError(f"{path}: the volume holds NaN or infinite values.")
            d[key] = img
        return d


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
        ref = x[0][torch.as_tensor(mask)].mean()
        if ref <= self.eps:
            raise ValueError(f"the occipital reference mean is {float(ref):.3g}; cannot normalise by it.")
        return x / ref


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


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.data",
        description="Build a datalist (subject-level training/validation/test split) from a folder of scans and a "
        "CSV of labels with columns image,label[,subject].",
    )
    parser.add_argument("--images", required=True, help="folder holding the NIfTI files / DICOM series folders")
    parser.add_argument("--labels", required=True, help="CSV with columns image,label[,subject]")
    parser.add_argument("--out", required=True, help="datalist JSON to write")
    parser.add_argument("--split", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the subject-level split")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datalist")
    args = parser.parse_args(argv)
    try:
        out = build_datalist(args.images, args.labels, args.out, args.split, args.seed, args.overwrite)
    except DatalistError as e:
        parser.exit(2, f"error: {e}\n")
    content = json.loads(Path(out).read_text())
    counts = ", ".join(f"{s}: {len(content[s])}" for s in SPLITS)
    print(f"wrote {out} ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
