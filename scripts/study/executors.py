# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Where the cells of a study run: on this machine (``local``) or on a Ray cluster (``ray``).

The runner (:mod:`scripts.study.runner`) decides *which* cells run (the unfinished ones, in matrix order) and is
the only writer of ``results.jsonl``; an executor decides *where and when* each of them runs. Every executor

* runs a cell from scratch: the cell's folder is cleared first, so a cell that was interrupted, or that ran on a
  node that was lost, is simply run again (cells are idempotent);
* starts a KD student only once its teacher cell has finished (or finds the teacher in ``results.jsonl``);
* hands each finished record to the runner as it arrives (:meth:`Executor.run`'s ``finished``), adding the
  cell's wall time (``record["seconds"]["wall"]``) and where it ran (``record["mode"]``);
* starts at most ``max_cells`` cells (``--max-cells``); the rest wait for the next run of the same command.

``local`` (:class:`LocalExecutor`, the default) runs the cells one after the other in the study's process
(``--subprocess``: each in a fresh ``python -m scripts.study cell`` process), or ``--jobs N`` cell processes side
by side on this machine. It stops at the first failing cell.

``ray`` (:class:`RayExecutor`) runs every cell as one Ray task (a GPU cell in a fresh worker process), on a
cluster it connects to (``--ray-address`` or ``RAY_ADDRESS``) or on a local Ray instance it starts. A KD student's task
takes its teacher task's ``ObjectRef`` as an argument, so Ray starts it when the teacher has finished and never
starts it when the teacher failed; every independent cell still runs to the end. Ray is an optional dependency
(``requirements-ray.txt``), imported only when this executor is used.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from monai.utils import look_up_option
from scripts.errors import find_input_error
from scripts.study.cells import BUNDLE_ROOT, StudyContext, cell_dir, run_cell
from scripts.study.matrix import Cell
from scripts.study.power import counted

__all__ = [
    "EXECUTORS",
    "CellPlan",
    "CellFailure",
    "Outcome",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "make_executor",
    "clear_cell_dir",
]

EXECUTORS = ("local", "ray")
CellFunction = Callable[[StudyContext, Cell], dict]
"""What runs one cell in a worker: :func:`scripts.study.cells.run_cell` (the study's cells) or a stand-in."""
Finished = Callable[[Cell, dict], None]


@dataclass
class CellPlan:
    """The cells of one run of the study.

    Attributes:
        ctx: the study every cell belongs to.
        cells: the unfinished cells, in matrix order (every teacher before its students).
        finished: names of the cells already in ``results.jsonl``.
        n_teachers: number of teacher seeds (a KD student of seed ``s`` learns from teacher ``s mod n``).
        max_cells: start at most this many cells (``None``: all).
    """

    ctx: StudyContext
    cells: list[Cell]
    finished: set[str] = field(default_factory=set)
    n_teachers: int = 1
    max_cells: int | None = None

    def teacher(self, cell: Cell) -> Cell | None:
        return cell.teacher(self.n_teachers)

    def selected(self) -> list[Cell]:
        """The cells this run may start: the first ``max_cells`` in matrix order (their teachers come first)."""
        return list(self.cells if self.max_cells is None else self.cells[: self.max_cells])

    @property
    def unselected(self) -> int:
        """How many cells lie beyond ``max_cells``: this run does not start them."""
        return len(self.cells) - len(self.selected())


@dataclass
class CellFailure:
    """A cell that did not finish: its one-line reason and its log."""

    cell: Cell
    message: str
    log: Path | None = None

    def line(self) -> str:
        return f"{self.cell.name}: {self.message}" + (f" (log: {self.log})" if self.log else "")


@dataclass
class Outcome:
    """What a run of an executor left: the failed cells and the number of cells it did not start (``max_cells``)."""

    failures: list[CellFailure] = field(default_factory=list)
    not_started: int = 0


def clear_cell_dir(run_dir: str | os.PathLike, cell: Cell) -> Path:
    """Remove what an earlier, unfinished run of ``cell`` left in its folder; returns the folder."""
    folder = cell_dir(run_dir, cell)
    if folder.exists():
        shutil.rmtree(folder)
    return folder


class Executor:
    """Runs the cells of a :class:`CellPlan`; a context manager (``with executor:``) around the runs, which holds
    whatever the executor needs meanwhile (a cluster connection)."""

    name = ""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @property
    def slots(self) -> int:
        """How many cells run at once (for the runner's time estimate)."""
        return 1

    def run(self, plan: CellPlan, finished: Finished) -> Outcome:
        """Run ``plan.selected()``, calling ``finished(cell, record)`` as each cell finishes, in this process."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# local
# ----------------------------------------------------------------------------------------------------------------
def start_cell_process(run_dir: Path, cell: Cell, threads: int | None = None) -> subprocess.Popen:
    """Start ``python -m scripts.study cell`` for ``cell`` (output in ``<cell dir>/process.log``); ``threads`` sets
    its ``OMP_NUM_THREADS`` (parallel jobs share the CPU cores)."""
    folder = cell_dir(run_dir, cell)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "scripts.study", "cell", str(run_dir), json.dumps(cell.as_dict())]
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with (folder / "process.log").open("a") as log:
        return subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def cell_process_record(run_dir: Path, cell: Cell, returncode: int) -> dict:
    """The record a finished cell process left in ``<cell dir>/record.json``."""
    folder = cell_dir(run_dir, cell)
    if returncode != 0:
        raise RuntimeError(f"exit status {returncode}; see {folder / 'process.log'} and {folder / 'log.txt'}")
    return json.loads((folder / "record.json").read_text())


class LocalExecutor(Executor):
    """The cells on this machine: one after the other, in this process or (``subprocess``) each in a fresh
    process, or ``jobs`` cell processes side by side. Stops at the first failing cell.

    Args:
        jobs: cells run at once, each in its own process (``> 1`` implies ``subprocess``). The CPU cores are
            shared: each process gets ``OMP_NUM_THREADS = max(1, cores // jobs)`` unless ``OMP_NUM_THREADS`` is set.
        subprocess: run each cell in a fresh ``python -m scripts.study cell`` process.
        cell_function: what runs a cell in this process (in-process mode only).
    """

    name = "local"

    def __init__(self, jobs: int = 1, subprocess: bool = False, cell_function: CellFunction = run_cell) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}.")
        self.jobs, self.subprocess, self.cell_function = int(jobs), bool(subprocess or jobs > 1), cell_function

    @property
    def slots(self) -> int:
        return self.jobs

    def run(self, plan: CellPlan, finished: Finished) -> Outcome:
        if self.jobs > 1:
            return self._run_parallel(plan, finished)
        selected = plan.selected()
        run_dir = plan.ctx.run_dir
        for cell in selected:
            folder = clear_cell_dir(run_dir, cell)
            print(f"-> {cell.name}", flush=True)
            start = time.perf_counter()
            try:
                if self.subprocess:
                    record = cell_process_record(run_dir, cell, start_cell_process(run_dir, cell).wait())
                else:
                    record = self.cell_function(plan.ctx, cell)
            except Exception as e:  # noqa: BLE001 - one line naming the cell; the traceback is in its log
                message = str(find_input_error(e) or e)
                return Outcome([CellFailure(cell, message, folder / "log.txt")], plan.unselected)
            record["seconds"]["wall"] = time.perf_counter() - start
            record["mode"] = "subprocess" if self.subprocess else "in-process"
            finished(cell, record)
        return Outcome(not_started=plan.unselected)

    def _run_parallel(self, plan: CellPlan, finished: Finished) -> Outcome:
        """Up to ``jobs`` cell processes at a time, each KD student once its teacher cell has finished. Teachers
        start first (they head the longest chains: a teacher, then its students), the rest in matrix order; in the
        demo this starts the teacher 11 s sooner than matrix order, which puts two baselines first."""
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // self.jobs))
        run_dir = plan.ctx.run_dir
        pending, done = sorted(plan.selected(), key=lambda c: c.kind != "teacher"), set(plan.finished)
        running: dict[str, tuple[Cell, subprocess.Popen, float]] = {}
        try:
            while pending or running:
                for cell in list(pending):
                    if len(running) >= self.jobs:
                        break
                    teacher = plan.teacher(cell)
                    if teacher is not None and teacher.name not in done:
                        continue  # its teacher is still training
                    clear_cell_dir(run_dir, cell)
                    print(f"-> {cell.name}", flush=True)
                    running[cell.name] = (cell, start_cell_process(run_dir, cell, threads), time.perf_counter())
                    pending.remove(cell)
                if not running:
                    return Outcome(not_started=plan.unselected + len(pending))
                time.sleep(0.5)
                for name, (cell, proc, start) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[name]
                    try:
                        record = cell_process_record(run_dir, cell, proc.returncode)
                    except Exception as e:  # noqa: BLE001 - one line naming the cell; the traceback is in its log
                        return Outcome([CellFailure(cell, str(e))], plan.unselected + len(pending))
                    record["seconds"]["wall"] = time.perf_counter() - start
                    record["mode"] = f"subprocess ({self.jobs} jobs)"
                    finished(cell, record)
                    done.add(name)
            return Outcome(not_started=plan.unselected)
        finally:
            for _, proc, _ in running.values():  # interrupted or failed: stop the other cells (they rerun on resume)
                proc.terminate()
                proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# ray
# ----------------------------------------------------------------------------------------------------------------
RAY_MISSING = "error: --executor ray needs Ray, an optional dependency: pip install -r requirements-ray.txt"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SystemExit(RAY_MISSING) from None
    return ray


def ray_cell_task(ctx: StudyContext, cell: Cell, teacher: dict | None, cell_function: CellFunction) -> dict:
    """The body of a cell's Ray task, in a Ray worker process: clear the cell's folder, run the cell, return its
    record. ``teacher`` is the teacher task's record (Ray passes it once the teacher has finished; ``None`` when the
    teacher was already in ``results.jsonl``): the student's dependency, its checkpoint is read from disk."""
    if teacher is not None and teacher.get("cell") != cell.teacher(ctx.n_teachers).name:
        raise RuntimeError(f"{cell.name} was handed the record of {teacher.get('cell')}, not of its teacher.")
    clear_cell_dir(ctx.run_dir, cell)
    start = time.perf_counter()
    try:
        record = cell_function(ctx, cell)
    except SystemExit as e:  # ending the worker process would read as a lost worker, and be retried
        raise RuntimeError(f"the cell exited ({e})") from None
    except Exception as e:
        inner = find_input_error(e)
        if inner is not None and inner is not e:
            raise inner from None  # MONAI wraps the bundle's input errors; their own message says what is wrong
        raise
    record["seconds"]["wall"] = time.perf_counter() - start
    record["mode"] = "ray"
    record["host"] = socket.gethostname()
    return record


def _one_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        text = str(cause).strip()
        return f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RayExecutor(Executor):
    """Every cell a Ray task, on an existing cluster or a local Ray instance.

    A task asks for ``cpus_per_task`` CPUs (its ``OMP_NUM_THREADS``) and the GPUs of its kind: teachers
    ``gpus_per_teacher``, students ``gpus_per_student`` (a fraction lets students share a GPU), baselines none.
    Ray gives a GPU task its own ``CUDA_VISIBLE_DEVICES``; a task without GPUs gets ``CUDA_VISIBLE_DEVICES=""``,
    so that it runs on the CPU even on a GPU node. A GPU task runs in a fresh worker process (its CUDA memory goes
    with the process); CPU tasks share worker processes, one cell after the other, as cells share the local
    executor's process. A task whose worker or node is lost is retried ``max_retries`` times (from scratch); a
    Python exception in a cell is not retried.

    Args:
        address: the cluster (``host:port``, ``auto``, ``ray://...``); ``None``: ``RAY_ADDRESS`` when set, else a
            new local Ray instance on this machine, stopped at the end.
        gpus_per_teacher, gpus_per_student: GPUs per task; ``None``: 1 and 0.5 when the cluster has GPUs, else 0.
            Asking for GPUs that no node has fails at once, before any cell runs (Ray would keep such a task
            pending forever).
        cpus_per_task: CPUs per task.
        cell_function: what a task runs (:func:`scripts.study.cells.run_cell`; tests use stand-ins).
        max_retries: retries of a task whose worker process or node died.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        gpus_per_teacher: float | None = None,
        gpus_per_student: float | None = None,
        cpus_per_task: float = 1.0,
        cell_function: CellFunction = run_cell,
        max_retries: int = 1,
    ) -> None:
        for option, value in (("--gpus-per-teacher", gpus_per_teacher), ("--gpus-per-student", gpus_per_student)):
            if value is not None and (value < 0 or (value > 1 and value != int(value))):
                raise ValueError(f"{option} must be a fraction up to 1 or a whole number of GPUs, got {value}.")
        if cpus_per_task <= 0:
            raise ValueError(f"--cpus-per-task must be positive, got {cpus_per_task}.")
        self.address = address
        self.requested = {"teacher": gpus_per_teacher, "student": gpus_per_student}
        self.gpus = {"teacher": 0.0, "student": 0.0, "baseline": 0.0}
        self.cpus_per_task, self.cell_function, self.max_retries = float(cpus_per_task), cell_function, max_retries
        self.ray = None
        self._connected = False
        self._cluster = {"CPU": 0.0, "GPU": 0.0, "nodes": 0}

    # -- connection --------------------------------------------------------------------------------------------
    def __enter__(self) -> RayExecutor:
        ray = self.ray = _import_ray()
        target = self.address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            try:
                if target:
                    ray.init(address=target, log_to_driver=False)
                else:
                    ray.init(include_dashboard=False, log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - one line: where and why
                hint = (
                    " The cluster may use token authentication: set RAY_AUTH_MODE=token here too, with its token in"
                    " ~/.ray/auth_token or RAY_AUTH_TOKEN."
                    if "auth" in str(e).lower() or "token" in str(e).lower()
                    else ""
                )
                where = f"the Ray cluster at {target}" if target else "a local Ray instance"
                raise SystemExit(f"error: could not connect to {where}: {_one_line(e)}.{hint}") from None
            self._connected = True
        try:
            self._check_resources()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._connected:
            self.ray.shutdown()  # a local instance stops; a cluster only loses this driver
            self._connected = False

    def _check_resources(self) -> None:
        """Resolve the GPUs per kind and fail at once on a request that no node of the cluster can meet."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        cpus, gpus = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
        self._cluster = {"CPU": cpus, "GPU": gpus, "nodes": len(nodes)}
        where = f"the Ray cluster ({counted(len(nodes), 'node')}, {cpus:g} CPUs, {gpus:g} GPUs)"
        for kind, asked in self.requested.items():
            self.gpus[kind] = (
                float(asked) if asked is not None else ((1.0 if kind == "teacher" else 0.5) if gpus else 0.0)
            )
            option = f"--gpus-per-{kind} {self.gpus[kind]:g}"
            if asked and not gpus:
                raise SystemExit(
                    f"error: {option} asks for GPUs but {where} has none; use --gpus-per-{kind} 0 or a cluster "
                    "with GPU nodes."
                )
            if self.gpus[kind] > max((n.get("GPU", 0.0) for n in nodes), default=0.0):
                raise SystemExit(f"error: {option}: no node of {where} has that many GPUs.")
        if self.cpus_per_task > max((n.get("CPU", 0.0) for n in nodes), default=0.0):
            raise SystemExit(f"error: --cpus-per-task {self.cpus_per_task:g}: no node of {where} has that many CPUs.")

    @property
    def slots(self) -> int:
        by_cpu = self._cluster["CPU"] // self.cpus_per_task
        by_gpu = self._cluster["GPU"] // self.gpus["student"] if self.gpus["student"] else by_cpu
        return max(1, int(min(by_cpu, by_gpu)))

    def resources(self, cell: Cell) -> dict:
        """The task options of ``cell``: CPUs, GPUs, and the environment of its worker process."""
        gpus = self.gpus[cell.kind]
        env = {
            "OMP_NUM_THREADS": str(max(1, int(self.cpus_per_task))),
            # the bundle's code on the worker (same path on every node: the repository on shared storage)
            "PYTHONPATH": os.pathsep.join(p for p in (str(BUNDLE_ROOT), os.environ.get("PYTHONPATH")) if p),
        }
        if not gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # Ray leaves it unset for CPU tasks: every GPU of the node would show
        return {
            "num_cpus": self.cpus_per_task,
            "num_gpus": gpus,
            "max_retries": self.max_retries,
            "retry_exceptions": False,
            "name": cell.name,
            "runtime_env": {"env_vars": env},
        }

    # -- running -----------------------------------------------------------------------------------------------
    def run(self, plan: CellPlan, finished: Finished) -> Outcome:
        ray = self.ray
        if ray is None:
            raise RuntimeError("use the executor as a context manager: `with RayExecutor(...) as executor:`.")
        # A GPU cell gets a fresh worker process (max_calls=1: its CUDA memory goes with the process); CPU cells run
        # one after the other in a worker, as in the local executor's process (no start-up and imports per cell).
        tasks = {True: ray.remote(max_calls=1)(ray_cell_task), False: ray.remote(ray_cell_task)}
        selected = plan.selected()
        refs, cells = {}, {}
        for cell in selected:
            teacher = plan.teacher(cell)
            after = refs.get(teacher.name) if teacher is not None else None  # None: finished in an earlier run
            if teacher is not None and after is None and teacher.name not in plan.finished:
                raise ValueError(
                    f"{cell.name} needs its teacher {teacher.name}, which is neither finished nor planned."
                )
            task = tasks[self.gpus[cell.kind] > 0]
            ref = task.options(**self.resources(cell)).remote(plan.ctx, cell, after, self.cell_function)
            refs[cell.name], cells[ref] = ref, cell
        per_kind = ", ".join(
            f"{k} {self.cpus_per_task:g} CPU {self.gpus[k]:g} GPU" for k in ("teacher", "student", "baseline")
        )
        print(
            f"Ray: {counted(len(selected), 'cell task')} on {counted(self._cluster['nodes'], 'node')}, "
            f"{self._cluster['CPU']:g} CPUs, "
            f"{self._cluster['GPU']:g} GPUs ({per_kind} per task).",
            flush=True,
        )
        failures: list[CellFailure] = []
        pending = list(cells)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)  # a timeout lets Ctrl-C through
                for ref in ready:
                    cell = cells[ref]
                    try:
                        record = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - the cell failed; the others go on
                        failures.append(self._failure(plan, cell, e, refs))
                        print(f"x {failures[-1].line()}", flush=True)
                        continue
                    finished(cell, record)
        finally:
            for ref in pending:  # interrupted: stop what runs, drop what waits (those cells rerun on resume)
                ray.cancel(ref, force=True)
        return Outcome(failures, plan.unselected)

    def _failure(self, plan: CellPlan, cell: Cell, error: Exception, refs: dict) -> CellFailure:
        teacher = plan.teacher(cell)
        if teacher is not None and teacher.name in refs:
            ready, _ = self.ray.wait([refs[teacher.name]], timeout=0)
            try:
                if ready:
                    self.ray.get(ready[0])
            except Exception:  # noqa: BLE001 - the teacher failed, so Ray never started this cell
                return CellFailure(cell, f"not run: its teacher {teacher.name} failed")
        return CellFailure(cell, _one_line(error), cell_dir(plan.ctx.run_dir, cell) / "log.txt")


def make_executor(args) -> Executor:
    """The executor of ``python -m scripts.study run`` options (``--executor``, ``--jobs``, ``--ray-address``...)."""
    name = look_up_option(args.executor, EXECUTORS)
    if name == "ray":
        return RayExecutor(args.ray_address, args.gpus_per_teacher, args.gpus_per_student, args.cpus_per_task)
    return LocalExecutor(jobs=args.jobs, subprocess=args.subprocess)
