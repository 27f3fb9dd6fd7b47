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
    deterministic for a seed). A folder that holds scans but no datalist is never written into: the error says
    how to build a datalist for one's own scans.

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
    if dataset_dir.is_dir() and any(dataset_dir.rglob("*.nii*")):
        raise InputError(
            f"{dataset_dir} holds scans but no {datalist_name}. Build one with "
            f"`python -m scripts.data --images {dataset_dir} --labels labels.csv --out {datalist}`."
        )
    from scripts.synthetic.phantom import generate_dataset

    print(f"No datalist in {dataset_dir}: generating {n_subjects} synthetic subjects (preset {preset!r}, seed {seed}).")
    return str(generate_dataset(dataset_dir, n_subjects=n_subjects, seed=seed, workers=workers, preset=preset))
