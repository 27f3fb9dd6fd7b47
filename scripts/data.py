# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Datalists: loading, validation, subject-level splits, and a datalist built from a folder of scans.

The preprocessing transforms (checked loading, intensity normalisation) are in :mod:`scripts.transforms`.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist
from scripts.dicom import is_dicom_series
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
    "check_splits",
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
