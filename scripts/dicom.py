# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""DICOM files recognised by their content, not their name.

A DICOM Part 10 file starts with a 128-byte preamble followed by the four bytes ``DICM``; many scanner and PACS
exports name their files ``IM0001``, ``1.2.840...`` or ``00000001`` without a ``.dcm`` suffix. A file counts as a
DICOM slice when it has the ``.dcm`` suffix (a damaged one is still a slice of the series, reported as unreadable) or
the ``DICM`` marker; a folder holding such files is a DICOM series.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DICOM_MAGIC", "is_dicom_file", "dicom_files", "is_dicom_series"]

DICOM_MAGIC = (128, b"DICM")
"""Offset and bytes of the DICOM Part 10 marker."""


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Part 10 file by content (the ``DICM`` marker after the 128-byte preamble)."""
    offset, magic = DICOM_MAGIC
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(len(magic)) == magic
    except OSError:  # a folder, an unreadable file
        return False


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM slice files of ``folder`` (sorted by name): ``.dcm`` files and files with the DICOM marker; hidden
    files are ignored."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [
        p
        for p in entries
        if not p.name.startswith(".") and p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom_file(p))
    ]


def is_dicom_series(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a folder holding DICOM slices (by suffix or by content)."""
    folder = Path(folder)
    try:
        if not folder.is_dir():
            return False
        for p in sorted(folder.iterdir()):
            if not p.name.startswith(".") and p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom_file(p)):
                return True
    except OSError:  # unreadable folder
        return False
    return False
