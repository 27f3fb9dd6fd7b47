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
import logging
import math
import os
import random
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor, load_decathlon_datalist
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import look_up_option
from scripts.anatomy import MNI_2MM_SHAPE
from scripts.dicom import dicom_files, is_dicom_series
from scripts.errors import InputError
from scripts.options import parse_bool

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
    "check_splits",
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
]

logger = logging.getLogger(__name__)

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

    Entries without a ``subject`` get one from the file name (``sub-XXXX_...``, ``PPMI_<id>_...``, else the
    file name itself, i.e. one subject per scan); a warning says how many.

    Raises:
        DatalistError: naming ``source`` and the entry when an image is missing, a label is not 0/1, or a key is
            absent.
    """
    out, inferred, per_scan = [], 0, 0
    for i, entry in enumerate(entries):
        where = f"{source}, entry {i}"
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise DatalistError(f"{where}: each entry needs an 'image' key, got {entry!r}.")
        item = dict(entry)
        if not isinstance(item["image"], (str, os.PathLike)) or not str(item["image"]).strip():
            raise DatalistError(f"{where}: 'image' must be a file path, got {item['image']!r}.")
        where = f"{source}, entry {i} ({item['image']})"
        if check_files and not os.path.exists(item["image"]):
            raise DatalistError(f"{where}: image file not found.")
        if check_files and not (os.path.isfile(item["image"]) or _is_dicom_series(Path(item["image"]))):
            raise DatalistError(f"{where}: not a scan (a NIfTI file or a folder holding a DICOM series).")
        if "label" in item:
            item["label"] = _parse_label(item["label"], where)
        if item.get("subject") in (None, ""):
            item["subject"] = _subject_from_path(str(item["image"]))
            inferred += 1
            per_scan += not _SUBJECT_PATTERN.match(os.path.basename(str(item["image"]).rstrip("/")))
        out.append(item)
    if per_scan:
        logger.warning(
            f"{source}: {per_scan} of {len(out)} entries have no 'subject' and no sub-XXXX_/PPMI_<id>_ file name; "
            "each of them counts as its own subject, so visits of one person can land in different splits. "
            "Add a 'subject' to every entry."
        )
    elif inferred:
        logger.warning(f"{source}: {inferred} entries have no 'subject'; subjects were read from their file names.")
    return out


def file_identity(path: str | os.PathLike) -> tuple:
    """What a path is, whatever it is called: ``(device, inode)`` of the file (symbolic and hard links, ``..`` and
    other spellings of one file are equal), or its resolved path when it cannot be read."""
    try:
        st = os.stat(path)
        return ("file", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_splits(content: Mapping[str, Any], source: str, base_dir: str | os.PathLike = ".") -> None:
    """Refuse a datalist whose splits overlap: a scan listed twice, or one subject in two splits.

    Args:
        content: the datalist (``{"training": [...], "validation": [...], "test": [...]}``).
        source: the file, for messages.
        base_dir: folder relative image paths are relative to.

    Raises:
        DatalistError: naming the scan or subject and both places it appears.
    """
    images: dict[tuple, str] = {}
    subjects: dict[str, str] = {}
    for split in SPLITS:
        entries = content.get(split)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("image"), str):
                continue  # reported with its entry when the split is loaded
            where = f"{split!r} entry {i}"
            image = os.path.normpath(os.path.join(str(base_dir), entry["image"]))
            identity = file_identity(image)
            if identity in images:
                raise DatalistError(
                    f"{source}: {entry['image']} is listed twice ({images[identity]} and {where}; the same file, "
                    "perhaps through a link); remove the duplicate."
                )
            images[identity] = where
            subject = str(entry.get("subject") or _subject_from_path(image))
            first = subjects.setdefault(subject, split)
            if first != split:
                raise DatalistError(
                    f"{source}: subject {subject} has scans in both {first!r} and {split!r} ({entry['image']}); "
                    "all scans of a subject must be in one split (python -m scripts.data builds such splits)."
                )


DATALIST_FIELDS = ("image", "label", "subject")
"""The entry keys a data loader receives: other keys (age, true SBRs, ...) stay in the file."""


def read_datalist_file(path: str | os.PathLike) -> Any:
    """The parsed JSON of a datalist file.

    Raises:
        DatalistError: the file is missing, unreadable, starts with a byte-order mark or is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"datalist file {path} not found.")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatalistError(f"datalist file {path} could not be read ({e.strerror}).") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DatalistError(
            f"datalist file {path} starts with a byte-order mark, which JSON readers (MONAI's too) refuse; save it as "
            "UTF-8 without BOM."
        )
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatalistError(f"datalist file {path} is not valid JSON: {e}") from None


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
    content = read_datalist_file(path)
    if not isinstance(content, dict) or not isinstance(content.get(split), list):
        keys = sorted(k for k, v in content.items() if isinstance(v, list)) if isinstance(content, dict) else []
        raise DatalistError(f"datalist file {path} has no list named {split!r}; available: {keys}.")
    for i, entry in enumerate(content[split]):
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise DatalistError(f"{path} [{split}], entry {i}: each entry needs an 'image' key, got {entry!r}.")
        if not isinstance(entry["image"], str) or not entry["image"].strip():
            raise DatalistError(f"{path} [{split}], entry {i}: 'image' must be a file path, got {entry['image']!r}.")
    if require_labels:
        check_splits(content, str(path), path.parent.resolve())
    entries = (
        load_decathlon_datalist(path, is_segmentation=False, data_list_key=split, base_dir=path.parent.resolve())
        if content[split]
        else []
    )
    entries = validate_datalist(entries, f"{path} [{split}]")
    if require_labels:
        for i, item in enumerate(entries):
            if "label" not in item:
                raise DatalistError(f"{path} [{split}], entry {i} ({item['image']}): no 'label'.")
        if not entries:
            raise DatalistError(f"datalist file {path} has no scans in {split!r}; every split used needs scans.")
        labels = {item["label"] for item in entries}
        if len(labels) == 1:
            only = "HC (label 0)" if labels == {0} else "PD (label 1)"
            message = f"the {split!r} split of {path} holds only {only} scans"
            if split in ("training", "validation"):
                raise DatalistError(f"{message}; training and validation need scans of both classes.")
            logger.warning(f"{message}; metrics that need both classes (AUC, F1) are undefined.")
    if fields is not None:
        entries = [{k: v for k, v in item.items() if k in fields} for item in entries]
    return entries


_SUBJECT_PATTERN = re.compile(r"(sub-[A-Za-z0-9]+|PPMI_\d+)(?=[_.]|$)")


def _subject_from_path(path: str) -> str:
    """Subject id from a file name: BIDS-like ``sub-XXXX_...`` or PPMI-like ``PPMI_<id>_...``, else the file name
    without suffix (one subject per scan)."""
    name = os.path.basename(path.rstrip("/"))
    match = _SUBJECT_PATTERN.match(name)
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


def _read_label_table(labels_csv: Path) -> list[dict[str, str]]:
    """Rows of a label table as written by hand or by a spreadsheet: UTF-8 with or without a byte-order mark,
    comma, semicolon or tab separated, spaces around headers and values ignored."""
    try:
        text = labels_csv.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatalistError(f"{labels_csv}: not a UTF-8 text file; save the table as CSV (UTF-8).") from None
    lines = text.splitlines()
    if not lines:
        raise DatalistError(f"{labels_csv}: the file is empty.")
    header = lines[0]
    delimiter = max(",;\t", key=header.count) if any(c in header for c in ",;\t") else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    fields = [(f or "").strip().lower() for f in (reader.fieldnames or [])]
    missing = {"image", "label"} - set(fields)
    if missing:
        raise DatalistError(f"{labels_csv}: missing column(s) {sorted(missing)}; found {fields}.")
    rows = []
    for raw in reader:
        values = list(raw.values())
        row = {name: (v or "").strip() if isinstance(v, str) else "" for name, v in zip(fields, values)}
        if any(row.values()):
            rows.append(row)
    return rows


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
    (0/1 or HC/PD); ``subject`` is optional and defaults to the ``sub-XXXX`` or ``PPMI_<id>`` prefix of the file
    name (or the file name, with a warning). Other columns are copied into the entries. Spreadsheet exports are
    accepted (byte-order mark, ``;`` or tab separators, spaces around names). Image paths are written relative to
    the datalist's folder when possible, so the folder can be moved as a whole.

    Raises:
        DatalistError: a missing file or column, a bad label, a scan listed twice, a subject with two labels, or
            a split that would leave a class out of validation or test.
    """
    images_dir, labels_csv, out_file = Path(images_dir), Path(labels_csv), Path(out_file)
    if out_file.exists() and not overwrite:
        raise DatalistError(f"{out_file} already exists; pass --overwrite to replace it.")
    if not images_dir.is_dir():
        raise DatalistError(f"images folder {images_dir} not found.")
    if not labels_csv.is_file():
        raise DatalistError(f"labels file {labels_csv} not found.")
    rows = _read_label_table(labels_csv)
    if not rows:
        raise DatalistError(f"{labels_csv}: no rows.")
    entries, seen, per_scan = [], set(), 0
    out_dir = out_file.parent.resolve()
    for line, row in enumerate(rows, start=2):
        where = f"{labels_csv}, line {line}"
        image = Path(row["image"])
        image = image if image.is_absolute() else (images_dir / image)
        if not row["image"] or not image.exists():
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
        entry["subject"] = row.get("subject") or _subject_from_path(str(image))
        per_scan += not row.get("subject") and not _SUBJECT_PATTERN.match(image.name)
        entries.append(entry)
    if per_scan:
        logger.warning(
            f"{labels_csv}: {per_scan} rows have no subject and a file name that is not sub-XXXX_/PPMI_<id>_...; "
            "each such scan counts as its own subject. Add a 'subject' column so that visits stay together."
        )
    splits = split_by_subject(entries, fractions, seed)
    for split, fraction in zip(SPLITS[1:], fractions[1:]):
        if fraction <= 0:
            continue
        for label, name in ((0, "HC"), (1, "PD")):
            if not any(e["label"] == label for e in splits[split]):
                n = len({e["subject"] for e in entries if e["label"] == label})
                raise DatalistError(
                    f"{labels_csv}: the split would leave no {name} subject in {split!r} (the table has {n} {name} "
                    f"subject{'s' if n != 1 else ''}); add {name} subjects or change --split."
                )
    splits["metadata"] = {"source": str(labels_csv), "split_seed": seed, "split_fractions": list(fractions)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(splits, indent=2), encoding="utf-8")
    os.replace(tmp, out_file)
    return out_file


def _is_dicom_series(folder: Path) -> bool:
    return is_dicom_series(folder)


def list_scans(path: str | os.PathLike, split: str = "") -> list[dict]:
    """The scans to run inference on, as datalist entries ``{"image": ...}``.

    Args:
        path: one scan (a NIfTI file, or a folder holding one DICOM series), a folder of scans (NIfTI files and
            DICOM series sub-folders, sorted by name), or a datalist JSON.
        split: for a datalist, the list to read (``"all"`` concatenates training, validation and test; empty:
            ``"test"``). Any other input has no lists, so a split given with it is an error, not ignored.
    """
    p = Path(path)
    if not p.exists():
        raise DatalistError(f"inference input {p} not found.")
    is_datalist = p.is_file() and p.suffix == ".json"
    if split and not is_datalist:
        raise DatalistError(
            f"--input_split {split!r} selects a list of a datalist JSON, but inference input {p} is a "
            f"{'folder' if p.is_dir() else 'file'}: every scan in it is scored; leave --input_split out."
        )
    split = split or "test"
    if is_datalist:
        if split == "all":
            content = read_datalist_file(p)
            splits = [s for s in SPLITS if isinstance(content, dict) and isinstance(content.get(s), list)]
            if not splits:
                keys = sorted(k for k, v in content.items() if isinstance(v, list)) if isinstance(content, dict) else []
                raise DatalistError(
                    f"datalist file {p} has no list named 'training', 'validation' or 'test'; available: {keys}."
                )
            scans = [e for s in splits for e in load_datalist(p, s, require_labels=False, fields=["image"])]
        else:
            scans = load_datalist(p, split, require_labels=False, fields=["image"])
        if not scans:
            raise DatalistError(f"{p}: no scans in {split!r} to run inference on.")
        return scans
    if p.is_file():
        if not str(p).endswith((".nii", ".nii.gz")):
            raise DatalistError(f"{p}: expected a .nii/.nii.gz file, a DICOM series folder, a folder or a datalist.")
        return [{"image": os.path.abspath(p)}]
    if _is_dicom_series(p):
        return [{"image": os.path.abspath(p)}]
    scans = sorted(q for q in p.iterdir() if q.name.endswith((".nii", ".nii.gz")) or _is_dicom_series(q))
    if not scans:
        raise DatalistError(f"{p}: no NIfTI files or DICOM series found.")
    # absolute, but as the user named them: a symbolic link keeps its own name in the predictions
    return [{"image": os.path.abspath(q)} for q in scans]


# --------------------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------------------
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
        ref = x[0][torch.as_tensor(mask)].mean()
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
    content = json.loads(Path(out).read_text(encoding="utf-8"))
    counts = ", ".join(f"{s}: {len(content[s])}" for s in SPLITS)
    print(f"wrote {out} ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
