# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Reliability through the real command line (``python -m monai.bundle ...`` in subprocesses): one line on stderr
per failure whatever the phase, batch inference that keeps going, and a run interrupted by Ctrl-C (or killed) that
resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, write_nifti
from scripts.checkpoints import save_checkpoint
from scripts.networks import Student2D
from scripts.runs import HOLD_ENV

TINY = ["--spatial_size", "[32,32,32]", "--batch_size", "6", "--progress_bar", "false"]
SETTINGS = {
    "spatial_size": [32, 32, 32],
    "intensity": "minmax",
    "projection": "joint_fusion_slices",
    "view": "axial",
    "num_slices": 3,
    "gap": 0,
    "student_backbone": "resnet18",
    "num_classes": 2,
}


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(BUNDLE_ROOT), MONAI_FAIL_ON_DUPLICATE_CONFIG="1")


def _bundle(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _stderr(result: subprocess.CompletedProcess) -> list[str]:
    """The lines on stderr, less MONAI's note on trusting configs (printed whenever a config is parsed)."""
    return [line for line in result.stderr.splitlines() if line.strip() and "GHSA-873f-pvrv-4x83" not in line]


def _assert_one_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    lines = _stderr(result)
    assert result.returncode != 0, result.stdout[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data(tiny_phantom_dataset) -> Path:
    return tiny_phantom_dataset.parent


@pytest.fixture(scope="module")
def student_root(tmp_path_factory) -> Path:
    """A bundle root whose models/model.pt is a (freshly initialised) student described for a 32³ grid."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    save_checkpoint(Student2D(), root / "models" / "model.pt", SETTINGS, kind="student")
    return root


def test_a_typo_in_an_option_is_one_line_and_nothing_is_written(tmp_path):
    result = _bundle("run", "training", "--config_file", "configs/train_teacher.json", "--bundle_root", str(tmp_path),
                     "--max_epoch", "0", timeout=120)  # fmt: skip
    _assert_one_line(result, "error: --max_epoch is not an option of this bundle; did you mean --max_epochs?")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "data").exists()


def test_a_damaged_model_at_inference_is_one_line(tmp_path, data):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"\x00" * 100)
    result = _bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(tmp_path),
                     "--input", str(data / "images"), timeout=120)  # fmt: skip
    _assert_one_line(result, "model.pt could not be read", "the file is damaged or not a PyTorch checkpoint")


def test_batch_inference_scores_every_readable_scan_and_reports_each_other_one(tmp_path, data, student_root):
    scans = tmp_path / "scans"
    scans.mkdir()
    good = sorted((data / "images").glob("*.nii.gz"))[:3]
    for path in good:
        shutil.copy(path, scans / path.name)
    payload = good[0].read_bytes()
    (scans / "truncated.nii.gz").write_bytes(payload[: len(payload) // 2])
    write_nifti(scans / "zeros.nii.gz", np.zeros((91, 109, 91)))
    write_nifti(scans / "slab.nii.gz", np.random.default_rng(0).random((256, 256, 30)), np.eye(4))
    result = _bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(student_root),
                     "--input", str(scans), "--run_name", "batch", "--batch_size", "2")  # fmt: skip
    _assert_one_line(result, "error: 3 of 6 scans could not be scored (first: ", "every other scan has its prediction")
    run = student_root / "eval" / "batch"
    with (run / "predictions.csv").open(encoding="utf-8") as f:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted([p.name for p in good] + ["truncated.nii.gz", "zeros.nii.gz", "slab.nii.gz"])
    for path in good:
        assert 0.0 <= float(rows[path.name]["pd_probability"]) <= 1.0 and rows[path.name]["error"] == ""
        assert rows[path.name]["projection"] == "joint_fusion_slices"
    assert "could not be read" in rows["truncated.nii.gz"]["error"]
    assert "empty (all voxels 0)" in rows["zeros.nii.gz"]["error"]
    assert "field of view" in rows["slab.nii.gz"]["error"] and rows["slab.nii.gz"]["pd_probability"] == ""
    summary = json.loads((run / "predictions.json").read_text(encoding="utf-8"))
    assert (summary["scored"], summary["failed"]) == (3, 3)


def _datalist_with_a_broken_scan(tmp_path: Path, data: Path, split: str) -> Path:
    """The phantom datalist (absolute paths) with one scan of ``split`` replaced by a gzip file holding no NIfTI."""
    content = json.loads((data / "datalist.json").read_text(encoding="utf-8"))
    for name in ("training", "validation", "test"):
        for entry in content[name]:
            entry["image"] = str(data / entry["image"])
    broken = tmp_path / "broken.nii.gz"
    with gzip.open(broken, "wb") as f:
        f.write(b"\x00" * 400)
    content[split][0]["image"] = str(broken)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["../../outside", "a/b", ".."])
def test_a_run_name_is_one_folder_inside_eval(tmp_path, name):
    root = tmp_path / "root"
    result = _bundle("run", "training", "--config_file", "configs/train_teacher.json", "--bundle_root", str(root),
                     "--run_name", name, timeout=120)  # fmt: skip
    _assert_one_line(result, f"error: option --run_name expects a folder name (no '/', not '.' or '..'), got {name!r}")
    assert not any(tmp_path.iterdir())  # nothing written, inside the bundle root or outside it


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num_slices", "99"], "99 adjacent slices are needed along z for the axial view"),
        (["--slice_centre", "31"], "centre 31 for the axial view is outside the volume or too close to its border"),
    ],
)
def test_projection_settings_that_do_not_fit_the_grid_are_one_line_before_any_scan_is_read(tmp_path, data, options,
                                                                                           message):  # fmt: skip
    result = _bundle("run", "training", "--config_file", "configs/distill.json", "--bundle_root", str(tmp_path),
                     "--dataset_dir", str(data), "--kd_enabled", "false", *options, *TINY)  # fmt: skip
    _assert_one_line(result, "projection settings on the --spatial_size [32, 32, 32] grid: ", message)
    assert not (tmp_path / "eval").exists()


def test_an_error_during_evaluation_is_one_line_without_tracebacks(tmp_path, data, student_root):
    datalist = _datalist_with_a_broken_scan(tmp_path, data, "test")
    configs = "['configs/distill.json','configs/evaluate.json']"
    result = _bundle("run", "--config_file", configs, "--bundle_root", str(student_root), "--datalist_file",
                     str(datalist), "--synthetic_data", "false", *TINY)  # fmt: skip
    _assert_one_line(result, "broken.nii.gz: could not be read as a NIfTI file or DICOM series")
    # MONAI's StatsHandler reported it once, as one line, not the exception chain twice
    assert result.stdout.count("broken.nii.gz: could not be read") == 1, result.stdout[-3000:]


def test_an_error_during_training_is_one_line(tmp_path, data):
    datalist = _datalist_with_a_broken_scan(tmp_path, data, "training")
    result = _bundle("run", "training", "--config_file", "configs/distill.json", "--bundle_root", str(tmp_path),
                     "--datalist_file", str(datalist), "--synthetic_data", "false", "--kd_enabled", "false",
                     "--cache_rate", "0", "--max_epochs", "1", *TINY)  # fmt: skip
    _assert_one_line(result, "broken.nii.gz: could not be read as a NIfTI file or DICOM series")
    assert "Epoch[1] Complete" not in result.stdout and not (tmp_path / "models" / "model_nokd.pt").exists()


def _training(root: Path, data: Path, run_name: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/distill.json",
            "--bundle_root", str(root), "--dataset_dir", str(data), "--kd_enabled", "false", "--max_epochs", "2",
            "--keep_training_state", "true", "--run_name", run_name, *TINY]  # fmt: skip


def _interrupt(cmd: list[str], state_dir: Path, sig: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` holding after its first epoch (``HOLD_ENV``), send ``sig`` once it holds there.

    The run writes ``<state_dir>/held`` after the first epoch's training state and waits for the signal, so the
    signal always lands between the two epochs, however fast or slow the machine."""
    env = dict(_env(), **{HOLD_ENV: "1"})
    proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = state_dir / "held"
    deadline = time.monotonic() + 300
    try:
        while not held.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and held.is_file(), f"the run did not hold after its first epoch: {proc.poll()}"
        assert (state_dir / "state_checkpoint_1.pt").is_file()
    except BaseException:  # never leave a held run behind: it would wait for its signal after the test is gone
        proc.kill()
        proc.communicate(timeout=60)
        raise
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "resume" / "state_checkpoint_2.pt", weights_only=True)
    return state["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-7), key


def test_an_interrupted_run_says_where_it_is_and_resumes_to_the_uninterrupted_weights(tmp_path, data):
    reference = subprocess.run(_training(tmp_path / "a", data, "run"), cwd=BUNDLE_ROOT, env=_env(),
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    root = tmp_path / "b"
    result = _interrupt(_training(root, data, "run"), root / "eval" / "run" / "resume",
                        signal.SIGINT)  # fmt: skip
    lines = _stderr(result)
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    prefix = f"interrupted: the partial run is in {root / 'eval' / 'run'} (last completed epoch "
    assert lines[0].startswith(prefix) and "; continue it with: python -m monai.bundle run training" in lines[0]
    assert "Traceback" not in result.stdout
    # the command it prints continues the run
    command = shlex.split(lines[0].split("; continue it with: ", 1)[1])
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=BUNDLE_ROOT, env=_env(), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_same_weights(_final_weights(tmp_path / "a" / "eval" / "run"), _final_weights(root / "eval" / "run"))
    best_a = torch.load(tmp_path / "a" / "eval" / "run" / "model_nokd.pt", weights_only=True)
    best_b = torch.load(root / "eval" / "run" / "model_nokd.pt", weights_only=True)
    _assert_same_weights(best_a, best_b)
    runs = json.loads((root / "eval" / "run" / "run.json").read_text(encoding="utf-8"))["runs"]
    assert [r["resumed"] for r in runs] == [False, True]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, data):
    reference = subprocess.run(_training(tmp_path / "a", data, "run"), cwd=BUNDLE_ROOT, env=_env(),
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    root = tmp_path / "b"
    killed = _interrupt(_training(root, data, "run"), root / "eval" / "run" / "resume",
                        signal.SIGKILL)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run([*_training(root, data, "run"), "--resume", "true"], cwd=BUNDLE_ROOT, env=_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(_final_weights(tmp_path / "a" / "eval" / "run"), _final_weights(root / "eval" / "run"))
