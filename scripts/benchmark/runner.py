# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Throughput, latency and memory of the bundle's teacher training, distillation and inference paths.

``python -m scripts.benchmark [--device cpu|cuda] [--subjects N] [--spatial-size 64] [--batch-size B]
[--projections joint_fusion_slices early_fusion_slices ...] [--out bench.json] [--quick]``

One run measures, on one synthetic phantom set:

* **teacher training** (``configs/train_teacher.json``): scans/s of the bundle pipeline (the config's own
  ``CacheDataset``, ``DataLoader``, ``SupervisedTrainer``, postprocessing, key metric and handlers, built by
  ``monai.bundle.ConfigParser`` with overrides; only the ``ValidationHandler`` is removed so that training is
  isolated) and of the raw network on random tensors of the same shape and batch sizes (zero_grad, forward,
  loss, backward, optimizer step), and their ratio;
* **distillation** (``configs/distill.json``, :class:`scripts.engine.DistillationTrainer`) with
  ``cache_teacher_outputs`` false and true, against the raw student step plus the teacher forward pass (no
  cache) or the raw student step alone (cache);
* **inference latency** per scan at batch size 1, from a NIfTI file on disk to the PD probability (load,
  preprocessing, projection, forward, softmax), for the teacher and each requested student projection;
* **peak memory** of each case: the peak resident set size of the process that ran it (each case runs in its
  own fresh interpreter unless ``--no-isolate``), and ``torch.cuda.max_memory_allocated`` on CUDA;
* **fast-path options**, each against its baseline: ``ThreadDataLoader``, a plain-tensor ``prepare_batch``
  (:class:`PlainTensorBatch`), releasing the teacher's 3D input once its outputs are cached
  (:class:`ReleaseTeacherInput`), channels-last weights, ``torch.compile`` (``--compile``), and on CUDA only
  mixed precision and ``cudnn.benchmark``.

What a pipeline epoch time covers: from ``EPOCH_STARTED`` to the end of ``EPOCH_COMPLETED`` (after the key
metric and the other epoch handlers) of an epoch that follows ``--warmup-epochs`` untimed epochs, i.e. batch
collation from the filled cache, host-to-device copies, the training step, postprocessing (softmax and
decollation), the metric update and the iteration handlers. Filling the ``CacheDataset`` (load, resize,
normalise, project) happens before the first epoch and is reported separately as ``cache_fill_s``.

Every timed interval also records the process CPU time (``time.process_time``): with one thread
(``--threads 1``) scans per CPU-second hardly depend on other work sharing the machine, and
``cpu_s_per_wall_s`` of each case shows whether it got the CPUs its threads could use (the report warns when
not). The output is a JSON report (``--out``) and a short printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch, default_prepare_batch

__all__ = [
    "BUNDLE_ROOT",
    "EpochTimer",
    "ReleaseTeacherInput",
    "PlainTensorBatch",
    "percentile",
    "hardware_info",
    "bundle_parser",
    "run_case",
    "plan_cases",
    "build_report",
    "format_report",
    "main",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE_ROOT / "configs"
TEACHER_CONFIG = "train_teacher.json"
DISTILL_CONFIG = "distill.json"
INFERENCE_CONFIGS = ("inference.json",)
TEACHER_INFERENCE_CONFIGS = ("inference.json", "inference_teacher.json")
DEFAULT_PROJECTIONS = ("joint_fusion_slices", "early_fusion_slices")
CUDNN_BENCHMARK = (
    "$setattr(torch.backends.cudnn, 'benchmark', True)",
    "$setattr(torch.backends.cudnn, 'deterministic', False)",
)
"""``initialize`` entries that let cuDNN pick the fastest convolution algorithms (non-deterministic)."""
TEACHER_CHANNELS_LAST = "$@network_def.to(@device, memory_format=torch.channels_last_3d)"
"""``network`` of ``train_teacher.json`` with the 3D teacher's weights in channels-last (NDHWC) layout."""
DISTILL_TEACHER_CHANNELS_LAST = "$@teacher_def.to(memory_format=torch.channels_last_3d) if @kd_enabled else None"
"""``train#trainer#teacher`` of ``distill.json`` with the frozen teacher in channels-last layout."""
WIN_THRESHOLD = 0.05
"""An option "wins" when it is at least this much faster (relative) than the baseline it is compared with."""


# --------------------------------------------------------------------------------------------------------------------
# components used by the measured pipelines (the fast-path options)
# --------------------------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_size_of(batch: Any) -> int:
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

    An epoch is timed from ``EPOCH_STARTED`` to ``EPOCH_COMPLETED``, an iteration from ``GET_BATCH_STARTED`` (before
    the data loader yields the batch) to ``ITERATION_COMPLETED``; each reading of ``time.perf_counter()`` follows
    ``torch.cuda.synchronize`` on a CUDA device. Attach it after every other handler so that the work of the
    metrics and handlers at those events falls inside the measured intervals.

    Attributes:
        seconds: wall time of each completed epoch, in order.
        scans: number of scans (sum of batch sizes) of each completed epoch.
        iterations: number of iterations of each completed epoch.
        iteration_seconds: per epoch, the wall time of each iteration.
        iteration_scans: per epoch, the batch size of each iteration.
        cpu_seconds: CPU time (``time.process_time``, all threads of the process) of each completed epoch.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: list[float] = []
        self.scans: list[int] = []
        self.iterations: list[int] = []
        self.iteration_seconds: list[list[float]] = []
        self.iteration_scans: list[list[int]] = []
        self.cpu_seconds: list[float] = []
        self._start = 0.0
        self._cpu_start = 0.0
        self._batch_start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        _synchronize(self.device)
        self.iteration_seconds.append([])
        self.iteration_scans.append([])
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def _batch_started(self, engine: Engine) -> None:
        _synchronize(self.device)
        self._batch_start = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        _synchronize(self.device)
        self.iteration_seconds[-1].append(time.perf_counter() - self._batch_start)
        self.iteration_scans[-1].append(_batch_size_of(engine.state.batch))

    def _epoch_completed(self, engine: Engine) -> None:
        _synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)
        self.scans.append(sum(self.iteration_scans[-1]))
        self.iterations.append(len(self.iteration_scans[-1]))


class ReleaseTeacherInput:
    """Replace the teacher's cached 3D input by a one-voxel placeholder once the teacher's outputs are cached.

    With ``cache_teacher_outputs`` the :class:`scripts.engine.DistillationTrainer` reads the teacher's volume
    (``batch[key]``, ``(1, X, Y, Z)`` per scan) only in the first epoch; afterwards it needs just the scan
    names in the volume's metadata. At the end of the first epoch after which the trainer's ``teacher_cache``
    holds at least as many scans as ``dataset`` (a ``CacheDataset`` without random transforms, whose cached
    items are what the loader collates), this handler swaps every cached volume for a ``(1, 1, 1, 1)``
    ``MetaTensor`` carrying only ``filename_or_obj``. Later batches then no longer copy and collate the
    volumes, and the cache's memory is freed. It does nothing when the trainer does not cache teacher outputs.

    Args:
        dataset: the training ``CacheDataset``.
        key: the teacher-input key of the items (``teacher_key`` of the trainer).
    """

    def __init__(self, dataset: Any, key: str = "image_3d") -> None:
        if not hasattr(dataset, "_cache"):
            raise TypeError(f"ReleaseTeacherInput needs a monai.data.CacheDataset, got {type(dataset).__name__}.")
        self.dataset = dataset
        self.key = key
        self.released = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        cache = getattr(engine, "teacher_cache", None)
        if self.released or cache is None:
            return
        items = [item for item in self.dataset._cache if isinstance(item, dict) and self.key in item]
        names = {str(item[self.key].meta.get("filename_or_obj", "")) for item in items if _has_meta(item[self.key])}
        if not items or len(names) < len(items) or len(cache) < len(names):
            return  # some scans have no name or are not cached yet: the volumes are still needed
        for item in items:
            volume = item[self.key]
            placeholder = torch.zeros((1,) * volume.dim(), dtype=volume.dtype)
            item[self.key] = MetaTensor(placeholder, meta={"filename_or_obj": volume.meta["filename_or_obj"]})
        self.released = True


def _has_meta(value: Any) -> bool:
    return isinstance(value, MetaTensor) and bool(value.meta.get("filename_or_obj"))


class PlainTensorBatch(PrepareBatch):
    """``prepare_batch`` returning plain ``torch.Tensor`` image and label batches (``MetaTensor`` metadata dropped).

    MONAI's default (``monai.engines.default_prepare_batch``) hands the collated ``MetaTensor`` to the network,
    so every operation of the forward and backward passes goes through ``MetaTensor.__torch_function__``, the
    autograd graph keeps ``MetaTensor`` activations, and the prediction is decollated with its metadata; a
    ``MetaTensor`` input also cancels the gain of channels-last weights. Only the returned ``(image, label)``
    change: the batch dictionary is untouched, so handlers that read file names from ``engine.state.batch``
    and :class:`scripts.engine.DistillationTrainer` (which reads the scan names from the teacher input's
    metadata) work as before.

    Args:
        enabled: ``False`` returns the ``default_prepare_batch`` result unchanged, so that a config flag can
            switch the option.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(image, label)`` of ``batchdata`` on ``device``; ``label`` is ``None`` when the batch has none."""
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if self.enabled and isinstance(image, MetaTensor):
            image = image.as_tensor()
        if self.enabled and isinstance(label, MetaTensor):
            label = label.as_tensor()
        return image, label


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------
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


def _median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _load_average() -> float | None:
    """One-minute load average of the host (``None`` where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cpu_pressure() -> float | None:
    """Linux pressure-stall ``some avg10`` of the CPU: % of the last 10 s in which runnable tasks waited for a CPU."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return float(dict(f.split("=") for f in line.split()[1:])["avg10"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024.0**2, 1)
    except (OSError, ValueError):
        pass
    return None


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
        "memory_total_gb": _memory_total_gb(),
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
        "cpu_pressure_some_avg10": _cpu_pressure(),
        "git_commit": _git_commit(),
        "command": shlex.join(command) if command is not None else shlex.join(sys.argv),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1024.0**3, 1)
    return info


def bundle_parser(config_files: Sequence[str], overrides: Mapping[str, Any] | None = None):
    """A ``monai.bundle.ConfigParser`` reading ``configs/<file>`` (later files override earlier ones) + overrides.

    Override ids use MONAI's ``#`` separator (``"train#dataloader#_target_"``).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in config_files])
    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)  # the configs include blocks of other config files by paths from the bundle root
    try:
        parser.resolve_macro_and_relative_ids()
    finally:
        os.chdir(cwd)
    parser.update(dict(overrides or {}))
    return parser


def _drop_handlers(parser, path: str, targets: Sequence[str]) -> list[str]:
    handlers = parser[path]
    kept = [h for h in handlers if not (isinstance(h, dict) and h.get("_target_") in targets)]
    parser[path] = kept
    return [str(h.get("_target_")) for h in kept if isinstance(h, dict)]


def _epoch_batches(n_scans: int, batch_size: int) -> list[int]:
    """Batch sizes of one epoch of a ``DataLoader`` with ``drop_last=False``."""
    return [batch_size] * (n_scans // batch_size) + ([n_scans % batch_size] if n_scans % batch_size else [])


def _cuda_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024.0**2 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------------------
def _pipeline_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """One bundle training pipeline: build the trainer from its config, run warm-up + timed epochs."""
    parser = bundle_parser([spec["config"]], spec["overrides"])
    handlers = _drop_handlers(parser, "train#handlers", ["ValidationHandler"])
    if spec.get("plain_tensor_batch"):
        parser["train#trainer#prepare_batch"] = {"_target_": "scripts.benchmark.runner.PlainTensorBatch"}
    if spec.get("cudnn_benchmark"):  # after the config's set_determinism, which turns it off
        parser["initialize"] = [*parser["initialize"], *CUDNN_BENCHMARK]
    parser.get_parsed_content("initialize")
    start = time.perf_counter()
    dataset = parser.get_parsed_content("train#dataset")
    cache_fill = time.perf_counter() - start
    trainer = parser.get_parsed_content("train#trainer")
    if spec.get("release_teacher_input"):
        ReleaseTeacherInput(dataset, key=trainer.teacher_key).attach(trainer)
    timer = EpochTimer(device)
    timer.attach(trainer)
    trainer.run()
    warmup = int(spec["warmup_epochs"])
    timed_s, timed_scans = timer.seconds[warmup:], timer.scans[warmup:]
    if not timed_s:
        raise RuntimeError(f"no timed epoch: {len(timer.seconds)} epoch(s) ran, {warmup} warm-up.")
    rates = [n / s for n, s in zip(timed_scans, timed_s)]
    full = max(max(sizes) for sizes in timer.iteration_scans[warmup:])
    full_steps = [
        t
        for times, sizes in zip(timer.iteration_seconds[warmup:], timer.iteration_scans[warmup:])
        for t, b in zip(times, sizes)
        if b == full
    ]
    result = {
        "what": "bundle pipeline epoch (cached data -> collate -> step -> postprocessing -> metric -> handlers)",
        "config": spec["config"],
        "scans_per_s": _median(rates),
        "scans_per_s_best": max(rates),
        "scans_per_cpu_s": _median([n / c for n, c in zip(timed_scans, timer.cpu_seconds[warmup:]) if c > 0]),
        "epoch_s": _median(timed_s),
        "epoch_s_all": timed_s,
        "warmup_epoch_s": timer.seconds[:warmup],
        "scans_per_epoch": timed_scans[0],
        "iterations_per_epoch": timer.iterations[warmup],
        "batch_size": full,
        "full_batch_iteration_s_median": _median(full_steps),
        "cache_fill_s": cache_fill,
        "dataloader": type(trainer.data_loader).__name__,
        "prepare_batch": getattr(trainer.prepare_batch, "__name__", type(trainer.prepare_batch).__name__),
        "amp": bool(trainer.amp),
        "train_handlers": handlers,
    }
    cache = getattr(trainer, "teacher_cache", None)
    if hasattr(trainer, "kd_enabled"):
        result["teacher_cache"] = None if cache is None else {"hits": cache.hits, "misses": cache.misses}
    return result


def _raw_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The raw training step(s) of the config's network(s) on random tensors already on the device."""
    from monai.utils import set_determinism

    from scripts.projections import projection_spec

    student = spec["model"] == "student"
    teacher_dim = 0
    if student:  # the width of the teacher embedding, from a parameter-free ("meta") teacher
        with torch.device("meta"):
            teacher_dim = int(
                bundle_parser([spec["config"]], spec["overrides"]).get_parsed_content("teacher_def").embedding_dim
            )
    parser = bundle_parser([spec["config"]], spec["overrides"])
    set_determinism(seed=int(spec.get("seed", 0)))
    if spec.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    network = parser.get_parsed_content("network")
    optimizer = parser.get_parsed_content("optimizer")
    loss_fn = parser.get_parsed_content("loss")
    spatial = [int(s) for s in parser.get_parsed_content("spatial_size")]
    if student:
        proj = projection_spec(
            parser.get_parsed_content("projection"),
            int(parser.get_parsed_content("num_slices")),
            int(parser.get_parsed_content("gap")),
        )
        in_shape = (int(proj.in_channels), spatial[0], spatial[1])
    else:
        in_shape = (1, *spatial)
    teacher = None
    if student and spec.get("teacher_forward"):
        teacher = parser.get_parsed_content("teacher_def").to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    memory_format = None
    if spec.get("channels_last"):
        memory_format = torch.channels_last if student else torch.channels_last_3d
        network.to(memory_format=memory_format)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last_3d)
    model = torch.compile(network) if spec.get("compile") else network
    amp = bool(spec.get("amp")) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    num_classes = int(parser.get_parsed_content("num_classes"))
    generator = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    batches = _epoch_batches(int(spec["n_scans"]), int(spec["batch_size"]))
    data = []
    for b in sorted(set(batches)):
        x = torch.rand((b, *in_shape), generator=generator).to(device)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        y = (torch.arange(b) % num_classes).to(device)
        volume = torch.rand((b, 1, *spatial), generator=generator).to(device) if teacher is not None else None
        if volume is not None and memory_format is not None:
            volume = volume.contiguous(memory_format=torch.channels_last_3d)
        cached = (None, None)
        if student and teacher is None:  # teacher outputs as read from the cache
            cached = (
                torch.randn(b, num_classes, generator=generator).to(device),
                torch.rand(b, teacher_dim, generator=generator).to(device),
            )
        data.append((b, x, y, volume, cached))
    by_size = {d[0]: d for d in data}

    def step(b: int) -> None:
        _, x, y, volume, cached = by_size[b]
        t_logits, t_embedding = cached
        if teacher is not None:
            with torch.no_grad(), torch.autocast("cuda") if amp else nullcontext():
                t_logits, t_embedding = teacher.forward_with_embedding(volume)
            t_logits, t_embedding = t_logits.float(), t_embedding.float()
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda") if amp else nullcontext():
            if student:
                logits, embedding = (
                    model.forward_with_embedding(x) if not spec.get("compile") else _compiled_with_embedding(model, x)
                )
                loss = loss_fn(logits, embedding, y, t_logits, t_embedding)["loss"]
            else:
                loss = loss_fn(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def epoch() -> tuple[float, list[float], float]:
        steps = []
        _synchronize(device)
        cpu, start = time.process_time(), time.perf_counter()
        for b in batches:
            t0 = time.perf_counter()
            step(b)
            _synchronize(device)
            steps.append(time.perf_counter() - t0)
        return time.perf_counter() - start, steps, time.process_time() - cpu

    warm = [epoch()[0] for _ in range(int(spec["warmup_epochs"]))]
    timed = [epoch() for _ in range(int(spec["timed_epochs"]))]
    seconds = [t for t, _, _ in timed]
    n = sum(batches)
    return {
        "what": spec.get("what", "raw step on random tensors"),
        "config": spec["config"],
        "input_shape": [int(spec["batch_size"]), *in_shape],
        "scans_per_s": _median([n / s for s in seconds]),
        "scans_per_s_best": n / min(seconds),
        "scans_per_cpu_s": _median([n / c for _, _, c in timed if c > 0]),
        "epoch_s": _median(seconds),
        "epoch_s_all": seconds,
        "warmup_epoch_s": warm,
        "batch_size": max(batches),
        "full_batch_iteration_s_median": _median(
            [t for _, steps, _ in timed for t, b in zip(steps, batches) if b == max(batches)]
        ),
        "scans_per_epoch": n,
        "iterations_per_epoch": len(batches),
        "channels_last": bool(spec.get("channels_last")),
        "compile": bool(spec.get("compile")),
        "amp": amp,
    }


def _compiled_with_embedding(model: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward_with_embedding`` through a ``torch.compile`` wrapper (compiles that method, not ``forward``)."""
    module = getattr(model, "_orig_mod", model)
    fn = getattr(module, "_compiled_fwe", None)
    if fn is None:
        fn = torch.compile(module.forward_with_embedding)
        module._compiled_fwe = fn
    return fn(x)


def _inference_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Per-scan latency, batch size 1: NIfTI on disk -> preprocessing (+ projection) -> forward -> softmax."""
    configs = TEACHER_INFERENCE_CONFIGS if spec["model"] == "teacher" else INFERENCE_CONFIGS
    # the networks as built (no checkpoint to check or load in the config's initialize step)
    parser = bundle_parser(configs, {"load_pretrain": False, **spec["overrides"]})
    parser.get_parsed_content("initialize")
    preprocessing = parser.get_parsed_content("preprocessing")
    network = parser.get_parsed_content("network").eval()
    files = list(spec["files"])
    n_warm = int(spec["warmup"])
    total, pre, model, cpu = [], [], [], []
    shape = None
    for i, path in enumerate(files):
        _synchronize(device)
        c0, t0 = time.process_time(), time.perf_counter()
        item = preprocessing({"image": path})
        t1 = time.perf_counter()
        x = item["image"]
        x = (x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)).unsqueeze(0).to(device)
        with torch.no_grad():
            probability = float(torch.softmax(network(x), dim=1)[0, 1])
        t2, c2 = time.perf_counter(), time.process_time()
        if not 0.0 <= probability <= 1.0:
            raise RuntimeError(f"PD probability {probability} outside [0, 1] for {path}.")
        shape = list(x.shape)
        if i >= n_warm:
            total.append(t2 - t0)
            pre.append(t1 - t0)
            model.append(t2 - t1)
            cpu.append(c2 - c0)
    ms = 1000.0
    return {
        "what": "NIfTI file -> load, orient, resize, normalise (+ project) -> forward -> softmax -> PD probability",
        "model": spec["model"],
        "projection": spec.get("projection"),
        "input_shape": shape,
        "scans": len(total),
        "p50_ms": percentile(total, 50) * ms,
        "p95_ms": percentile(total, 95) * ms,
        "mean_ms": float(np.mean(total)) * ms,
        "preprocess_p50_ms": percentile(pre, 50) * ms,
        "model_p50_ms": percentile(model, 50) * ms,
        "model_p95_ms": percentile(model, 95) * ms,
        "cpu_p50_ms": percentile(cpu, 50) * ms,
    }


_CASES: dict[str, Callable[[Mapping[str, Any], torch.device], dict[str, Any]]] = {
    "pipeline": _pipeline_case,
    "raw": _raw_case,
    "inference": _inference_case,
}


def run_case(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one benchmark case in this process and return its measurements plus memory figures.

    ``spec["kind"]`` is ``"pipeline"``, ``"raw"`` or ``"inference"``; ``spec["device"]`` the torch device; an
    optional ``spec["threads"]`` sets ``torch.set_num_threads``. Memory: ``peak_rss_mb`` is the peak resident
    set size of this process when the case ends (``rss_at_start_mb`` before it began, after the imports);
    ``cuda_peak_mb`` is ``torch.cuda.max_memory_allocated`` since the case began (CUDA only).
    """
    if spec.get("kind") not in _CASES:
        raise ValueError(f"unknown case kind {spec.get('kind')!r}; expected one of {sorted(_CASES)}.")
    device = torch.device(spec.get("device", "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was requested but torch.cuda.is_available() is False.")
        torch.cuda.reset_peak_memory_stats(device)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rss_start = _peak_rss_mb()
    load_start, pressure_start = _load_average(), _cpu_pressure()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = _CASES[spec["kind"]](spec, device)
    wall = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (used.ru_utime - usage.ru_utime) + (used.ru_stime - usage.ru_stime)
    result.update(
        {
            "case_wall_s": wall,
            "cpu_s_per_wall_s": cpu / wall if wall > 0 else None,
            "load_average_start": load_start,
            "load_average_end": _load_average(),
            "cpu_pressure_some_avg10_start": pressure_start,
            "cpu_pressure_some_avg10_end": _cpu_pressure(),
            "torch_num_threads": torch.get_num_threads(),
            "rss_at_start_mb": rss_start,
            "peak_rss_mb": _peak_rss_mb(),
            "cuda_peak_mb": _cuda_peak_mb(device),
        }
    )
    return result


def _run_isolated(spec: Mapping[str, Any], work_dir: Path, timeout: float | None) -> dict[str, Any]:
    """Run one case in a fresh ``python -m scripts.benchmark --case`` process (its own peak RSS)."""
    spec_file = work_dir / f"case-{spec['name']}.json"
    out_file = work_dir / f"result-{spec['name']}.json"
    spec_file.write_text(json.dumps({**spec, "output": str(out_file)}))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BUNDLE_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "scripts.benchmark", "--case", str(spec_file)]
    try:
        proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out_file.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        return {"error": f"exit code {proc.returncode}: " + "\n".join(tail)}
    return json.loads(out_file.read_text())


# --------------------------------------------------------------------------------------------------------------------
# planning and reporting
# --------------------------------------------------------------------------------------------------------------------
def _datalist_files(dataset_dir: Path) -> tuple[list[dict], list[str]]:
    from scripts.data import SPLITS, load_datalist

    datalist = dataset_dir / "datalist.json"
    train = load_datalist(datalist, "training", fields=["image", "label"])
    content = json.loads(datalist.read_text())
    files: list[str] = []
    for split in SPLITS:
        if content.get(split):
            files += [e["image"] for e in load_datalist(datalist, split, require_labels=False, fields=["image"])]
    return train, files


def plan_cases(args: argparse.Namespace, dataset_dir: Path, bundle_root: Path) -> list[dict[str, Any]]:
    """Every case of one benchmark run, as JSON-serialisable specs for :func:`run_case`."""
    train, files = _datalist_files(dataset_dir)
    n_train = len(train)
    spatial = [int(args.spatial_size)] * 3
    device = args.device
    common = {
        "bundle_root": str(bundle_root),
        "dataset_dir": str(dataset_dir),
        "spatial_size": spatial,
        "progress_bar": False,
        "num_workers": 0,
        "device": f"$torch.device('{device}')",
        "seed": int(args.seed),
    }
    if args.batch_size:
        common["batch_size"] = int(args.batch_size)
    epochs = int(args.warmup_epochs) + int(args.epochs)
    base = {"device": device, "threads": args.threads, "seed": int(args.seed)}
    batch = {
        TEACHER_CONFIG: int(args.batch_size or bundle_parser([TEACHER_CONFIG])["batch_size"]),
        DISTILL_CONFIG: int(args.batch_size or bundle_parser([DISTILL_CONFIG])["batch_size"]),
    }
    projection = args.distill_projection or args.projections[0]
    cases: list[dict[str, Any]] = []

    def pipeline(name: str, config: str, group: str, **extra: Any) -> None:
        overrides = {**common, "max_epochs": epochs, "run_name": name, **extra.pop("overrides", {})}
        if config == DISTILL_CONFIG:
            overrides.setdefault("projection", projection)
        cases.append(
            {
                **base,
                "name": name,
                "group": group,
                "kind": "pipeline",
                "config": config,
                "overrides": overrides,
                "warmup_epochs": int(args.warmup_epochs),
                "timed_epochs": int(args.epochs),
                **extra,
            }
        )

    def raw(name: str, config: str, model: str, group: str, **extra: Any) -> None:
        overrides = {**common, **extra.pop("overrides", {})}
        if config == DISTILL_CONFIG:
            overrides.setdefault("projection", projection)
        cases.append(
            {
                **base,
                "name": name,
                "group": group,
                "kind": "raw",
                "config": config,
                "model": model,
                "overrides": overrides,
                "n_scans": n_train,
                "batch_size": batch[config],
                "warmup_epochs": 1,
                "timed_epochs": int(args.raw_epochs),
                **extra,
            }
        )

    cuda = device.startswith("cuda")
    # teacher training
    pipeline("teacher_pipeline", TEACHER_CONFIG, "teacher")
    raw("teacher_raw", TEACHER_CONFIG, "teacher", "teacher", what="teacher step (no data pipeline)")
    # distillation
    nocache = {"cache_teacher_outputs": False}
    cache = {"cache_teacher_outputs": True}
    pipeline("distill_nocache_pipeline", DISTILL_CONFIG, "distill", overrides=nocache)
    pipeline("distill_cache_pipeline", DISTILL_CONFIG, "distill", overrides=cache)
    raw(
        "distill_nocache_raw",
        DISTILL_CONFIG,
        "student",
        "distill",
        teacher_forward=True,
        what="student step + teacher forward (no_grad)",
    )
    raw("distill_cache_raw", DISTILL_CONFIG, "student", "distill", what="student step, teacher outputs given")
    # inference latency
    n_lat = int(args.latency_scans)
    warm = int(args.latency_warmup)
    picked = [files[i % len(files)] for i in range(n_lat + warm)]
    lat_common = {k: v for k, v in common.items() if k in ("bundle_root", "dataset_dir", "spatial_size", "device")}
    cases.append(
        {
            **base,
            "name": "inference_teacher",
            "group": "inference",
            "kind": "inference",
            "model": "teacher",
            "overrides": lat_common,
            "files": picked,
            "warmup": warm,
        }
    )
    for p in args.projections:
        cases.append(
            {
                **base,
                "name": f"inference_{p}",
                "group": "inference",
                "kind": "inference",
                "model": "student",
                "projection": p,
                "overrides": {**lat_common, "projection": p},
                "files": picked,
                "warmup": warm,
            }
        )
    if args.no_fast_path:
        return cases
    # fast-path options, each against its baseline above
    thread = {"train#dataloader#_target_": "ThreadDataLoader"}
    pipeline("teacher_pipeline_threadloader", TEACHER_CONFIG, "fast", overrides=thread, baseline="teacher_pipeline")
    pipeline("teacher_pipeline_plain", TEACHER_CONFIG, "fast", plain_tensor_batch=True, baseline="teacher_pipeline")
    pipeline(
        "distill_cache_threadloader",
        DISTILL_CONFIG,
        "fast",
        overrides={**cache, **thread},
        baseline="distill_cache_pipeline",
    )
    pipeline(
        "distill_cache_plain",
        DISTILL_CONFIG,
        "fast",
        overrides=cache,
        plain_tensor_batch=True,
        baseline="distill_cache_pipeline",
    )
    pipeline(
        "distill_cache_release",
        DISTILL_CONFIG,
        "fast",
        overrides=cache,
        release_teacher_input=True,
        baseline="distill_cache_pipeline",
    )
    raw("teacher_raw_channels_last", TEACHER_CONFIG, "teacher", "fast", channels_last=True, baseline="teacher_raw")
    pipeline(
        "teacher_pipeline_channels_last",
        TEACHER_CONFIG,
        "fast",
        overrides={"network": TEACHER_CHANNELS_LAST},
        baseline="teacher_pipeline",
    )
    pipeline(
        "teacher_pipeline_plain_channels_last",
        TEACHER_CONFIG,
        "fast",
        overrides={"network": TEACHER_CHANNELS_LAST},
        plain_tensor_batch=True,
        baseline="teacher_pipeline",
    )
    pipeline(
        "distill_nocache_channels_last_teacher",
        DISTILL_CONFIG,
        "fast",
        overrides={**nocache, "train#trainer#teacher": DISTILL_TEACHER_CHANNELS_LAST},
        baseline="distill_nocache_pipeline",
    )
    raw(
        "distill_cache_raw_channels_last",
        DISTILL_CONFIG,
        "student",
        "fast",
        channels_last=True,
        baseline="distill_cache_raw",
    )
    if args.compile:
        raw("teacher_raw_compile", TEACHER_CONFIG, "teacher", "fast", compile=True, baseline="teacher_raw")
        raw("distill_cache_raw_compile", DISTILL_CONFIG, "student", "fast", compile=True, baseline="distill_cache_raw")
    if cuda:
        amp = {"train#trainer#amp": True}
        pipeline("teacher_pipeline_amp", TEACHER_CONFIG, "fast", overrides=amp, baseline="teacher_pipeline")
        pipeline(
            "distill_nocache_amp",
            DISTILL_CONFIG,
            "fast",
            overrides={**nocache, **amp},
            baseline="distill_nocache_pipeline",
        )
        pipeline(
            "distill_cache_amp", DISTILL_CONFIG, "fast", overrides={**cache, **amp}, baseline="distill_cache_pipeline"
        )
        raw("teacher_raw_amp", TEACHER_CONFIG, "teacher", "fast", amp=True, baseline="teacher_raw")
        pipeline(
            "teacher_pipeline_cudnn_benchmark",
            TEACHER_CONFIG,
            "fast",
            cudnn_benchmark=True,
            baseline="teacher_pipeline",
        )
        pipeline(
            "distill_nocache_cudnn_benchmark",
            DISTILL_CONFIG,
            "fast",
            overrides=nocache,
            cudnn_benchmark=True,
            baseline="distill_nocache_pipeline",
        )
        raw(
            "teacher_raw_cudnn_benchmark",
            TEACHER_CONFIG,
            "teacher",
            "fast",
            cudnn_benchmark=True,
            baseline="teacher_raw",
        )
    return cases


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _get(results: Mapping[str, dict], name: str, key: str) -> float | None:
    value = results.get(name, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def build_report(
    settings: Mapping[str, Any], hardware: Mapping[str, Any], cases: Sequence[Mapping], results: Mapping[str, dict]
) -> dict[str, Any]:
    """Assemble the JSON report from the case results (ratios, speed-ups, memory, fast-path verdicts)."""

    def comparison(pipeline: str, raw: str) -> dict[str, Any]:
        p, r = _get(results, pipeline, "scans_per_s"), _get(results, raw, "scans_per_s")
        per_scan = None
        if p and r:
            per_scan = 1000.0 * (1.0 / p - 1.0 / r)
        return {
            "pipeline": results.get(pipeline),
            "raw": results.get(raw),
            "pipeline_over_raw": _ratio(p, r),
            "pipeline_over_raw_cpu": _ratio(
                _get(results, pipeline, "scans_per_cpu_s"), _get(results, raw, "scans_per_cpu_s")
            ),
            "pipeline_over_raw_best": _ratio(
                _get(results, pipeline, "scans_per_s_best"), _get(results, raw, "scans_per_s_best")
            ),
            "pipeline_over_raw_full_batch_median": _ratio(
                _get(results, raw, "full_batch_iteration_s_median"),
                _get(results, pipeline, "full_batch_iteration_s_median"),
            ),
            "pipeline_overhead_ms_per_scan": per_scan,
        }

    distill_nocache = comparison("distill_nocache_pipeline", "distill_nocache_raw")
    distill_cache = comparison("distill_cache_pipeline", "distill_cache_raw")
    inference = {"teacher": results.get("inference_teacher"), "students": {}, "student_over_teacher_p50": {}}
    teacher_p50 = _get(results, "inference_teacher", "p50_ms")
    teacher_model = _get(results, "inference_teacher", "model_p50_ms")
    inference["student_over_teacher_model_p50"] = {}
    for spec in cases:
        if spec["kind"] == "inference" and spec["model"] == "student":
            p = spec["projection"]
            inference["students"][p] = results.get(spec["name"])
            inference["student_over_teacher_p50"][p] = _ratio(_get(results, spec["name"], "p50_ms"), teacher_p50)
            inference["student_over_teacher_model_p50"][p] = _ratio(
                _get(results, spec["name"], "model_p50_ms"), teacher_model
            )
    memory = {
        spec["name"]: {
            "peak_rss_mb": _get(results, spec["name"], "peak_rss_mb"),
            "rss_at_start_mb": _get(results, spec["name"], "rss_at_start_mb"),
            "cuda_peak_mb": _get(results, spec["name"], "cuda_peak_mb"),
        }
        for spec in cases
    }
    fast: dict[str, Any] = {}
    for spec in cases:
        if spec.get("group") != "fast":
            continue
        base, name = spec["baseline"], spec["name"]
        speedup = _ratio(_get(results, name, "scans_per_s"), _get(results, base, "scans_per_s"))
        fast[name] = {
            "baseline": base,
            "scans_per_s": _get(results, name, "scans_per_s"),
            "baseline_scans_per_s": _get(results, base, "scans_per_s"),
            "speedup": speedup,
            "speedup_cpu": _ratio(_get(results, name, "scans_per_cpu_s"), _get(results, base, "scans_per_cpu_s")),
            "speedup_best": _ratio(_get(results, name, "scans_per_s_best"), _get(results, base, "scans_per_s_best")),
            "wins": None if speedup is None else bool(speedup >= 1.0 + WIN_THRESHOLD),
            "peak_rss_mb": _get(results, name, "peak_rss_mb"),
            "baseline_peak_rss_mb": _get(results, base, "peak_rss_mb"),
            "cuda_peak_mb": _get(results, name, "cuda_peak_mb"),
            "detail": results.get(name),
        }
    if not settings.get("device", "cpu").startswith("cuda"):
        fast["amp"] = {"skipped": "mixed precision is CUDA-only in MONAI engines (torch.autocast('cuda'))"}
    if not settings.get("compile"):
        fast.setdefault("compile", {"skipped": "torch.compile not requested (--compile)"})
    errors = {name: r["error"] for name, r in results.items() if isinstance(r, dict) and "error" in r}
    warnings = []
    cores = hardware.get("cpu_affinity") or hardware.get("cpu_count") or 1
    starved = []
    for spec in cases:
        r = results.get(spec["name"], {})
        share, threads = r.get("cpu_s_per_wall_s"), r.get("torch_num_threads") or 1
        if isinstance(share, (int, float)) and not spec.get("compile") and share < 0.85 * min(threads, cores):
            starved.append(f"{spec['name']} ({share:.2f} CPU-s/s with {threads} threads)")
    if starved:
        warnings.append(
            "these cases got less CPU time than their threads could use, so other work was competing for the "
            "CPUs and their wall-clock timings are unreliable (re-run on a quiet machine, or compare the "
            "CPU-time figures): " + ", ".join(starved)
        )
    loads = [r.get("load_average_start") for r in results.values() if isinstance(r, dict)]
    loads = [v for v in loads if isinstance(v, (int, float))]
    if loads and max(loads) > cores + 0.5:
        warnings.append(
            f"the 1-min load average (which counts this benchmark too) reached {max(loads):.2f} on {cores} CPUs at "
            "the start of a case: other work was running; see cpu_s_per_wall_s of each case."
        )
    return {
        "hardware": dict(hardware),
        "settings": dict(settings),
        "teacher_training": comparison("teacher_pipeline", "teacher_raw"),
        "distillation": {
            "no_cache": distill_nocache,
            "cache": distill_cache,
            "cache_speedup_pipeline": _ratio(
                _get(results, "distill_cache_pipeline", "scans_per_s"),
                _get(results, "distill_nocache_pipeline", "scans_per_s"),
            ),
            "cache_speedup_raw": _ratio(
                _get(results, "distill_cache_raw", "scans_per_s"), _get(results, "distill_nocache_raw", "scans_per_s")
            ),
        },
        "inference": inference,
        "memory": memory,
        "fast_path": fast,
        "errors": errors,
        "warnings": warnings,
    }


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def format_report(report: Mapping[str, Any]) -> str:
    """The printed summary: a few fixed-width tables."""
    lines: list[str] = []
    hw, st = report["hardware"], report["settings"]
    lines.append(
        f"device {hw['device']} ({hw['device_name']}), {hw['cpu_count']} CPUs, torch {hw['torch']} "
        f"({hw['torch_num_threads']} threads), monai {hw['monai']}; {st['n_train']} training scans at "
        f"{st['spatial_size']}^3, load average at start {_fmt((hw.get('load_average') or [None])[0])}, "
        f"at end {_fmt((hw.get('load_average_end') or [None])[0])}"
    )
    if report.get("warnings"):
        lines += [f"WARNING: {w}" for w in report["warnings"]]
    row = "{:<38} {:>9} {:>9} {:>9} {:>12} {:>13} {:>12}"
    lines.append("")
    lines.append(
        row.format(
            "training (timed epoch after warm-up)",
            "scans/s",
            "epoch s",
            "pipe/raw",
            "scans/CPU-s",
            "pipe/raw CPU",
            "peak RSS MB",
        )
    )
    for title, section in (
        ("teacher", report["teacher_training"]),
        ("distill, no teacher cache", report["distillation"]["no_cache"]),
        ("distill, teacher cache", report["distillation"]["cache"]),
    ):
        for label, key in (("pipeline", "pipeline"), ("raw", "raw")):
            r = section.get(key) or {}
            ratio = section.get("pipeline_over_raw") if key == "pipeline" else None
            ratio_cpu = section.get("pipeline_over_raw_cpu") if key == "pipeline" else None
            lines.append(
                row.format(
                    f"{title}: {label}",
                    _fmt(r.get("scans_per_s")),
                    _fmt(r.get("epoch_s")),
                    _fmt(ratio),
                    _fmt(r.get("scans_per_cpu_s")),
                    _fmt(ratio_cpu),
                    _fmt(r.get("peak_rss_mb"), ".0f"),
                )
            )
    dist = report["distillation"]
    lines.append(
        f"teacher-output cache speed-up: pipeline x{_fmt(dist['cache_speedup_pipeline'])}, "
        f"raw x{_fmt(dist['cache_speedup_raw'])}"
    )
    lines.append("")
    row = "{:<30} {:>9} {:>9} {:>12} {:>10} {:>9} {:>11} {:>12}"
    lines.append(
        row.format(
            "inference, batch 1",
            "p50 ms",
            "p95 ms",
            "preproc p50",
            "model p50",
            "vs teach",
            "CPU p50 ms",
            "peak RSS MB",
        )
    )
    inf = report["inference"]
    entries = [("teacher (3D)", inf.get("teacher") or {}, None)]
    entries += [(p, r or {}, inf["student_over_teacher_p50"].get(p)) for p, r in inf["students"].items()]
    for name, r, ratio in entries:
        lines.append(
            row.format(
                name,
                _fmt(r.get("p50_ms"), ".1f"),
                _fmt(r.get("p95_ms"), ".1f"),
                _fmt(r.get("preprocess_p50_ms"), ".1f"),
                _fmt(r.get("model_p50_ms"), ".1f"),
                _fmt(ratio, ".3f"),
                _fmt(r.get("cpu_p50_ms"), ".1f"),
                _fmt(r.get("peak_rss_mb"), ".0f"),
            )
        )
    fast = {k: v for k, v in report["fast_path"].items() if "baseline" in v}
    if fast:
        lines.append("")
        row = "{:<34} {:>12} {:>12} {:>9} {:>13} {:>6}"
        lines.append(row.format("fast-path option", "base scans/s", "opt scans/s", "speed-up", "speed-up CPU", "wins"))
        for name, v in fast.items():
            lines.append(
                row.format(
                    name,
                    _fmt(v["baseline_scans_per_s"]),
                    _fmt(v["scans_per_s"]),
                    _fmt(v["speedup"], ".3f"),
                    _fmt(v["speedup_cpu"], ".3f"),
                    _fmt(v["wins"]),
                )
            )
    for name, v in report["fast_path"].items():
        if "skipped" in v:
            lines.append(f"{name}: {v['skipped']}")
    for name, err in report.get("errors", {}).items():
        lines.append(f"ERROR in {name}: {err.splitlines()[-1] if err else ''}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.benchmark",
        description="Throughput, latency and memory of the bundle's teacher training, distillation and inference.",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--subjects", type=int, default=64, help="synthetic subjects, all in the training split (64)")
    p.add_argument("--dataset-dir", default=None, help="use this dataset folder (with datalist.json) instead")
    p.add_argument("--spatial-size", type=int, default=64, help="cubic grid of the preprocessed volumes (64)")
    p.add_argument("--batch-size", type=int, default=None, help="override both configs' batch size")
    p.add_argument("--projections", nargs="+", default=list(DEFAULT_PROJECTIONS), help="student projections")
    p.add_argument("--distill-projection", default=None, help="projection of the distillation runs (first above)")
    p.add_argument("--epochs", type=int, default=3, help="timed pipeline epochs (median reported, default 3)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first (default 1)")
    p.add_argument("--raw-epochs", type=int, default=3, help="timed raw epochs (after one warm-up epoch)")
    p.add_argument("--latency-scans", type=int, default=20, help="timed scans per inference case (20)")
    p.add_argument("--latency-warmup", type=int, default=2, help="untimed scans first (2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    p.add_argument("--no-fast-path", action="store_true", help="skip the fast-path option cases")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None, help="one process per case")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="run every case in this process")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per isolated case")
    p.add_argument("--work-dir", default=None, help="folder for the data and the runs (default: a temporary one)")
    p.add_argument("--out", default="bench.json", help="JSON report path (default bench.json)")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 timed epoch, 3 latency scans, in-process")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from scripts.projections import PROJECTIONS

    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch.cuda.is_available() is False.")
    for p in [*args.projections, *([args.distill_projection] if args.distill_projection else [])]:
        if p not in PROJECTIONS:
            parser.error(f"unknown projection {p!r}; valid: {', '.join(PROJECTIONS)}.")
    if args.spatial_size < 16:
        parser.error(f"--spatial-size must be >= 16 (the networks divide it by 32), got {args.spatial_size}.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    for name in ("subjects", "epochs", "raw_epochs", "latency_scans"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.batch_size is not None and args.batch_size < 2:
        parser.error(f"--batch-size must be >= 2 (batch normalisation in training), got {args.batch_size}.")


def _prepare_data(args: argparse.Namespace, work_dir: Path) -> Path:
    if args.dataset_dir:
        dataset_dir = Path(args.dataset_dir).resolve()
        if not (dataset_dir / "datalist.json").is_file():
            raise FileNotFoundError(f"{dataset_dir} has no datalist.json.")
        return dataset_dir
    from scripts.synthetic.phantom import generate_dataset

    dataset_dir = work_dir / "data"
    if not (dataset_dir / "datalist.json").is_file():
        workers = max(1, min(4, os.cpu_count() or 1))
        generate_dataset(
            dataset_dir, n_subjects=int(args.subjects), seed=int(args.seed), split=(1.0, 0.0, 0.0), workers=workers
        )
    return dataset_dir


def _write_teacher_checkpoint(bundle_root: Path, seed: int) -> None:
    """A randomly initialised teacher at ``<bundle_root>/models/teacher.pt`` (weights do not affect timings)."""
    torch.manual_seed(seed)
    teacher = bundle_parser([DISTILL_CONFIG]).get_parsed_content("teacher_def")
    path = bundle_root / "models" / "teacher.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | int:
    """Run the benchmark; returns the report (or 0 for an internal ``--case`` call)."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.case:  # internal: one isolated case
        spec = json.loads(Path(args.case).read_text())
        result = run_case(spec)
        Path(spec["output"]).write_text(json.dumps(result))
        return 0
    if args.quick:
        args.epochs, args.raw_epochs = min(args.epochs, 1), min(args.raw_epochs, 1)
        args.latency_scans, args.latency_warmup = min(args.latency_scans, 3), min(args.latency_warmup, 1)
    if args.isolate is None:
        args.isolate = not args.quick
    _check_args(parser, args)
    if args.threads:
        torch.set_num_threads(int(args.threads))

    own_dir = args.work_dir is None
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="pd-kd-bench-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    command = [Path(sys.executable).name, "-m", "scripts.benchmark", *argv]
    hardware = hardware_info(args.device, command)
    started = time.perf_counter()
    dataset_dir = _prepare_data(args, work_dir)
    bundle_root = work_dir / "bundle"
    _write_teacher_checkpoint(bundle_root, args.seed)
    cases = plan_cases(args, dataset_dir, bundle_root)
    results: dict[str, dict] = {}
    for spec in cases:
        print(f"[benchmark] {spec['name']} ...", flush=True)
        if args.isolate:
            results[spec["name"]] = _run_isolated(spec, work_dir, args.case_timeout)
        else:
            try:
                results[spec["name"]] = run_case(spec)
            except Exception as e:  # noqa: BLE001 - recorded in the report, the other cases still run
                results[spec["name"]] = {"error": f"{type(e).__name__}: {e}"}
    train, files = _datalist_files(dataset_dir)
    settings = {
        "device": args.device,
        "subjects": args.subjects if not args.dataset_dir else None,
        "dataset_dir": str(dataset_dir) if args.dataset_dir else "generated (synthetic phantoms)",
        "n_train": len(train),
        "spatial_size": int(args.spatial_size),
        "batch_size": {
            "teacher": next(c["batch_size"] for c in cases if c["name"] == "teacher_raw"),
            "distill": next(c["batch_size"] for c in cases if c["name"] == "distill_cache_raw"),
        },
        "projections": list(args.projections),
        "distill_projection": args.distill_projection or args.projections[0],
        "warmup_epochs": int(args.warmup_epochs),
        "timed_epochs": int(args.epochs),
        "raw_epochs": int(args.raw_epochs),
        "latency_scans": int(args.latency_scans),
        "latency_warmup": int(args.latency_warmup),
        "isolated_processes": bool(args.isolate),
        "memory_method": (
            "peak RSS (getrusage RUSAGE_SELF ru_maxrss) of a fresh interpreter per case, including imports"
            if args.isolate
            else "peak RSS of the single benchmark process so far (cases not isolated; cumulative)"
        ),
        "quick": bool(args.quick),
        "compile": bool(args.compile),
        "threads": args.threads,
        "win_threshold": WIN_THRESHOLD,
        "total_wall_s": time.perf_counter() - started,
    }
    hardware = {
        **hardware,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure_some_avg10_end": _cpu_pressure(),
    }
    report = build_report(settings, hardware, cases, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"report written to {out}")
    if own_dir:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    return report


if __name__ == "__main__":
    outcome = main()
    raise SystemExit(0 if isinstance(outcome, (int, dict)) else 1)
