# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The user's data through the command line: a folder of DICOM files (named without ``.dcm``) is never filled with
phantoms, a link to a training scan in the test split is the same scan, a linked input keeps the name the user gave
it, and a checkpoint that does not record its grid is served with a warning."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import torch
from scripts.checkpoints import save_checkpoint
from scripts.dicom import is_dicom_file, is_dicom_series
from scripts.networks import Student2D
from test_reliability_cli import SETTINGS, TINY, _assert_one_line, _bundle


def _fake_dicom(path: Path) -> Path:
    """A file with the DICOM Part 10 preamble and marker (what an export named ``IM0001`` holds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\x00" * 64)
    return path


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def test_dicom_is_recognised_by_content(tmp_path):
    series = tmp_path / "series"
    _fake_dicom(series / "IM0001")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a scan", encoding="utf-8")
    assert is_dicom_file(series / "IM0001") and is_dicom_series(series)
    assert not is_dicom_series(tmp_path / "other") and not is_dicom_file(tmp_path / "other")


def test_a_dicom_folder_without_a_datalist_is_never_filled_with_phantoms(tmp_path):
    data = tmp_path / "my_dicom_export"
    for subject in ("P001", "P002"):
        for i in range(3):
            _fake_dicom(data / subject / f"IM{i:04d}")
    before = _tree(data)
    result = _bundle("run", "training", "--config_file", "configs/train_teacher.json", "--bundle_root", str(tmp_path),
                     "--dataset_dir", str(data), "--max_epochs", "1", *TINY, timeout=120)  # fmt: skip
    _assert_one_line(result, f"error: {data} holds DICOM files but no datalist.json", "python -m scripts.data")
    assert _tree(data) == before  # nothing written into the user's folder


def _absolute_datalist(data: Path) -> dict:
    content = json.loads((data / "datalist.json").read_text(encoding="utf-8"))
    for split in ("training", "validation", "test"):
        for entry in content[split]:
            entry["image"] = str(data / entry["image"])
    return content


def test_a_link_to_a_training_scan_in_the_test_split_is_refused(tmp_path, tiny_phantom_dataset):
    data = tiny_phantom_dataset.parent
    content = _absolute_datalist(data)
    train_scan = Path(content["training"][0]["image"])
    link = tmp_path / "links" / "external-0001.nii.gz"
    link.parent.mkdir()
    os.symlink(train_scan, link)
    content["test"].append({"image": str(link), "label": content["training"][0]["label"], "subject": "ext-1"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content), encoding="utf-8")
    result = _bundle("run", "training", "--config_file", "configs/distill.json", "--bundle_root", str(tmp_path),
                     "--datalist_file", str(datalist), "--synthetic_data", "false", "--kd_enabled", "false",
                     "--max_epochs", "1", *TINY, timeout=120)  # fmt: skip
    _assert_one_line(result, "external-0001.nii.gz is listed twice", "the same file")


def test_a_linked_input_keeps_its_name_and_a_checkpoint_without_its_grid_is_served_with_a_warning(
    tmp_path, tiny_phantom_dataset
):
    root = tmp_path / "bundle"
    settings = {k: v for k, v in SETTINGS.items() if k != "spatial_size"}  # the grid is not recorded
    torch.manual_seed(0)
    save_checkpoint(Student2D(), root / "models" / "model.pt", settings, kind="student")
    scans = tmp_path / "scans"
    scans.mkdir()
    source = sorted((tiny_phantom_dataset.parent / "images").glob("*.nii.gz"))[0]
    shutil.copy(source, scans / "copied.nii.gz")
    os.symlink(source, scans / "my_patient.nii.gz")
    result = _bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(root), "--input",
                     str(scans), "--run_name", "named", "--progress_bar", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "does not record the settings it was trained with" in log and "spatial_size=[64, 64, 64]" in log
    with (root / "eval" / "named" / "predictions.csv").open(encoding="utf-8") as f:
        names = sorted(Path(r["image"]).name for r in csv.DictReader(f))
    assert names == ["copied.nii.gz", "my_patient.nii.gz"], names
