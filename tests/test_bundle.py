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
CONFIG_NAMES = ("train_teacher.json", "distill.json", "inference.json")
TINY = {"spatial_size": [32, 32, 32], "batch_size": 6, "progress_bar": False, "num_workers": 0}


def _metrics_csv(path: Path) -> dict[str, float]:
    """The ``name,value`` lines MONAI's ``MetricsSaver`` writes."""
    with path.open() as f:
        return {name: float(value) for name, value in csv.reader(f)}


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
    metrics = _metrics_csv(trained / "eval" / "teacher" / "validation" / "metrics.csv")
    names = {"val_accuracy", "val_sensitivity", "val_specificity", "val_f1_macro", "val_auc", "val_auc_ce"}
    assert set(metrics) == names
    assert all(0.0 <= v <= 1.0 for v in metrics.values())  # the tiny set has both classes in validation
    assert list((trained / "eval" / "teacher").glob("events.out.tfevents.*"))  # TensorBoard logs
    state = torch.load(trained / "models" / "teacher.pt", weights_only=True)
    assert "head.weight" in state  # a flat state dict of the teacher network


def test_evaluate_override_scores_the_test_split(trained, dataset):
    _run(["train_teacher.json", "evaluate.json"], trained, dataset, run_name="teacher-test")
    run = trained / "eval" / "teacher-test"
    assert set(_metrics_csv(run / "metrics.csv")) >= {"val_f1_macro", "val_auc", "val_sensitivity"}
    test = json.loads((dataset / "datalist.json").read_text())["test"]
    with (run / "predictions.csv").open() as f:
        rows = list(csv.reader(f))  # MONAI's ClassificationSaver: file name, P(HC), P(PD)
    assert {Path(r[0]).name for r in rows} == {Path(e["image"]).name for e in test} and len(rows) == len(test)
    assert all(float(r[1]) + float(r[2]) == pytest.approx(1.0, abs=1e-5) for r in rows)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_distill_trains_every_projection(trained, dataset, projection):
    run = f"kd-{projection}"
    _run(["distill.json"], trained, dataset, projection=projection, max_epochs=1, run_name=run)
    assert (trained / "eval" / run / "model.pt").is_file()
    assert "val_f1_macro" in _metrics_csv(trained / "eval" / run / "validation" / "metrics.csv")


def test_distill_without_kd_is_saved_separately(trained, dataset):
    _run(["distill.json"], trained, dataset, kd_enabled=False, max_epochs=1, run_name="nokd", selection_metric="auc")
    assert (trained / "eval" / "nokd" / "model_nokd.pt").is_file()
    assert (trained / "models" / "model_nokd.pt").is_file()
    from scripts.checkpoints import read_checkpoint

    # --selection_metric picks the key metric: the checkpoint records ROC AUC as what selected it
    _, info = read_checkpoint(trained / "eval" / "nokd" / "model_nokd.pt", "run")
    assert info["validation"]["metric"] == "val_auc"
    assert "val_f1_macro" in _metrics_csv(trained / "eval" / "nokd" / "validation" / "metrics.csv")


def test_distill_stops_with_a_clear_message_without_a_teacher(dataset, tmp_path):
    with pytest.raises(Exception) as err:  # refused when the run starts (initialize), before any data is read
        _workflow(["distill.json"], tmp_path, dataset, max_epochs=1).run()
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


def _resolved(name: str) -> dict:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / name))
    parser.resolve_macro_and_relative_ids()
    return _normalise_ids(parser.get())


def _normalise_ids(value):
    """MONAI writes id separators as ``#`` or ``::`` interchangeably; compare configs with one spelling."""
    if isinstance(value, dict):
        return {k: _normalise_ids(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise_ids(v) for v in value]
    return value.replace("::", "#") if isinstance(value, str) else value


# written out in both training configs because MONAI's tooling addresses them by nested id (MONAI Label sets
# train#dataset#data and train#handlers, experiment tracking appends to train#handlers / validate#handlers, the
# multi-GPU override sets train#sampler, users override train#dataloader#num_workers): a block included by macro
# cannot take such overrides. Every value in them is a reference, and this test keeps the copies identical.
WRITTEN_IN_BOTH = {
    "train": ("dataset", "sampler", "dataloader", "handlers"),
    "validate": ("dataset", "sampler", "dataloader", "handlers"),
}


def test_every_shared_block_is_defined_once_and_resolves_the_same():
    raw = {name: ConfigParser.load_config_file(CONFIGS / name) for name in CONFIG_NAMES}
    teacher, distill, inference = (_resolved(n) for n in ("train_teacher.json", "distill.json", "inference.json"))
    # the preprocessing, the networks and the projection: one definition, in inference.json
    for key in ("volume_transforms", "network_def", "teacher_def", "projection_transform"):
        assert key in raw["inference.json"]
    assert teacher["volume_transforms"] == distill["volume_transforms"] == inference["volume_transforms"]
    assert teacher["network_def"] == distill["teacher_def"] == inference["teacher_def"]
    assert distill["network_def"] == inference["network_def"]
    assert distill["projection_transform"] == inference["projection_transform"]
    # the training recipe: train_teacher.json; distill.json includes it (validation block included)
    for section in ("train", "validate"):
        for key, value in teacher[section].items():
            if key == "trainer":
                continue
            assert distill[section][key] == value, f"{section}#{key} differs between the training configs"
            included = raw["distill.json"][section][key]
            if key in WRITTEN_IN_BOTH[section]:
                assert value is None or not isinstance(included, str) or not included.startswith("%")
            else:
                assert included == f"%configs/train_teacher.json#{section}#{key}", f"{section}#{key} not included"
    # no other block of distill.json or inference.json repeats one of another config
    for name in ("distill.json", "train_teacher.json"):
        for key, value in raw[name].items():
            if isinstance(value, (dict, list)) and key not in ("train", "validate", "imports", "spatial_size"):
                others = [o for o in CONFIG_NAMES if o != name and raw[o].get(key) == value]
                assert not others, f"{name}#{key} repeats the block of {others}"


def test_training_configs_share_the_settings_they_include():
    teacher, distill = _resolved("train_teacher.json"), _resolved("distill.json")
    shared = ("spatial_size", "intensity", "teacher_backbone", "dataset_dir", "synthetic_subjects", "seed")
    assert all(teacher[k] == distill[k] for k in shared)
    inference = _resolved("inference.json")
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


@pytest.mark.parametrize("name", ["train_teacher.json", "distill.json"])
@pytest.mark.parametrize("device", ["cpu", "$torch.device('cpu')"])
def test_device_may_be_given_as_a_name(name, device):
    """MONAI Label and ``--device cpu`` on the command line set ``device`` to a string, not a torch.device."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / name))
    parser["device"] = device
    assert parser.get_parsed_content("amp") is False
    assert parser.get_parsed_content("cudnn_benchmark") is False
