# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The bundle's configs, run through MONAI's bundle workflow on a tiny phantom set (32³ grid, 1 epoch)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.errors import find_input_error
from scripts.projections import PROJECTIONS

CONFIGS = BUNDLE_ROOT / "configs"
TINY = {"spatial_size": [32, 32, 32], "batch_size": 6, "progress_bar": False, "num_workers": 0}


def _workflow(config_files, bundle_root, dataset_dir, workflow_type="train", **override) -> ConfigWorkflow:
    files = [str(CONFIGS / f) for f in config_files]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        **{**TINY, **override},
    )
    wf.initialize()
    return wf


def _run(config_files, bundle_root, dataset_dir, workflow_type="train", **override) -> ConfigWorkflow:
    wf = _workflow(config_files, bundle_root, dataset_dir, workflow_type, **override)
    assert wf.check_properties() in ([], None)
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module")
def dataset(tiny_phantom_dataset) -> Path:
    return tiny_phantom_dataset.parent


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    """A bundle root holding a teacher trained for one epoch through the real CLI entry point."""
    root = tmp_path_factory.mktemp("bundle")
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "configs/train_teacher.json",
        "--bundle_root", str(root), "--dataset_dir", str(dataset), "--max_epochs", "1",
        "--spatial_size", "[32,32,32]", "--batch_size", "6", "--progress_bar", "False", "--run_name", "teacher",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT))
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def test_teacher_training_writes_best_checkpoint_and_metrics(trained):
    assert (trained / "models" / "teacher.pt").is_file()
    assert (trained / "eval" / "teacher" / "teacher.pt").is_file()
    metrics = json.loads((trained / "eval" / "teacher" / "validation_metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["epoch"] == 1
    assert set(metrics["metrics"]) >= {"accuracy", "sensitivity", "specificity", "f1_macro", "f1_weighted", "roc_auc"}
    assert metrics["metrics"]["n"] == len(metrics["predictions"]) > 0
    assert list((trained / "eval" / "teacher").glob("events.out.tfevents.*"))  # TensorBoard logs
    state = torch.load(trained / "models" / "teacher.pt", weights_only=True)
    assert "head.weight" in state  # a flat state dict of the teacher network


def test_evaluate_override_scores_the_test_split(trained, dataset):
    _run(["train_teacher.json", "evaluate.json"], trained, dataset, run_name="teacher-test")
    report = json.loads((trained / "eval" / "teacher-test" / "metrics.json").read_text())
    test = json.loads((dataset / "datalist.json").read_text())["test"]
    assert report["split"] == "test" and report["metrics"]["n"] == len(test)
    assert {Path(p["image"]).name for p in report["predictions"]} == {Path(e["image"]).name for e in test}


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_distill_trains_every_projection(trained, dataset, projection):
    run = f"kd-{projection}"
    _run(["distill.json"], trained, dataset, projection=projection, max_epochs=1, run_name=run)
    assert (trained / "eval" / run / "model.pt").is_file()
    history = json.loads((trained / "eval" / run / "validation_metrics.json").read_text())
    assert history["metrics"]["n"] > 0


def test_distill_without_kd_is_saved_separately(trained, dataset):
    _run(["distill.json"], trained, dataset, kd_enabled=False, max_epochs=1, run_name="nokd")
    assert (trained / "eval" / "nokd" / "model_nokd.pt").is_file()
    assert (trained / "models" / "model_nokd.pt").is_file()


def test_distill_stops_with_a_clear_message_without_a_teacher(dataset, tmp_path):
    wf = _workflow(["distill.json"], tmp_path, dataset, max_epochs=1)
    with pytest.raises(Exception) as err:
        wf.run()
    error = find_input_error(err.value)
    assert error is not None
    assert str(tmp_path / "models" / "teacher.pt") in str(error) and "configs/train_teacher.json" in str(error)


def test_inference_writes_one_row_per_scan_and_the_projection_png(trained, dataset):
    _run(["distill.json"], trained, dataset, max_epochs=1, run_name="student")
    folder = dataset / "images"
    _run(["inference.json"], trained, dataset, "infer", input=str(folder), save_projection_png=True, run_name="inf")
    with (trained / "eval" / "inf" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list(folder.glob("*.nii.gz")))
    for row in rows:
        assert 0.0 <= float(row["pd_probability"]) <= 1.0
        assert row["predicted_label"] == ("PD" if float(row["pd_probability"]) >= 0.5 else "HC")
        assert row["projection"] == "joint_fusion_slices"
    assert len(list((trained / "eval" / "inf" / "projections").glob("*.png"))) == len(rows)
    # one scan, and the teacher path
    one = sorted(folder.glob("*.nii.gz"))[0]
    _run(["inference.json", "inference_teacher.json"], trained, dataset, "infer", input=str(one), run_name="inf-t")
    rows = list(csv.DictReader((trained / "eval" / "inf-t" / "predictions.csv").open()))
    assert [Path(r["image"]).name for r in rows] == [one.name]


def test_teacher_definitions_agree_between_configs():
    teacher = ConfigParser.load_config_file(CONFIGS / "train_teacher.json")
    distill = ConfigParser.load_config_file(CONFIGS / "distill.json")
    assert teacher["network_def"] == distill["teacher_def"]
    shared = ("spatial_size", "intensity", "teacher_backbone", "dataset_dir", "synthetic_subjects", "seed")
    assert all(teacher[k] == distill[k] for k in shared)
    inference = ConfigParser.load_config_file(CONFIGS / "inference.json")
    assert inference["network_def"] == distill["network_def"]
    for key in ("projection", "view", "slice_centre", "num_slices", "gap", "student_backbone", "spatial_size"):
        assert inference[key] == distill[key], key


def test_metadata_matches_the_schema_and_the_default_student():
    jsonschema = pytest.importorskip("jsonschema")
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    schema = json.loads((BUNDLE_ROOT / "tests" / "schema" / "meta_schema_20240725.json").read_text())
    jsonschema.validate(meta, schema)
    assert meta["version"] in meta["changelog"]
    from scripts.networks import Student2D

    image = meta["network_data_format"]["inputs"]["image"]
    assert Student2D().in_channels == image["num_channels"]
