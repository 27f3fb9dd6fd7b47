# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
import json
import os
import subprocess
import sys

import pytest
from conftest import BUNDLE_ROOT
from scripts.study.runner import format_table, summarise


def test_summary_is_mean_and_sample_std_over_seeds():
    per_seed = [{"accuracy": 0.8, "roc_auc": None}, {"accuracy": 0.9, "roc_auc": 0.7}, {"accuracy": 1.0}]
    s = summarise(per_seed)
    assert s["accuracy"]["mean"] == pytest.approx(0.9) and s["accuracy"]["std"] == pytest.approx(0.1)
    assert s["roc_auc"] == {"mean": 0.7, "std": 0.0, "n": 1}  # undefined values are left out, not zeroed
    table = format_table({"a": s})
    assert "0.900 ± 0.100" in table and "| a |" in table and "n/a" in table


@pytest.mark.slow
def test_study_runs_the_whole_matrix_through_the_bundle(tiny_phantom_dataset, tmp_path):
    cmd = [sys.executable, "-m", "scripts.study", "--dataset-dir", str(tiny_phantom_dataset.parent),
           "--seeds", "0", "1", "--train-fractions", "0.5", "--teacher-epochs", "1", "--student-epochs", "1",
           "--name", "pytest-study", "--set", "spatial_size=[32,32,32]",
           "--set", f"bundle_root={tmp_path}"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT))
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (summary,) = (tmp_path / "eval").glob("pytest-study-*/summary.json")
    record = json.loads(summary.read_text())
    names = list(record["summary"])
    assert names[0] == "3D teacher" and len(record["per_seed"][names[1]]) == 2
    assert "SBR threshold (lowest putamen)" in names and "always PD (trivial baseline)" in names
