# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Tool: the synthetic DaTscan / AV133 phantom generator (``python -m scripts.synthetic --help``).

The training configs call :func:`ensure_dataset` explicitly in their ``initialize`` step (switch: ``synthetic_data``),
so that a fresh clone trains on the synthetic set without a separate command; nothing else in the bundle's runtime
imports this package.
"""

from __future__ import annotations

import os
from pathlib import Path

from scripts.errors import InputError

__all__ = ["ensure_dataset"]


def _what_it_holds(folder: Path, limit: int = 2000) -> str:
    """``"DICOM files"``, ``"NIfTI scans"`` or ``"N files"``: what a folder holds, for the refusal message (DICOM
    recognised by content: many exports have no ``.dcm`` suffix)."""
    from scripts.dicom import is_dicom_file

    files = []
    for i, path in enumerate(folder.rglob("*")):
        if i >= limit:
            break
        if path.is_file():
            files.append(path)
    if any(p.name.endswith((".nii", ".nii.gz")) for p in files):
        return "NIfTI scans"
    if any(p.suffix.lower() == ".dcm" or is_dicom_file(p) for p in files[:200]):
        return "DICOM files"
    return f"{len(files)} file(s)" if files else "sub-folders"


def ensure_dataset(
    dataset_dir: str | os.PathLike,
    n_subjects: int = 200,
    seed: int = 0,
    preset: str = "default",
    workers: int = 2,
    datalist_name: str = "datalist.json",
) -> str:
    """Return ``<dataset_dir>/<datalist_name>``; generate the synthetic phantom set there first if it is absent.

    Nothing happens when the datalist exists (your own data, or a synthetic set made earlier: generation is
    deterministic for a seed). A folder that holds anything but no datalist (NIfTI scans, DICOM series with or
    without a ``.dcm`` suffix, anything else) is never written into: the error says how to build a datalist for
    one's own scans.

    Args:
        dataset_dir: the data folder (the configs' ``dataset_dir``).
        n_subjects: number of synthetic subjects (the configs' ``synthetic_subjects``).
        seed: generator seed (the configs' ``data_seed``).
        preset: generator preset (the configs' ``synthetic_preset``).
        workers: worker processes for rendering.
        datalist_name: file name of the datalist.
    """
    dataset_dir = Path(dataset_dir)
    datalist = dataset_dir / datalist_name
    if datalist.is_file():
        return str(datalist)
    if dataset_dir.exists() and not dataset_dir.is_dir():
        raise InputError(f"--dataset_dir {dataset_dir} is a file, not a folder.")
    held = sorted(dataset_dir.iterdir()) if dataset_dir.is_dir() else []
    if held:
        # never write into (nor train on phantoms in place of) a folder that holds anything
        kind = _what_it_holds(dataset_dir)
        raise InputError(
            f"{dataset_dir} holds {kind} but no {datalist_name}; synthetic phantoms are only generated into an empty "
            f"or new folder. For your own scans build a datalist with `python -m scripts.data --images {dataset_dir} "
            f"--labels labels.csv --out {datalist}`; for phantoms pass an empty --dataset_dir."
        )
    from scripts.synthetic.phantom import generate_dataset

    print(f"No datalist in {dataset_dir}: generating {n_subjects} synthetic subjects (preset {preset!r}, seed {seed}).")
    return str(generate_dataset(dataset_dir, n_subjects=n_subjects, seed=seed, workers=workers, preset=preset))
