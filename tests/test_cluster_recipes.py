# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The cluster recipes of docs/cluster.md, tested as far as one machine allows.

The SLURM batch script is valid bash (and passes shellcheck where it is installed), and runs end to end on this
machine with stand-ins for ``srun`` and ``scontrol`` (a one-node allocation: the Ray head, the study as the driver,
interrupted by the allocation's end and resumed by submitting it again); the KubeRay ``RayJob`` manifest parses,
its Ray version is the one of ``requirements-ray.txt``, every pod mounts the run folder at the same path, and its
entry point, like the batch script's example, is a valid study command.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml
from conftest import BUNDLE_ROOT, free_ray_head_port
from scripts.study.runner import main

SBATCH = BUNDLE_ROOT / "docs" / "cluster" / "slurm_study.sbatch"
RAYJOB = BUNDLE_ROOT / "docs" / "cluster" / "rayjob.yaml"
RAY_PIN = re.search(r"^ray==(\S+)$", (BUNDLE_ROOT / "requirements-ray.txt").read_text(), re.M).group(1)


def _dry_run(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--dry-run"]) == 0
    return out.getvalue()


def test_the_slurm_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n passed")
    result = subprocess.run(["shellcheck", "-s", "bash", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_slurm_example_is_a_valid_study_command():
    text = SBATCH.read_text()
    example = re.search(r"^#   sbatch .*?\n((?:#       .*\n)*)", text, re.M).group(0)
    args = shlex.split(" ".join(line.lstrip("#").strip().rstrip("\\") for line in example.splitlines()))
    study_args = args[args.index(str(SBATCH.relative_to(BUNDLE_ROOT))) + 1 :]
    assert 'python -m scripts.study run --executor ray "$@"' in text  # the script adds --executor ray
    out = _dry_run(["run", "--executor", "ray", *study_args])
    assert "213 cells (25 teacher, 185 student, 3 baseline) in /shared/pd-study/study-full" in out


def test_the_rayjob_manifest_runs_the_study_on_the_pinned_ray_with_a_shared_run_folder():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_PIN and spec["shutdownAfterJobFinishes"] is True
    entry = shlex.split(spec["entrypoint"])
    assert entry[:4] == ["python", "-m", "scripts.study", "run"] and "--executor" in entry
    out = _dry_run(entry[3:])
    run_dir = entry[entry.index("--run-dir") + 1]
    assert f"213 cells (25 teacher, 185 student, 3 baseline) in {run_dir}" in out
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert f":{RAY_PIN}-py3" in container["image"]  # the driver's Ray and the cluster's are one version
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            shared = [p for p, name in mounts.items() if "persistentVolumeClaim" in volumes[name]]
            assert any(run_dir.startswith(p + "/") for p in shared), (container["name"], mounts)
            assert {"name": "PYTHONPATH", "value": "/home/ray/bundle"} in container["env"]
    assert any(r["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for r in
               cluster["workerGroupSpecs"])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the batch script end to end on this machine
# ----------------------------------------------------------------------------------------------------------------
SRUN = """#!/bin/bash
# srun on one machine: drop srun's own options, run the step's command here
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in -w | -N | -n | --nodelist) shift 2 ;; *) shift ;; esac
done
exec "$@"
"""
SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && echo localhost
"""


def test_the_slurm_script_runs_the_study_and_a_second_submission_resumes_it(
    one_ray_at_a_time, tiny_phantom_dataset, tmp_path
):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install -r requirements-ray.txt); CI has it")
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    port = free_ray_head_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = dict(
        os.environ,
        PATH=f"{shims}{os.pathsep}{os.environ['PATH']}",
        HOME=str(tmp_path),  # the job's Ray token (~/.ray/auth_token)
        SLURM_JOB_ID="1",
        SLURM_JOB_NODELIST="localhost",
        SLURM_CPUS_PER_TASK="2",
        SLURM_SUBMIT_DIR=str(BUNDLE_ROOT),
        VENV=sys.prefix,
        RAY_PORT=str(port),
        RAY_TMP=ray_tmp,
    )
    run_dir = tmp_path / "shared" / "run"
    study = ["--matrix", "demo", "--only", "baseline-*", "--dataset-dir", str(tiny_phantom_dataset.parent),
             "--run-dir", str(run_dir), "--no-figures"]  # fmt: skip
    try:
        first = subprocess.run(["bash", str(SBATCH), *study, "--max-cells", "2"], env=env, capture_output=True,
                               text=True, timeout=600)  # fmt: skip
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "Ray: 2 cell tasks on 1 node, 2 CPUs, 0 GPUs" in first.stdout
        assert "Stopping after 2 cells" in first.stdout
        done = (run_dir / "results.jsonl").read_text().splitlines()
        second = subprocess.run(["bash", str(SBATCH), *study], env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "2 finished, 1 to run" in second.stdout and "Report:" in second.stdout
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert lines[:2] == done and len(lines) == 3
    assert {json.loads(line)["mode"] for line in lines} == {"ray"}
    leftover = subprocess.run(["pgrep", "-f", f"temp-dir={ray_tmp}"], capture_output=True, text=True)
    assert not leftover.stdout.strip(), "Ray processes outlived the batch script"
