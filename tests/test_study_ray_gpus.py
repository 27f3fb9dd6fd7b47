# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The Ray executor's GPU scheduling, on a Ray cluster started apart (``ray start --head``, as on a SLURM
allocation) with 2 logical GPUs and reached by its address (``--ray-address``), with stand-in cells.

Ray hands out logical GPUs without touching any hardware, so the checks run on a CPU machine: with one GPU per
task at most two cells run at once, each with its own ``CUDA_VISIBLE_DEVICES``; a CPU task sees none; a task
asking for more GPUs than a node has fails before any cell runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install -r requirements-ray.txt); CI has it")

from conftest import free_ray_head_port  # noqa: E402
from scripts.study.cells import StudyContext  # noqa: E402
from scripts.study.executors import CellPlan, RayExecutor  # noqa: E402
from scripts.study.matrix import Cell  # noqa: E402


@pytest.fixture(scope="module")
def gpu_cluster(one_ray_at_a_time, tmp_path_factory):
    """``ray start --head --block`` with 2 CPUs and 2 logical GPUs; yields its address, stops it (SIGTERM) after."""
    if ray.is_initialized():
        ray.shutdown()
    port = free_ray_head_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    # the same authentication mode as this process (Ray's local instances switch it to tokens by default)
    mode = "token" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else "disabled"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
           "--num-cpus", "2", "--num-gpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
           "--temp-dir", temp]  # fmt: skip
    with log.open("w") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, RAY_AUTH_MODE=mode))
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def gpu_standin(ctx, cell) -> dict:
    """A cell that records its ``CUDA_VISIBLE_DEVICES``; a teacher also marks itself running, waits until another
    teacher runs beside it (or every teacher has started, or a deadline), and records the most teachers it saw
    running and theirs."""
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    if cell.kind != "teacher":
        return {"cell": cell.name, "seconds": {}, "device": device, "pid": os.getpid()}
    running, started = ctx.run_dir / "running", ctx.run_dir / "started"
    running.mkdir(exist_ok=True)
    started.mkdir(exist_ok=True)
    (started / cell.name).touch()
    (running / cell.name).write_text(device)
    beside: dict[str, str] = {}
    most, deadline = 0, time.monotonic() + 60
    while True:
        now = {}
        for p in running.iterdir():  # a teacher that finished may remove its mark between listing and reading
            with contextlib.suppress(FileNotFoundError):
                now[p.name] = p.read_text()
        most = max(most, len(now))
        beside.update({name: d for name, d in now.items() if name != cell.name})
        last = len(list(started.iterdir())) >= ctx.n_teachers  # nobody left to wait for
        if len(now) >= 2 or last or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    (running / cell.name).unlink()
    record = {"cell": cell.name, "seconds": {}, "device": device, "most_running": most, "beside": beside}
    return {**record, "pid": os.getpid()}


@pytest.fixture(scope="module")
def pickled_by_value():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_one_gpu_per_task_runs_two_cells_at_once_each_on_its_own_gpu(gpu_cluster, pickled_by_value, tmp_path):
    teachers = [Cell("teacher", seed=s) for s in range(4)]
    cells = [*teachers, Cell("baseline", baseline="sbr")]
    plan = CellPlan(StudyContext(run_dir=tmp_path, datasets={}, n_teachers=4), cells, n_teachers=4)
    records = {}
    # half a CPU per task: the CPUs would let four teachers run at once, the two GPUs let two
    executor = RayExecutor(gpu_cluster, gpus_per_teacher=1, cpus_per_task=0.5, cell_function=gpu_standin)
    with executor:
        assert executor.slots >= 1 and executor.gpus == {"teacher": 1.0, "student": 0.5, "baseline": 0.0}
        outcome = executor.run(plan, lambda cell, record: records.update({cell.name: record}))
    assert not outcome.failures and set(records) == {c.name for c in cells}
    assert not ray.is_initialized()  # the executor connected by address, and disconnected
    for teacher in teachers:
        r = records[teacher.name]
        assert r["most_running"] <= 2 and r["device"] in ("0", "1"), r
        assert all(device != r["device"] for device in r["beside"].values()), r  # never two on one GPU
    assert max(records[t.name]["most_running"] for t in teachers) == 2  # they did run two at a time
    assert len({records[t.name]["pid"] for t in teachers}) == len(teachers)  # each GPU cell in a fresh process
    assert records["baseline-sbr"]["device"] == ""  # a CPU task sees no GPU


def test_more_gpus_per_task_than_a_node_has_fail_before_any_cell_runs(gpu_cluster, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --gpus-per-teacher 4: no node of the Ray cluster \(1 node, 2 CPUs"):
        with RayExecutor(gpu_cluster, gpus_per_teacher=4):
            pass
    assert not ray.is_initialized()
