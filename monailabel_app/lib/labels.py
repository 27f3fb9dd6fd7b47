# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Classification label files of the MONAI Label datastore.

A scan's class is stored as the scan's *final* label in the datastore, as a small JSON file named after the
image id::

    <studies>/labels/final/<image id>.json      {"label": "PD"}      (or "HC", 0, 1)

The file is written either over HTTP (``PUT /datastore/label?image=<id>&tag=final`` with the JSON file as the
``label`` upload) or directly on disk (see :func:`register_label_files`). ``0``/``"HC"`` is a healthy control,
``1``/``"PD"`` Parkinson's disease; the bundle's datalist rules decide which spellings are accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

__all__ = [
    "LABEL_FILE_SUFFIX",
    "LABEL_KEY",
    "LabelFileError",
    "read_label_file",
    "write_label_file",
    "register_label_files",
]

LABEL_FILE_SUFFIX = ".json"
LABEL_KEY = "label"


class LabelFileError(ValueError):
    """A datastore label file is missing, is not a JSON label file, or does not hold a ``"label"`` value."""


def read_label_file(path: str | os.PathLike) -> object:
    """Return the raw class value stored in a JSON label file (``{"label": value}``).

    The value is returned as written (e.g. ``"PD"``, ``"hc"``, ``1``); turning it into 0/1 is left to the
    bundle's datalist validation so that MONAI Label and the bundle accept the same spellings.

    Raises:
        LabelFileError: naming the file, when it does not exist, is not a ``.json`` file (e.g. a segmentation
            saved as the final label), is not valid JSON, or is not an object with a ``"label"`` key.
    """
    p = Path(path)
    hint = f'a classification label is a JSON file like {{"{LABEL_KEY}": "PD"}} or {{"{LABEL_KEY}": 0}}'
    if not p.is_file():
        raise LabelFileError(f"label file {p} not found ({hint}).")
    if not p.name.endswith(LABEL_FILE_SUFFIX):
        raise LabelFileError(f"label file {p} is not a {LABEL_FILE_SUFFIX} file ({hint}).")
    try:
        content = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelFileError(f"label file {p} is not valid JSON ({err}); {hint}.") from None
    if not isinstance(content, dict) or LABEL_KEY not in content:
        raise LabelFileError(f"label file {p} has no {LABEL_KEY!r} key, got {content!r} ({hint}).")
    return content[LABEL_KEY]


def write_label_file(path: str | os.PathLike, label: int | str) -> Path:
    """Write ``{"label": label}`` to ``path`` (creating its folder) and return the path.

    Raises:
        LabelFileError: if ``path`` does not end in ``.json`` or ``label`` is not an int or a str.
    """
    p = Path(path)
    if not p.name.endswith(LABEL_FILE_SUFFIX):
        raise LabelFileError(f"label file name must end in {LABEL_FILE_SUFFIX}, got {p.name!r}.")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise LabelFileError(f"label must be 0/1 or 'HC'/'PD', got {label!r}.")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({LABEL_KEY: label}))
    return p


def register_label_files(
    datastore: Datastore, label_dir: str | os.PathLike, tag: str = DefaultLabelTag.FINAL.value
) -> list[str]:
    """Register ``<label_dir>/<image id>.json`` files as labels ``tag`` of images that have none yet.

    MONAI Label's local datastore registers the label files it finds on disk only when they have an image file
    extension; a JSON label copied into ``<studies>/labels/final/`` would stay unseen. This registers them
    through the datastore's public ``save_label`` (from a temporary copy, because ``save_label`` copies the file
    into ``label_dir``). Labels the datastore already lists are left as they are.

    Returns:
        the ids of the images whose label was registered.
    """
    folder = Path(label_dir)
    if not folder.is_dir():
        return []
    added = []
    for image_id in datastore.list_images():
        path = folder / f"{image_id}{LABEL_FILE_SUFFIX}"
        if not path.is_file() or datastore.get_label_by_image_id(image_id, tag):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / path.name
            shutil.copyfile(path, copy)
            datastore.save_label(image_id, str(copy), tag, {})
        added.append(image_id)
    return added
