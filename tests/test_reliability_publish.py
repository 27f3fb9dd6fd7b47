# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Publish-only-if-better through the command line, on the default data path (the stacked cache): the published
model records the validation split it was scored on, and a worse run never replaces a better model, nor pushes it
out of ``models/previous/``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from scripts.checkpoints import METADATA_KEY, checkpoint_metadata, split_digest
from scripts.handlers import PublishCheckpoint

TINY = ["--spatial_size", "[32,32,32]", "--batch_size", "6", "--progress_bar", "false"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(BUNDLE_ROOT), MONAI_FAIL_ON_DUPLICATE_CONFIG="1")


def _train(root: Path, data: Path, run_name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/distill.json",
           "--bundle_root", str(root), "--dataset_dir", str(data), "--kd_enabled", "false", "--max_epochs", "1",
           "--run_name", run_name, *TINY, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _rescored(source: Path, destination: Path, score: float) -> Path:
    """``source`` with its recorded validation score set to ``score`` (what a better earlier run would have left)."""
    state = torch.load(source, weights_only=True)
    info = checkpoint_metadata(state)
    info["validation"]["score"] = score
    state._metadata[METADATA_KEY] = info
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, destination)
    return destination


@pytest.fixture(scope="module")
def data(tiny_phantom_dataset) -> Path:
    return tiny_phantom_dataset.parent


def test_a_worse_run_on_the_default_data_path_does_not_replace_the_published_model(tmp_path, data):
    first = _train(tmp_path, data, "first")
    assert first.returncode == 0, first.stderr[-3000:]
    published = tmp_path / "models" / "model_nokd.pt"
    info = checkpoint_metadata(torch.load(published, weights_only=True))
    validation = json.loads((data / "datalist.json").read_text(encoding="utf-8"))["validation"]
    for entry in validation:
        entry["image"] = str(data / entry["image"])
    # the stacked cache (the default) still records the split the score was measured on
    assert info["validation"]["split"] == split_digest(validation), info["validation"]
    assert info["validation"]["scans"] == len(validation)
    score = info["validation"]["score"]
    assert score < 1.0, "the tiny run is expected to be imperfect"
    # an earlier, better model is published; the same recipe again (score `score`) must not replace it
    good = _digest(_rescored(published, published, 1.0))
    second = _train(tmp_path, data, "second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _digest(published) == good
    assert "kept: it scored val_f1_macro 1.0000 on the same validation split" in second.stdout + second.stderr


def test_publishing_twice_with_overwrite_keeps_the_better_model_in_previous(tmp_path):
    from test_reliability import _student_checkpoint

    published = _student_checkpoint(tmp_path / "models" / "model.pt", score=0.9, seed=1)
    good = _digest(published)
    worse = _student_checkpoint(tmp_path / "eval" / "a" / "model.pt", score=0.4, seed=2)
    worst = _student_checkpoint(tmp_path / "eval" / "b" / "model.pt", score=0.3, seed=3)
    assert PublishCheckpoint(worse, published, overwrite=True).publish()
    assert PublishCheckpoint(worst, published, overwrite=True).publish()
    assert _digest(published) == _digest(worst)
    assert _digest(tmp_path / "models" / "previous" / "model.pt") == good
    # a checkpoint without a recorded split is compared too (never replaced on a guess)
    unrecorded = _student_checkpoint(tmp_path / "eval" / "c" / "model.pt", score=0.1, split=None, seed=4)
    assert not PublishCheckpoint(unrecorded, published).publish()


def test_publish_false_leaves_models_untouched(tmp_path, data):
    """``--publish false`` (what every study cell passes): the best checkpoint stays in the run folder only."""
    run = _train(tmp_path, data, "unpublished", "--publish", "false")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "eval" / "unpublished" / "model_nokd.pt").is_file()
    assert not (tmp_path / "models").exists()
