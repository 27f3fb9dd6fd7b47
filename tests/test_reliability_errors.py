# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""One line, never a traceback, through the command line: a malformed datalist read with ``--input_split all``, a
last training batch of one scan, two runs started with the same ``--run_name``, a ``models/`` folder that cannot be
written at publish time."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from scripts.checkpoints import save_checkpoint
from scripts.networks import Student2D
from scripts.runs import HOLD_ENV
from test_reliability_cli import SETTINGS, TINY, _assert_one_line, _bundle, _env


@pytest.fixture(scope="module")
def data(tiny_phantom_dataset) -> Path:
    return tiny_phantom_dataset.parent


def _training(root: Path, data: Path, run_name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/distill.json",
            "--bundle_root", str(root), "--dataset_dir", str(data), "--kd_enabled", "false", "--max_epochs", "1",
            "--run_name", run_name, *TINY, *extra]  # fmt: skip


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '{"images": []}'])
def test_input_split_all_on_a_malformed_datalist_is_one_line(tmp_path, content):
    root = tmp_path / "bundle"
    torch.manual_seed(0)
    save_checkpoint(Student2D(), root / "models" / "model.pt", SETTINGS, kind="student")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(content, encoding="utf-8")
    result = _bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(root), "--input",
                     str(datalist), "--input_split", "all", timeout=120)  # fmt: skip
    _assert_one_line(result, f"error: datalist file {datalist}")


def test_input_split_with_a_folder_is_one_line_not_ignored(tmp_path, data):
    root = tmp_path / "bundle"
    torch.manual_seed(0)
    save_checkpoint(Student2D(), root / "models" / "model.pt", SETTINGS, kind="student")
    folder = data / "images"
    result = _bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(root), "--input",
                     str(folder), "--input_split", "validation", timeout=120)  # fmt: skip
    expected = f"error: --input_split 'validation' selects a list of a datalist JSON, but inference input {folder} "
    _assert_one_line(result, expected + "is a folder")


def test_a_last_training_batch_of_one_scan_trains(tmp_path, data):
    n = len(json.loads((data / "datalist.json").read_text(encoding="utf-8"))["training"])
    batch = n - 1  # n % (n - 1) == 1: the last batch would hold one scan
    cmd = _training(tmp_path, data, "one", "--batch_size", str(batch))
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "eval" / "one" / "model_nokd.pt").is_file()


def test_two_runs_with_the_same_run_name_at_once_one_is_refused_in_one_line(tmp_path, data):
    first = subprocess.Popen(_training(tmp_path, data, "same", "--max_epochs", "2"), cwd=BUNDLE_ROOT,
                             env=dict(_env(), **{HOLD_ENV: "1"}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        held = tmp_path / "eval" / "same" / "resume" / "held"
        deadline = time.monotonic() + 300
        while not held.is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and held.is_file(), "the first run did not hold after its first epoch"
        second = subprocess.run(_training(tmp_path, data, "same"), cwd=BUNDLE_ROOT, env=_env(), capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        _assert_one_line(second, f"error: run folder {tmp_path / 'eval' / 'same'} is in use by another run")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert (tmp_path / "eval" / "same" / "resume" / "state_checkpoint_1.pt").is_file()  # the first run's state


def test_a_models_folder_that_cannot_be_written_is_one_line_and_the_run_keeps_its_checkpoint(tmp_path, data):
    # a file where the models folder should be: no write into it can succeed, even as root
    (tmp_path / "models").write_bytes(b"not a folder")
    before = hashlib.sha1((tmp_path / "models").read_bytes()).hexdigest()
    result = subprocess.run(_training(tmp_path, data, "ro", "--ckpt_dir", str(tmp_path / "models")), cwd=BUNDLE_ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    run = tmp_path / "eval" / "ro"
    _assert_one_line(result, "error: cannot publish", f"this run's best checkpoint is in {run / 'model_nokd.pt'}")
    assert (run / "model_nokd.pt").is_file()
    assert hashlib.sha1((tmp_path / "models").read_bytes()).hexdigest() == before
