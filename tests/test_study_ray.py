# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The study on Ray (``--executor ray``), on a local Ray instance of 2 CPUs and no GPU shared by the module.

The tiny matrix of ``tests/test_study.py`` (one student seed) runs through Ray, interrupted by ``--max-cells``
and resumed, and gives the records and report of the local executor; stand-in cells (a test hook: the executor's
``cell_function``) check what happens when a teacher fails and when the study is interrupted. Ray is an optional
dependency (``requirements-ray.txt``): without it this module is skipped; CI installs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from test_study import MATRIX, TINY, _run

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install -r requirements-ray.txt); CI has it")

import scripts.study.runner as runner  # noqa: E402
from scripts.errors import InputError  # noqa: E402
from scripts.study.executors import RayExecutor  # noqa: E402

TEACHER = "teacher-f1-minmax-s0"
ONE_SEED = [*MATRIX, "--seeds", "1"]  # the tiny matrix of tests/test_study.py with one student seed
N_CELLS = 3 + 1 + 2 * 2 + 1  # baselines, teacher, projections × KD on/off, ablation variant
DEMO = ["--matrix", "demo", "--seeds", "2", "--teachers", "1", "--no-figures"]  # 3 baselines, 1 teacher, 4 students


@pytest.fixture(scope="module")
def ray_cluster(one_ray_at_a_time):
    """One local Ray instance for the module (a start costs seconds): 2 CPUs, no GPU, as on a CPU machine."""
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # stand-in cells travel to the workers
    yield ray.cluster_resources()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_the_study_modules_do_not_import_ray():
    code = (
        "import sys, argparse; import scripts.study.runner, scripts.study.executors, scripts.study.report; "
        "from scripts.study.executors import make_executor; "
        "make_executor(argparse.Namespace(executor='ray', ray_address=None, gpus_per_teacher=None, "
        "gpus_per_student=None, cpus_per_task=1.0)); "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# the tiny matrix through Ray and locally
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_studies(ray_cluster, tiny_phantom_dataset, tmp_path_factory):
    """The tiny matrix (one seed) twice, one thread per cell: locally (in-process, ``--jobs 1``) and through Ray,
    the latter stopped by ``--max-cells 5`` and resumed."""
    root = tmp_path_factory.mktemp("executors")
    args = [*ONE_SEED, *TINY, "--dataset-dir", str(tiny_phantom_dataset.parent), "--no-figures"]
    local, on_ray = root / "local" / "run", root / "ray" / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray tasks run with --cpus-per-task 1 (OMP_NUM_THREADS=1): same arithmetic
    try:
        with torch.random.fork_rng():
            _run("run", *args, "--run-dir", str(local))
    finally:
        torch.set_num_threads(threads)
    ray_args = ["run", *args, "--run-dir", str(on_ray), "--executor", "ray", "--cpus-per-task", "1"]
    first = _run(*ray_args, "--max-cells", "5")
    lines_first = (on_ray / "results.jsonl").read_text().splitlines()
    logs_first = {r["cell"]: (on_ray / "cells" / r["cell"] / "log.txt").stat().st_mtime_ns for r in _records(on_ray)}
    second = _run(*ray_args)
    return {"local": local, "ray": on_ray, "first": first, "second": second, "lines_first": lines_first,
            "logs_first": logs_first}  # fmt: skip


def test_ray_stops_after_max_cells_and_resumes_without_rerunning_finished_cells(two_studies):
    assert f"0 finished, {N_CELLS} to run" in two_studies["first"]
    assert "Ray: 5 cell tasks" in two_studies["first"] and "Stopping after 5 cells" in two_studies["first"]
    assert len(two_studies["lines_first"]) == 5
    assert f"5 finished, {N_CELLS - 5} to run" in two_studies["second"]
    assert f"Ray: {N_CELLS - 5} cell tasks" in two_studies["second"]
    lines = (two_studies["ray"] / "results.jsonl").read_text().splitlines()
    assert lines[:5] == two_studies["lines_first"] and len(lines) == N_CELLS
    for name, mtime in two_studies["logs_first"].items():  # their folders were not cleared and run again
        assert (two_studies["ray"] / "cells" / name / "log.txt").stat().st_mtime_ns == mtime, name


def test_ray_gives_the_cells_records_and_report_of_the_local_executor(two_studies):
    local = {r["cell"]: r for r in _records(two_studies["local"])}
    on_ray = {r["cell"]: r for r in _records(two_studies["ray"])}
    assert set(on_ray) == set(local) and len(on_ray) == N_CELLS
    for name, r in on_ray.items():
        want = local[name]
        assert r["mode"] == "ray" and want["mode"] == "in-process" and r["host"]
        same_paths = json.dumps(r.get("overrides")).replace(str(two_studies["ray"]), str(two_studies["local"]))
        assert r["axes"] == want["axes"] and json.loads(same_paths) == want.get("overrides")
        if r["axes"]["kind"] != "baseline":
            assert r["hardware"]["torch_threads"] == want["hardware"]["torch_threads"] == 1
            assert r["hardware"]["omp_num_threads"] == "1"
            assert r["training"] == want["training"]
        for key, got in r.get("predictions", {}).items():
            assert got["files"] == want["predictions"][key]["files"]
            assert got["scores"] == pytest.approx(want["predictions"][key]["scores"], abs=1e-6), (name, key)
        assert r.get("metrics") == want.get("metrics") and r.get("centres") == want.get("centres"), name

    def body(run_dir: Path) -> list[str]:  # the report less its command line and timing (hardware, load, run time)
        text = (run_dir / "report.md").read_text().split("## Run time per cell")[0]
        skip = ("**Hardware**", "    python -m scripts.study run")
        return [line for line in text.splitlines() if not line.startswith(skip)]

    assert body(two_studies["ray"]) == body(two_studies["local"])


# ----------------------------------------------------------------------------------------------------------------
# failures, interruption, resources (stand-in cells)
# ----------------------------------------------------------------------------------------------------------------
def standin_cell(ctx, cell) -> dict:
    """A cheap cell: marks that it ran (with its process id); a teacher raises a wrapped input error, or, with
    ``HANG`` in the run folder, blocks until cancelled."""
    marks = ctx.run_dir / "ran"
    marks.mkdir(exist_ok=True)
    (marks / cell.name).write_text(str(os.getpid()))
    if cell.kind == "teacher" and (ctx.run_dir / "HANG").exists():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until Ray cancels the task (kills this process)
            time.sleep(0.05)
    if cell.kind == "teacher":  # as MONAI wraps an input error raised inside a transform
        raise RuntimeError("applying transform <LoadScand>") from InputError("scan_07.nii.gz: not a NIfTI file")
    return {"cell": cell.name, "seconds": {}, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@pytest.fixture
def standins(ray_cluster, monkeypatch):
    monkeypatch.setattr(runner, "make_executor", lambda args: RayExecutor(cell_function=standin_cell))


def test_a_failed_teacher_fails_only_its_students_and_the_command_names_them(standins, tiny_phantom_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", *DEMO, "--dataset-dir", str(tiny_phantom_dataset.parent), "--run-dir", str(run_dir)]
    with pytest.raises(SystemExit) as failed:
        _run(*args, "--executor", "ray")
    message = str(failed.value)
    assert message.startswith("error: 3 cells failed (the other cells finished)")
    kd = [f"student-joint_fusion_slices-kd-fg+lg-f1-tf1-template-minmax-s{s}" for s in (0, 1)]
    assert f"{TEACHER}: InputError: scan_07.nii.gz: not a NIfTI file (log: " in message  # the input error, unwrapped
    for name in kd:
        assert f"{name}: not run: its teacher {TEACHER} failed" in message
        assert not (run_dir / "ran" / name).exists()  # never started
    independent = {"baseline-sbr", "baseline-always_pd", "baseline-centres"} | {
        f"student-joint_fusion_slices-nokd-f1-template-minmax-s{s}" for s in (0, 1)
    }
    assert {r["cell"] for r in _records(run_dir)} == independent  # every independent cell finished and was kept
    assert all(r["cuda_visible_devices"] == "" for r in _records(run_dir))  # CPU tasks see no GPU


def test_ctrl_c_cancels_the_running_cells_and_says_how_to_resume(
    standins, tiny_phantom_dataset, tmp_path, capsys, monkeypatch
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "HANG").touch()
    pid_file = run_dir / "ran" / TEACHER

    def interrupt() -> None:  # Ctrl-C once the teacher's task is running
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    args = ["run", *DEMO, "--dataset-dir", str(tiny_phantom_dataset.parent), "--run-dir", str(run_dir)]
    status = runner.main([*args, "--executor", "ray"])
    thread.join()
    assert status == 130
    assert "Run the same command again to resume." in capsys.readouterr().err
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the cancelled task's worker process is killed
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the teacher's worker process {worker} still runs after Ctrl-C")
    results = run_dir / "results.jsonl"
    assert not results.exists() or TEACHER not in results.read_text()  # the interrupted cell runs again on resume


def test_gpus_asked_of_a_cluster_without_gpus_fail_at_once_in_one_line(ray_cluster, tiny_phantom_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", *DEMO, "--dataset-dir", str(tiny_phantom_dataset.parent), "--run-dir", str(run_dir)]
    with pytest.raises(SystemExit) as failed:
        _run(*args, "--executor", "ray", "--gpus-per-teacher", "1")
    message = str(failed.value)
    assert "\n" not in message
    assert message == (
        "error: --gpus-per-teacher 1 asks for GPUs but the Ray cluster (1 node, 2 CPUs, 0 GPUs) has none; use "
        "--gpus-per-teacher 0 or a cluster with GPU nodes."
    )
    assert not (run_dir / "results.jsonl").exists() and not (run_dir / "cells").exists()  # no cell ran
    with pytest.raises(SystemExit, match="--cpus-per-task 4: no node"):
        _run(*args, "--executor", "ray", "--cpus-per-task", "4")
