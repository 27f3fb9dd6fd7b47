# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The benchmark's cases: each builds the bundle's own objects from its configs (with overrides) and times them.

A case is a JSON-serialisable spec (``kind`` plus its settings, see :func:`scripts.benchmark.plan.plan_cases`) run
by :func:`run_case`, in this process or in a fresh interpreter (:func:`run_isolated`) so that its peak memory is
its own. Kinds:

* ``pipeline``: a training config's trainer (``CacheDataset`` → loader → trainer → postprocessing → metric →
  handlers → validation as configured, on a third of the scans), warm-up epochs then timed epochs;
* ``raw``: the same network(s), optimizer and loss on random tensors already on the device, steps queued without
  waiting for the device (one synchronisation per epoch);
* ``trainer``: the overhead of the config's trainer in ms per iteration: the trainer around a near-free network
  against a bare loop of the same steps;
* ``datapath``: the training config's dataset, loader and ``prepare_batch`` alone: loader → batch → device, no
  network;
* ``latency``: one scan at a time, NIfTI file → the inference config's preprocessing → network → PD probability;
* ``folder``: the inference config's own ``DataLoader`` (parallel workers) over a folder of scans → network;
* ``decode``: reading the scans alone (nibabel decompression, then the bundle's loader with its checks);
* ``scale``: cache fill, memory and one data-path epoch for a number of scans and a grid, in memory or on disk.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from scripts.benchmark.timing import (
    BUNDLE_ROOT,
    EpochTimer,
    Stopwatch,
    cpu_pressure,
    cuda_peak_mb,
    load_average,
    median,
    peak_rss_mb,
    percentile,
    synchronize,
)

__all__ = [
    "CONFIGS",
    "TEACHER_CONFIG",
    "DISTILL_CONFIG",
    "NearFreeNetwork",
    "bundle_parser",
    "run_case",
    "run_isolated",
]

CONFIGS = BUNDLE_ROOT / "configs"
TEACHER_CONFIG = "train_teacher.json"
DISTILL_CONFIG = "distill.json"
STUDENT_INFERENCE = ("inference.json",)
TEACHER_INFERENCE = ("inference.json", "inference_teacher.json")
VALIDATION_SHARE = "$@train#datalist[: max(2, len(@train#datalist) // 3)]"
"""The validation scans of a benchmark run (all its scans are training scans): a third of them, as the 60/20/20
split of the synthetic sets gives."""


class NearFreeNetwork(torch.nn.Module):
    """A network that costs almost nothing, for measuring what a trainer adds around the network.

    The mean of the input (any number of channels and dimensions) goes through a ``Linear(1, embedding_dim)``
    (``encoder``) and a ``Linear(embedding_dim, num_classes)`` (``head``); ``forward_with_embedding`` returns both, as
    the bundle's teacher and students do, so that it can stand in for either.
    """

    def __init__(self, embedding_dim: int = 8, num_classes: int = 2) -> None:
        super().__init__()
        self.embedding_dim = int(embedding_dim)
        self.encoder = torch.nn.Linear(1, self.embedding_dim)
        self.head = torch.nn.Linear(self.embedding_dim, int(num_classes))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encoder(x.flatten(1).mean(dim=1, keepdim=True))
        return self.head(embedding), embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x)[0]


NEAR_FREE = {"_target_": "scripts.benchmark.cases.NearFreeNetwork"}


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


def _plain(value: Any) -> Any:
    return value.as_tensor() if isinstance(value, MetaTensor) else value


def _cache_bytes(dataset: Any, loader: Any) -> int:
    """Bytes of the preprocessed scans held in memory (the stacked cache, or the ``CacheDataset`` items)."""
    stacked = getattr(loader, "stacked", None)
    if stacked is not None:
        return int(stacked.nbytes)
    total = 0
    for item in getattr(dataset, "_cache", []) or []:
        for value in item.values() if isinstance(item, Mapping) else ():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _batch_bytes(batch: Mapping) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------
def _pipeline_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """One bundle training pipeline: build the trainer from its config, run warm-up + timed epochs."""
    parser = bundle_parser([spec["config"]], spec["overrides"])
    validation = bool(spec.get("validation", True))
    if validation:  # as configured (val_interval), on a held-out-sized share of the scans
        parser["validate#datalist"] = VALIDATION_SHARE
        handlers = [str(h.get("_target_")) for h in parser["train#handlers"] if isinstance(h, dict)]
    else:
        handlers = _drop_handlers(parser, "train#handlers", ["ValidationHandler"])
    parser.get_parsed_content("initialize")
    start = time.perf_counter()
    parser.get_parsed_content("train#dataset")
    cache_fill = time.perf_counter() - start
    trainer = parser.get_parsed_content("train#trainer")
    if validation:  # as the config's run step does
        parser.get_parsed_content("validate#early_stop").set_trainer(trainer)
    timer = EpochTimer(device)
    timer.attach(trainer)
    trainer.run()
    warmup = int(spec["warmup_epochs"])
    timed_s, timed_scans = timer.seconds[warmup:], timer.scans[warmup:]
    if not timed_s:
        raise RuntimeError(f"no timed epoch: {len(timer.seconds)} epoch(s) ran, {warmup} warm-up.")
    rates = [n / s for n, s in zip(timed_scans, timed_s)]
    full = max(max(sizes) for sizes in timer.iteration_scans[warmup:])
    result = {
        "what": "bundle pipeline epoch (cached data -> batch -> step -> postprocessing -> metric -> handlers"
        + (" -> validation as configured)" if validation else ")"),
        "validation": validation,
        "val_interval": int(parser.get_parsed_content("val_interval")) if validation else None,
        "config": spec["config"],
        "scans_per_s": median(rates),
        "scans_per_s_best": max(rates),
        "scans_per_cpu_s": median([n / c for n, c in zip(timed_scans, timer.cpu_seconds[warmup:]) if c > 0]),
        "epoch_s": median(timed_s),
        "epoch_s_all": timed_s,
        "warmup_epoch_s": timer.seconds[:warmup],
        "scans_per_epoch": timed_scans[0],
        "iterations_per_epoch": timer.iterations[warmup],
        "batch_size": full,
        "iteration_s_mean": median([s / n for s, n in zip(timed_s, timer.iterations[warmup:])]),
        "cache_fill_s": cache_fill,
        "dataloader": type(trainer.data_loader).__name__,
        "stacked_cache": getattr(trainer.data_loader, "stacked", None) is not None,
        "plain_tensor_batch": bool(getattr(trainer.prepare_batch, "enabled", False)),
        "amp": bool(trainer.amp),
        "teacher_channels_last": _is_channels_last_3d(getattr(trainer, "teacher", None) or trainer.network),
        "train_handlers": handlers,
    }
    cache = getattr(trainer, "teacher_cache", None)
    if hasattr(trainer, "kd_enabled"):
        result["teacher_cache"] = None if cache is None else {"hits": cache.hits, "misses": cache.misses}
    return result


def _trainer_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Trainer overhead: the config's trainer (loader, iteration, postprocessing, metrics, handlers, validation as
    configured) around a :class:`NearFreeNetwork`, against a bare loop of the same steps, in ms per iteration.

    The trainer's epoch is split where its last iteration ends: the iterations (loader, step, per-iteration handlers:
    what grows with the data set, the target's "overhead per iteration") and the epoch's end (validation, best
    checkpoint, training state: a fixed cost per epoch, reported in ms per epoch). With the benchmark's few
    iterations per epoch the fixed cost would otherwise dominate a per-iteration figure.

    The bare loop is what any training needs: ``zero_grad``, forward, loss, backward, ``step`` on batches already on
    the device (the trainer's own first batch), the same network, optimizer, loss and mixed precision, with one
    synchronisation per epoch. The difference is what the trainer adds per iteration. A second bare loop draws each
    batch from the trainer's own loader (``prepare_batch`` included; distillation with fixed teacher outputs, as
    after the first epoch with the teacher-output cache): its difference to the first is the data path's share of
    that overhead (on a CPU, the memory copy that gathers a batch from the stacked cache), and the trainer's loop
    minus it is the trainer's own share (engine, handlers, postprocessing).
    """
    from scripts.engine import DistillationTrainer

    # a bundle root of its own: the run publishes its near-free model to <bundle_root>/models/
    root = Path(spec["overrides"]["bundle_root"]).parent / f"{spec['name']}-bundle"
    overrides = {**spec["overrides"], "bundle_root": str(root), "network_def": dict(NEAR_FREE)}
    distill = spec["config"] == DISTILL_CONFIG
    if distill:
        path = root / "near_free_teacher.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(NearFreeNetwork().state_dict(), path)
        overrides.update({"teacher_def": dict(NEAR_FREE), "teacher_ckpt": str(path)})
    parser = bundle_parser([spec["config"]], overrides)
    validation = bool(spec.get("validation", True))
    if validation:
        parser["validate#datalist"] = VALIDATION_SHARE
    else:
        _drop_handlers(parser, "train#handlers", ["ValidationHandler"])
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    if validation:  # as the config's run step does
        parser.get_parsed_content("validate#early_stop").set_trainer(trainer)
    timer = EpochTimer(device)
    timer.attach(trainer)
    trainer.run()
    warmup = int(spec["warmup_epochs"])
    per_iteration = [s / n for s, n in zip(timer.seconds[warmup:], timer.iterations[warmup:])]
    if not per_iteration:
        raise RuntimeError(f"no timed epoch: {len(timer.seconds)} epoch(s) ran, {warmup} warm-up.")
    # the iterations alone (to the end of the epoch's last one) and what the epoch's end adds once per epoch
    loop = [s / n for s, n in zip(timer.loop_seconds[warmup:], timer.iterations[warmup:])]
    epoch_end = [s - lp for s, lp in zip(timer.seconds[warmup:], timer.loop_seconds[warmup:])]
    iterations = timer.iterations[warmup]

    # the bare loop on the trainer's own objects
    batch = next(iter(trainer.data_loader))
    x, y = trainer.prepare_batch(batch, device, True)
    network, optimizer = trainer.network, trainer.optimizer
    amp = bool(trainer.amp) and device.type == "cuda"
    amp_kwargs = dict(trainer.amp_kwargs or {}) if amp else {}
    scaler = torch.amp.GradScaler("cuda") if amp and amp_kwargs.get("dtype", torch.float16) == torch.float16 else None
    if distill:
        loss_fn = trainer.distillation_loss
        with torch.no_grad():
            t_logits, t_embedding = trainer.teacher.forward_with_embedding(_plain(batch["image_3d"]).to(device))
    else:
        loss_fn = trainer.loss_function

    batch_size = int(x.shape[0])

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", **amp_kwargs) if amp else nullcontext():
            logits, embedding = network.forward_with_embedding(x)
        if distill:
            n = x.shape[0]  # a last, smaller batch of the loader: the first batch's teacher outputs, cut to size
            loss = loss_fn(logits.float(), embedding.float(), y, t_logits[:n].float(), t_embedding[:n].float())["loss"]
        else:
            loss = loss_fn(logits.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    bare, loader_loop = [], []
    for epoch in range(warmup + len(per_iteration)):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            step(x, y)
        synchronize(device)
        if epoch >= warmup:
            bare.append((time.perf_counter() - start) / iterations)
    for epoch in range(warmup + len(per_iteration)):
        synchronize(device)
        start, n = time.perf_counter(), 0
        for batch in trainer.data_loader:
            step(*trainer.prepare_batch(batch, device, True))
            n += 1
        synchronize(device)
        if epoch >= warmup:
            loader_loop.append((time.perf_counter() - start) / max(n, 1))
    trainer_ms, bare_ms = 1000.0 * median(per_iteration), 1000.0 * median(bare)
    loop_ms, loader_ms = 1000.0 * median(loop), 1000.0 * median(loader_loop)
    return {
        "what": "ms per iteration of the config's trainer around a near-free network, against a bare loop",
        "config": spec["config"],
        "trainer": type(trainer).__name__,
        "validation": validation,
        "val_interval": int(parser.get_parsed_content("val_interval")) if validation else None,
        "log_interval": getattr(getattr(trainer, "loss_log", None), "interval", None),
        "teacher_cache": isinstance(trainer, DistillationTrainer) and trainer.teacher_cache is not None,
        "batch_size": batch_size,
        "iterations_per_epoch": iterations,
        "trainer_ms_per_iteration": trainer_ms,
        "bare_ms_per_iteration": bare_ms,
        "overhead_ms_per_iteration": trainer_ms - bare_ms,
        "loop_ms_per_iteration": loop_ms,
        "loop_overhead_ms_per_iteration": loop_ms - bare_ms,
        "loader_loop_ms_per_iteration": loader_ms,
        "data_path_ms_per_iteration": loader_ms - bare_ms,
        "trainer_own_ms_per_iteration": loop_ms - loader_ms,
        "epoch_end_ms": 1000.0 * median(epoch_end),
        "trainer_ms_per_iteration_all": [1000.0 * t for t in per_iteration],
        "bare_ms_per_iteration_all": [1000.0 * t for t in bare],
    }


def _is_channels_last_3d(network: torch.nn.Module | None) -> bool:
    """Whether the first 3D convolution weight with more than one input channel is in channels-last layout."""
    for p in network.parameters() if network is not None else ():
        if p.dim() == 5 and p.shape[1] > 1:
            return bool(p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous())
    return False


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
        torch.backends.cudnn.benchmark = True
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
    if student and spec.get("teacher_forward"):  # the config's frozen teacher (its layout included)
        teacher = parser.get_parsed_content("teacher").to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    memory_format = None
    if spec.get("channels_last"):  # an option on top of the config (the 3D teacher's layout is a config switch)
        memory_format = torch.channels_last if student else torch.channels_last_3d
        network.to(memory_format=memory_format)
    model = torch.compile(network) if spec.get("compile") else network
    amp = bool(spec.get("amp")) and device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None
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
        cached = (None, None)
        if student and teacher is None:  # teacher outputs as read from the cache
            cached = (
                torch.randn(b, num_classes, generator=generator).to(device),
                torch.rand(b, teacher_dim, generator=generator).to(device),
            )
        data.append((b, x, y, volume, cached))
    by_size = {d[0]: d for d in data}

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if amp else nullcontext()

    def step(b: int) -> None:
        _, x, y, volume, cached = by_size[b]
        t_logits, t_embedding = cached
        if teacher is not None:
            with torch.no_grad(), autocast():
                t_logits, t_embedding = teacher.forward_with_embedding(volume)
            t_logits, t_embedding = t_logits.float(), t_embedding.float()
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            if student:
                logits, embedding = (
                    model.forward_with_embedding(x) if not spec.get("compile") else _compiled_with_embedding(model, x)
                )
            else:
                logits = model(x)
        with torch.autocast("cuda", enabled=False) if amp else nullcontext():  # the loss in float32
            if student:
                loss = loss_fn(logits.float(), embedding.float(), y, t_logits, t_embedding)["loss"]
            else:
                loss = loss_fn(logits.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def epoch() -> tuple[float, None, float]:
        """One epoch of steps queued without waiting for the device; one synchronisation at its end."""
        synchronize(device)
        cpu, start = time.process_time(), time.perf_counter()
        for b in batches:
            step(b)
        synchronize(device)
        return time.perf_counter() - start, None, time.process_time() - cpu

    warm = [epoch()[0] for _ in range(int(spec["warmup_epochs"]))]
    timed = [epoch() for _ in range(int(spec["timed_epochs"]))]
    seconds = [t for t, _, _ in timed]
    n = sum(batches)
    return {
        "what": spec.get("what", "raw step on random tensors"),
        "config": spec["config"],
        "input_shape": [int(spec["batch_size"]), *in_shape],
        "scans_per_s": median([n / s for s in seconds]),
        "scans_per_s_best": n / min(seconds),
        "scans_per_cpu_s": median([n / c for _, _, c in timed if c > 0]),
        "epoch_s": median(seconds),
        "epoch_s_all": seconds,
        "warmup_epoch_s": warm,
        "batch_size": max(batches),
        "iteration_s_mean": median(seconds) / len(batches),
        "scans_per_epoch": n,
        "iterations_per_epoch": len(batches),
        "channels_last": bool(spec.get("channels_last")),
        "teacher_channels_last": _is_channels_last_3d(teacher if student else network),
        "compile": bool(spec.get("compile")),
        "amp": amp,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp else None,
    }


def _compiled_with_embedding(model: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward_with_embedding`` through a ``torch.compile`` wrapper (compiles that method, not ``forward``)."""
    module = getattr(model, "_orig_mod", model)
    fn = getattr(module, "_compiled_fwe", None)
    if fn is None:
        fn = torch.compile(module.forward_with_embedding)
        module._compiled_fwe = fn
    return fn(x)


def _iterate_data_path(
    loader, prepare_batch, device: torch.device, teacher_key: str | None = None, move_teacher_input: bool = False
) -> tuple[int, int, int]:
    """One pass of loader → batch → device, as the trainers do it; ``(scans, batches, bytes of the batches)``.

    ``teacher_key``: read the scan names the teacher-output cache is keyed on (distillation) and, with
    ``move_teacher_input`` (no teacher-output cache), move the teacher's volume to the device too.
    """
    from scripts.engine import _scan_keys

    scans = batches = nbytes = 0
    for batch in loader:
        image, label = prepare_batch(batch, device, non_blocking=True)
        if teacher_key is not None:
            _scan_keys(batch, teacher_key)
            if move_teacher_input:
                _plain(batch[teacher_key]).to(device, non_blocking=True)
        scans += int(image.shape[0])
        batches += 1
        nbytes += _batch_bytes(batch)
    return scans, batches, nbytes


def _datapath_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The training data path alone: the config's dataset, loader and ``prepare_batch``, no network."""
    parser = bundle_parser([spec["config"]], spec["overrides"])
    parser.get_parsed_content("initialize")
    with Stopwatch(device) as fill:
        dataset = parser.get_parsed_content("train#dataset")
    with Stopwatch(device) as build:
        loader = parser.get_parsed_content("train#dataloader")
    prepare_batch = parser.get_parsed_content("prepare_batch")
    teacher_key, move = spec.get("teacher_key"), bool(spec.get("move_teacher_input"))
    for _ in range(int(spec["warmup_epochs"])):
        _iterate_data_path(loader, prepare_batch, device, teacher_key, move)
    seconds, cpu, scans, batches, nbytes = [], [], 0, 0, 0
    for _ in range(int(spec["timed_epochs"])):
        with Stopwatch(device) as clock:
            scans, batches, nbytes = _iterate_data_path(loader, prepare_batch, device, teacher_key, move)
        seconds.append(clock.wall_s)
        cpu.append(clock.cpu_s)
    epoch_s = median(seconds)
    return {
        "what": "training data path alone: cached scans -> batch -> device (no network)",
        "config": spec["config"],
        "variant": spec.get("variant"),
        "scans_per_s": scans / epoch_s,
        "scans_per_s_best": scans / min(seconds),
        "scans_per_cpu_s": median([scans / c for c in cpu if c > 0]) if any(c > 0 for c in cpu) else None,
        "epoch_s": epoch_s,
        "epoch_s_all": seconds,
        "scans_per_epoch": scans,
        "batches_per_epoch": batches,
        "batch_size": int(parser.get_parsed_content("batch_size")),
        "ms_per_batch": 1000.0 * epoch_s / batches,
        "cpu_ms_per_batch": 1000.0 * median(cpu) / batches,
        "bytes_per_batch": nbytes / batches,
        "spatial_size": [int(s) for s in parser.get_parsed_content("spatial_size")],
        "cache_fill_s": fill.wall_s,
        "loader_build_s": build.wall_s,
        "cache_bytes": _cache_bytes(dataset, loader),
        "dataloader": type(loader).__name__,
        "stacked_cache": getattr(loader, "stacked", None) is not None,
        "cache_device": str(getattr(getattr(loader, "stacked", None), "device", "cpu")),
        "plain_tensor_batch": bool(getattr(prepare_batch, "enabled", False)),
        "teacher_input_moved": move,
    }


# --------------------------------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------------------------------
def _inference_parser(spec: Mapping[str, Any]):
    configs = TEACHER_INFERENCE if spec["model"] == "teacher" else STUDENT_INFERENCE
    parser = bundle_parser(configs, spec["overrides"])
    parser.get_parsed_content("initialize")
    return parser


def _latency_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Per-scan latency, batch size 1: NIfTI on disk -> preprocessing (+ projection) -> forward -> softmax."""
    parser = _inference_parser(spec)
    preprocessing = parser.get_parsed_content("preprocessing")
    network = parser.get_parsed_content("network").eval()
    files = list(spec["files"])
    n_warm = int(spec["warmup"])
    total, pre, model, cpu = [], [], [], []
    shape = None
    for i, path in enumerate(files):
        synchronize(device)
        c0, t0 = time.process_time(), time.perf_counter()
        item = preprocessing({"image": path})
        t1 = time.perf_counter()
        x = _plain(item["image"])
        x = torch.as_tensor(x).unsqueeze(0).to(device)
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
        "what": "NIfTI file -> preprocessing (+ projection) -> forward -> softmax -> PD probability, batch 1",
        "model": spec["model"],
        "projection": spec.get("projection"),
        "slice_centre": spec["overrides"].get("slice_centre", "config"),
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


def _folder_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Folder throughput: the inference config's ``DataLoader`` (its workers read and preprocess in parallel)
    over a folder of scans, the network on each batch, PD probabilities back on the host."""
    parser = _inference_parser(spec)
    loader = parser.get_parsed_content("dataloader")
    network = parser.get_parsed_content("network").eval()
    n_scans = 0
    first_batch_s = None
    with Stopwatch(device) as clock:
        for batch in loader:
            x = _plain(batch["image"]).to(device, non_blocking=True)
            with torch.no_grad():
                probabilities = torch.softmax(network(x), dim=1)[:, 1].cpu()
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - clock._wall0
            if not bool(((probabilities >= 0) & (probabilities <= 1)).all()):
                raise RuntimeError("a PD probability outside [0, 1].")
            n_scans += int(x.shape[0])
    return {
        "what": "folder of NIfTI files -> inference DataLoader (parallel workers) -> network -> PD probabilities",
        "model": spec["model"],
        "projection": spec.get("projection"),
        "slice_centre": spec["overrides"].get("slice_centre", "config"),
        "scans": n_scans,
        "num_workers": int(loader.num_workers),
        "batch_size": int(loader.batch_size),
        "seconds": clock.wall_s,
        "scans_per_s": n_scans / clock.wall_s,
        "cpu_ms_per_scan": 1000.0 * clock.cpu_s / n_scans,
        "first_batch_s": first_batch_s,
    }


def _decode_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Reading the scans alone, one process: nibabel decompression, and the bundle's loader (``LoadScand``)."""
    import nibabel as nib
    from scripts.transforms import LoadScand

    load = LoadScand(keys="image")
    decode, loader = [], []
    files = list(spec["files"])
    for path in files[: int(spec["warmup"])]:
        load({"image": path})
    for path in files[int(spec["warmup"]) :]:
        c0 = time.perf_counter()
        np.asanyarray(nib.load(path).dataobj)
        c1 = time.perf_counter()
        load({"image": path})
        loader.append(time.perf_counter() - c1)
        decode.append(c1 - c0)
    return {
        "what": "read one scan: decompression + NIfTI decoding (nibabel), and LoadScand (MONAI LoadImage + checks)",
        "scans": len(decode),
        "decode_p50_ms": 1000.0 * median(decode),
        "decode_scans_per_s": 1.0 / median(decode),
        "load_p50_ms": 1000.0 * median(loader),
        "file_mb": float(np.mean([os.path.getsize(p) for p in files])) / 1024.0**2,
    }


# --------------------------------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------------------------------
def scale_datalist(train: list[dict], n_scans: int, out: Path) -> Path:
    """A datalist of ``n_scans`` training entries cycling over ``train``, each a scan of its own: a copy
    ``images/scale-NNNNN.nii.gz`` of the source file and its own subject id (the datalist checks refuse an image
    listed twice, links included; the cache hashes each entry)."""
    entries = []
    images = out.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    # alternate the classes, so that even a few entries hold both (the datalist checks refuse one-class training)
    by_class = [[e for e in train if int(e["label"]) == c] for c in (0, 1)]
    by_class = [group for group in by_class if group]
    cycle = [
        by_class[i % len(by_class)][(i // len(by_class)) % len(by_class[i % len(by_class)])] for i in range(n_scans)
    ]
    for i in range(n_scans):
        source = cycle[i]
        suffix = ".nii.gz" if str(source["image"]).endswith(".nii.gz") else Path(source["image"]).suffix
        link = images / f"scale-{i:05d}{suffix}"
        if not link.exists():
            shutil.copyfile(Path(source["image"]).resolve(), link)
        entries.append({"image": str(link), "label": int(source["label"]), "subject": f"scale-{i:05d}"})
    out.write_text(json.dumps({"training": entries, "validation": [], "test": []}))
    return out


def _scale_case(spec: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Cache fill time and memory, and one data-path epoch, for ``n_scans`` scans on a ``spatial_size`` grid."""
    from scripts.benchmark.timing import memory_available_gb

    disk = spec["overrides"].get("persistent_cache_dir") or ""
    needed_gb = int(spec["n_scans"]) * int(spec["grid"]) ** 3 * 4 / 1024.0**3
    available = memory_available_gb()
    if not disk and available is not None and needed_gb > 0.5 * available:
        return {
            "n_scans": int(spec["n_scans"]),
            "spatial_size": int(spec["grid"]),
            "cache": "memory",
            "skipped": f"the in-memory cache would need {needed_gb:.1f} GB, over half of the {available:.1f} GB "
            "available: this is where the cache should spill to disk (persistent_cache_dir)",
            "cache_bytes_needed": int(spec["n_scans"]) * int(spec["grid"]) ** 3 * 4,
        }
    scale_datalist(list(spec["scale_sources"]), int(spec["n_scans"]), Path(spec["overrides"]["datalist_file"]))
    parser = bundle_parser([TEACHER_CONFIG], spec["overrides"])
    parser.get_parsed_content("initialize")
    rss0 = peak_rss_mb()
    with Stopwatch(device) as fill:
        dataset = parser.get_parsed_content("train#dataset")
        loader = parser.get_parsed_content("train#dataloader")
    prepare_batch = parser.get_parsed_content("prepare_batch")
    epochs = []
    for _ in range(int(spec.get("epochs", 2))):
        with Stopwatch(device) as clock:
            scans, _, _ = _iterate_data_path(loader, prepare_batch, device)
        epochs.append(clock.wall_s)
    disk_bytes = sum(p.stat().st_size for p in Path(disk).rglob("*.pt")) if disk else 0
    fill_s = fill.wall_s + (epochs[0] if disk else 0.0)  # a disk cache is written during the first epoch
    return {
        "what": "teacher data path: cache fill (load, orient, resize, normalise) and epochs of loader -> device",
        "n_scans": int(spec["n_scans"]),
        "spatial_size": int(spec["grid"]),
        "cache": "disk" if disk else "memory",
        "cache_fill_s": fill_s,
        "cache_fill_ms_per_scan": 1000.0 * fill_s / max(1, len(dataset)),
        "epoch_s": epochs,
        "first_epoch_s": epochs[0],
        "later_epoch_s": median(epochs[1:]) if len(epochs) > 1 else None,
        "scans_per_s": scans / (median(epochs[1:]) if len(epochs) > 1 else epochs[0]),
        "cache_bytes": _cache_bytes(dataset, loader),
        "disk_bytes": disk_bytes,
        "rss_growth_mb": peak_rss_mb() - rss0,
        "stacked_cache": getattr(loader, "stacked", None) is not None,
    }


_CASES: dict[str, Callable[[Mapping[str, Any], torch.device], dict[str, Any]]] = {
    "pipeline": _pipeline_case,
    "trainer": _trainer_case,
    "raw": _raw_case,
    "datapath": _datapath_case,
    "latency": _latency_case,
    "folder": _folder_case,
    "decode": _decode_case,
    "scale": _scale_case,
}


def run_case(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one benchmark case in this process and return its measurements plus memory figures.

    ``spec["kind"]`` is one of the kinds of this module; ``spec["device"]`` the torch device; an optional
    ``spec["threads"]`` sets ``torch.set_num_threads``. Memory: ``peak_rss_mb`` is the peak resident set size of
    this process when the case ends (``rss_at_start_mb`` before it began, after the imports); ``cuda_peak_mb`` is
    ``torch.cuda.max_memory_allocated`` since the case began (CUDA only).
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
    rss_start = peak_rss_mb()
    load_start, pressure_start = load_average(), cpu_pressure()
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
            "load_average_end": load_average(),
            "cpu_pressure_some_avg10_start": pressure_start,
            "cpu_pressure_some_avg10_end": cpu_pressure(),
            "torch_num_threads": torch.get_num_threads(),
            "rss_at_start_mb": rss_start,
            "peak_rss_mb": peak_rss_mb(),
            "cuda_peak_mb": cuda_peak_mb(device),
        }
    )
    return result


def run_isolated(spec: Mapping[str, Any], work_dir: Path, timeout: float | None) -> dict[str, Any]:
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
