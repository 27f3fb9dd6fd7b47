# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The inference gate: no synthetic DaTscan is flagged; inverted, flipped, shifted, transform-less and noise volumes
are, and through the command line they get an error row and a non-zero exit unless --allow_nonstandard_input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.checkpoints import save_checkpoint
from scripts.networks import Student2D
from scripts.plausibility import PlausibilityCheckd, declared_modality, plausibility_problems
from scripts.transforms import LoadScand
from test_reliability import _dicom_series
from test_reliability_cli import SETTINGS, _bundle, _stderr


def _phantoms(dataset: Path) -> list[Path]:
    return sorted((dataset.parent / "images").glob("*.nii.gz"))


def _corrupt(source: Path, out: Path, how: str, seed: int = 0) -> Path:
    """A semantic corruption of a phantom: the file stays a valid NIfTI on the MNI grid."""
    img = nib.load(str(source))
    v = np.asarray(img.dataobj, dtype=np.float32)
    affine = img.affine.copy()
    if how == "inverted":
        v = v.max() - v
    elif how == "negated":
        v = -v
    elif how == "upside_down":
        v = v[:, :, ::-1]
    elif how == "anterior_posterior_swapped":
        v = v[:, ::-1, :]
    elif how == "shifted_3cm_up":
        v = np.roll(v, 15, axis=2)
    elif how == "noise":
        v = np.random.default_rng(seed).gamma(2.0, float(v.mean()) / 2.0, size=v.shape).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(v), None if how == "no_transform" else affine)
    if how == "no_transform":  # voxel sizes, but no voxel-to-world transform
        image.header.set_zooms((2.0, 2.0, 2.0))
        image.set_qform(None, code=0)
        image.set_sform(None, code=0)
    nib.save(image, str(out))
    return out


CORRUPTIONS = ("inverted", "negated", "upside_down", "anterior_posterior_swapped", "shifted_3cm_up", "noise",
               "no_transform")  # fmt: skip


def _checked(path: Path, allow: bool = False) -> dict:
    data = LoadScand(keys="image", allow_nonstandard=True)({"image": str(path)})
    return PlausibilityCheckd(keys="image", allow_nonstandard=allow)(data)


def test_no_synthetic_datscan_is_flagged(tiny_phantom_dataset):
    for path in _phantoms(tiny_phantom_dataset):
        img = LoadScand(keys="image")({"image": str(path)})["image"]
        assert plausibility_problems(img, img.affine.numpy(), img.meta) == [], path.name


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_each_semantic_corruption_is_flagged(tmp_path, tiny_phantom_dataset, how):
    for source in _phantoms(tiny_phantom_dataset)[:3]:
        path = _corrupt(source, tmp_path / f"{how}.nii.gz", how)
        with pytest.raises(Exception, match="does not look like a DaTscan SPECT scan in MNI space"):
            _checked(path)
        allowed = _checked(path, allow=True)
        assert allowed["input_warnings"], how


def _with_sidecar(source: Path, out: Path, content: str) -> Path:
    """A copy of ``source`` and the JSON sidecar beside it (``out.nii.gz`` -> ``out.json``), as dcm2niix writes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, out)
    out.with_name(out.name.split(".nii")[0] + ".json").write_text(content, encoding="utf-8")
    return out


def test_the_declared_modality_comes_from_the_dicom_tag_or_the_json_sidecar(tmp_path, tiny_phantom_dataset):
    phantom = _phantoms(tiny_phantom_dataset)[0]
    assert declared_modality(phantom) is None  # no metadata: nothing declared
    assert declared_modality(_with_sidecar(phantom, tmp_path / "pet.nii.gz", '{"Modality": " PT "}')) == "PT"
    assert declared_modality(_with_sidecar(phantom, tmp_path / "spect.nii", '{"Modality": "NM"}')) == "NM"
    assert declared_modality(_with_sidecar(phantom, tmp_path / "broken.nii.gz", '{"Modality": ')) is None
    assert declared_modality(_with_sidecar(phantom, tmp_path / "other.nii.gz", '["PT"]')) is None
    pet = _dicom_series(tmp_path / "pet_series", n_slices=4, modality="PT")
    assert declared_modality(pet) == "PT" and declared_modality(sorted(pet.iterdir())[0]) == "PT"
    assert declared_modality(_dicom_series(tmp_path / "nm_series", n_slices=4)) == "NM"


@pytest.mark.parametrize("modality", ["PT", "CT", "MR"])
def test_a_scan_declared_as_another_modality_is_refused_or_flagged(tmp_path, tiny_phantom_dataset, modality):
    phantom = _phantoms(tiny_phantom_dataset)[0]
    path = _with_sidecar(phantom, tmp_path / "scan.nii.gz", json.dumps({"Modality": modality}))
    with pytest.raises(Exception, match=f"does not look like .* modality {modality} .*not SPECT"):
        _checked(path)
    assert f"modality {modality}" in _checked(path, allow=True)["input_warnings"]
    for spect in ("NM", "nm", "ST", "SPECT"):
        path = _with_sidecar(phantom, tmp_path / f"{spect}.nii.gz", json.dumps({"Modality": spect}))
        assert not _checked(path).get("input_warnings"), spect


def test_the_gate_reaches_predictions_and_the_exit_status(tmp_path, tiny_phantom_dataset):
    root = tmp_path / "bundle"
    torch.manual_seed(0)
    save_checkpoint(Student2D(), root / "models" / "model.pt", SETTINGS, kind="student")
    scans = tmp_path / "scans"
    scans.mkdir()
    good = _phantoms(tiny_phantom_dataset)[0]
    shutil.copy(good, scans / "good.nii.gz")
    _corrupt(good, scans / "inverted.nii.gz", "inverted")
    _corrupt(good, scans / "upside_down.nii.gz", "upside_down")
    refused = _bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(root), "--input",
                      str(scans), "--run_name", "gate", "--progress_bar", "false", "--report", "true")  # fmt: skip
    lines = _stderr(refused)
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr[-3000:]
    assert lines[0].startswith("error: 2 of 3 scans could not be scored") and "does not look like a DaTscan" in lines[0]
    with (root / "eval" / "gate" / "predictions.csv").open(encoding="utf-8") as f:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(f)}
    assert rows["good.nii.gz"]["error"] == "" and rows["good.nii.gz"]["pd_probability"] != ""
    for name in ("inverted.nii.gz", "upside_down.nii.gz"):
        assert "does not look like a DaTscan" in rows[name]["error"] and rows[name]["pd_probability"] == ""
    # the reading report gives the refused scans their reason
    report = json.loads((root / "eval" / "gate" / "report" / "report.json").read_text(encoding="utf-8"))
    errors = {Path(r["image"]).name: r["error"] for r in report}
    assert errors["good.nii.gz"] in ("", None)
    assert all("does not look like a DaTscan" in errors[n] for n in ("inverted.nii.gz", "upside_down.nii.gz"))
    allowed = _bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(root), "--input",
                      str(scans), "--run_name", "allowed", "--progress_bar", "false", "--allow_nonstandard_input",
                      "true")  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    with (root / "eval" / "allowed" / "predictions.csv").open(encoding="utf-8") as f:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(f)}
    assert rows["good.nii.gz"]["warnings"] == ""
    assert "no striatal uptake" in rows["inverted.nii.gz"]["warnings"]
    assert "template striatum" in rows["upside_down.nii.gz"]["warnings"]
