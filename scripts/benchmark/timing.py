# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Clocks, percentiles and the description of the machine that every benchmark report carries."""

from __future__ import annotations

import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = [
    "BUNDLE_ROOT",
    "EpochTimer",
    "Stopwatch",
    "percentile",
    "median",
    "synchronize",
    "batch_size_of",
    "peak_rss_mb",
    "cuda_peak_mb",
    "load_average",
    "cpu_pressure",
    "memory_available_gb",
    "hardware_info",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` with linear interpolation between order statistics.

    For sorted values :math:`v_0 \\le \\dots \\le v_{n-1}`, position :math:`p = (n - 1) q / 100`, result
    :math:`v_{\\lfloor p \\rfloor} + (p - \\lfloor p \\rfloor)(v_{\\lceil p \\rceil} - v_{\\lfloor p \\rfloor})`.
    """
    if len(values) == 0:
        raise ValueError("percentile of an empty sequence.")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}.")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


class Stopwatch:
    """Wall time (``perf_counter``) and CPU time of this process and its reaped children (``getrusage``) of a
    block, after synchronising ``device`` at both ends::

        with Stopwatch(device) as clock:
            ...
        clock.wall_s, clock.cpu_s
    """

    def __init__(self, device: torch.device | str = "cpu", per_iteration: bool = False) -> None:
        self.device = torch.device(device)
        self.per_iteration = bool(per_iteration)
        self.wall_s = self.cpu_s = 0.0

    @staticmethod
    def _cpu() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._cpu0, self._wall0 = self._cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.wall_s = time.perf_counter() - self._wall0
        self.cpu_s = self._cpu() - self._cpu0


def batch_size_of(batch: Any) -> int:
    """Number of scans in a collated batch (dict of tensors) or a decollated one (list of dicts)."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Mapping):
        return len(batch)
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    raise ValueError(f"cannot tell the batch size of a batch of type {type(batch).__name__}.")


class EpochTimer:
    """Wall time and number of scans of every epoch, and of every iteration, of an ignite engine.

    An epoch is timed from ``EPOCH_STARTED`` to ``EPOCH_COMPLETED``; with ``per_iteration=True`` also each iteration,
    from ``GET_BATCH_STARTED`` (before the data loader yields the batch) to ``ITERATION_COMPLETED``. Each reading of
    ``time.perf_counter()`` follows ``torch.cuda.synchronize`` on a CUDA device, so per-iteration timing stops the
    host from queueing work ahead of the device: it is off by default, and epochs then show the real pace.
    Attach it after every other handler so that the work of the
    metrics and handlers at those events falls inside the measured intervals.

    Attributes:
        seconds: wall time of each completed epoch, in order.
        scans: number of scans (sum of batch sizes) of each completed epoch.
        iterations: number of iterations of each completed epoch.
        iteration_seconds: per epoch, the wall time of each iteration.
        iteration_scans: per epoch, the batch size of each iteration.
        cpu_seconds: CPU time (``time.process_time``, all threads of the process) of each completed epoch.
        loop_seconds: wall time of each completed epoch up to the end of its last iteration (the device
            synchronised there, once per epoch): the epoch without its ``EPOCH_COMPLETED`` work (validation,
            checkpoints, state), which is ``seconds - loop_seconds``.
    """

    def __init__(self, device: torch.device | str = "cpu", per_iteration: bool = False) -> None:
        self.device = torch.device(device)
        self.per_iteration = bool(per_iteration)
        self.seconds: list[float] = []
        self.scans: list[int] = []
        self.iterations: list[int] = []
        self.iteration_seconds: list[list[float]] = []
        self.iteration_scans: list[list[int]] = []
        self.cpu_seconds: list[float] = []
        self.loop_seconds: list[float] = []
        self._loop_end = 0.0
        self._start = 0.0
        self._cpu_start = 0.0
        self._batch_start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        synchronize(self.device)
        self.iteration_seconds.append([])
        self.iteration_scans.append([])
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def _batch_started(self, engine: Engine) -> None:
        if self.per_iteration:
            synchronize(self.device)
            self._batch_start = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        if self.per_iteration:
            synchronize(self.device)
            self.iteration_seconds[-1].append(time.perf_counter() - self._batch_start)
        self.iteration_scans[-1].append(batch_size_of(engine.state.batch))
        if engine.state.epoch_length and engine.state.iteration % engine.state.epoch_length == 0:  # the epoch's last
            synchronize(self.device)
            self._loop_end = time.perf_counter()

    def _epoch_completed(self, engine: Engine) -> None:
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.loop_seconds.append(self._loop_end - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)
        self.scans.append(sum(self.iteration_scans[-1]))
        self.iterations.append(len(self.iteration_scans[-1]))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def cuda_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024.0**2 if device.type == "cuda" else None


def load_average() -> float | None:
    """One-minute load average of the host (``None`` where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_pressure() -> float | None:
    """Linux pressure-stall ``some avg10`` of the CPU: % of the last 10 s in which runnable tasks waited for a CPU."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return float(dict(f.split("=") for f in line.split()[1:])["avg10"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def _meminfo_gb(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024.0**2, 1)
    except (OSError, ValueError):
        pass
    return None


def memory_available_gb() -> float | None:
    """``MemAvailable`` of ``/proc/meminfo`` in GiB (``None`` elsewhere)."""
    return _meminfo_gb("MemAvailable")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hardware_info(device: str | torch.device = "cpu", command: Sequence[str] | None = None) -> dict[str, Any]:
    """Host, library and device description recorded with every benchmark report."""
    import monai

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gb": _meminfo_gb("MemTotal"),
        "memory_available_gb": memory_available_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "device_name": _cpu_model(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure_some_avg10": cpu_pressure(),
        "git_commit": _git_commit(),
        "command": shlex.join(command) if command is not None else shlex.join(sys.argv),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1024.0**3, 1)
    return info
