# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Which cases one benchmark run measures, from its command-line arguments (see ``python -m scripts.benchmark -h``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scripts.benchmark.cases import DISTILL_CONFIG, TEACHER_CONFIG, bundle_parser

__all__ = ["plan_cases", "datalist_files", "MONAI_DEFAULT", "TINY_GRID"]

MONAI_DEFAULT = {"stacked_cache": False, "plain_tensor_batch": False}
"""The data path as MONAI's defaults build it: cached ``MetaTensor`` items collated per batch, ``MetaTensor``
network inputs."""

TINY_GRID = 16
"""Grid (cubed) of the data-path overhead cases, beside the working grid: bytes copied per batch ~64× fewer."""


def datalist_files(dataset_dir: Path) -> tuple[list[dict], list[str]]:
    """The training entries and every scan file of a dataset folder's ``datalist.json``."""
    from scripts.data import SPLITS, load_datalist

    datalist = dataset_dir / "datalist.json"
    train = load_datalist(datalist, "training", fields=["image", "label"])
    content = json.loads(datalist.read_text())
    files: list[str] = []
    for split in SPLITS:
        if content.get(split):
            files += [e["image"] for e in load_datalist(datalist, split, require_labels=False, fields=["image"])]
    return train, files


def _only(cases: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cases of the groups named by ``--only`` (all when it is not given)."""
    groups = getattr(args, "only", None)
    return [c for c in cases if c["group"] in groups] if groups else cases


def plan_cases(args: argparse.Namespace, dataset_dir: Path, bundle_root: Path) -> list[dict[str, Any]]:
    """Every case of one benchmark run, as JSON-serialisable specs for :func:`scripts.benchmark.cases.run_case`."""
    train, files = datalist_files(dataset_dir)
    n_train = len(train)
    spatial = [int(args.spatial_size)] * 3
    device = args.device
    cuda = device.startswith("cuda")
    common = {
        "bundle_root": str(bundle_root),
        "dataset_dir": str(dataset_dir),
        "spatial_size": spatial,
        "progress_bar": False,
        "num_workers": 0,
        "synthetic_data": False,
        "device": f"$torch.device('{device}')",
        "seed": int(args.seed),
    }
    if args.batch_size:
        common["batch_size"] = int(args.batch_size)
    epochs = int(args.warmup_epochs) + int(args.epochs)
    base = {"device": device, "threads": args.threads, "seed": int(args.seed)}
    batch = {
        TEACHER_CONFIG: int(args.batch_size or bundle_parser([TEACHER_CONFIG]).get_parsed_content("batch_size")),
        DISTILL_CONFIG: int(args.batch_size or bundle_parser([DISTILL_CONFIG]).get_parsed_content("batch_size")),
    }
    projection = args.distill_projection or args.projections[0]
    cases: list[dict[str, Any]] = []

    def add(name: str, kind: str, group: str, **extra: Any) -> None:
        cases.append({**base, "name": name, "kind": kind, "group": group, **extra})

    def pipeline(name: str, config: str, group: str, overrides: dict | None = None, **extra: Any) -> None:
        over = {**common, "max_epochs": epochs, "run_name": name, **(overrides or {})}
        if config == DISTILL_CONFIG:
            over.setdefault("projection", projection)
        add(
            name,
            "pipeline",
            group,
            config=config,
            overrides=over,
            warmup_epochs=int(args.warmup_epochs),
            timed_epochs=int(args.epochs),
            **extra,
        )

    def raw(name: str, config: str, model: str, group: str, overrides: dict | None = None, **extra: Any) -> None:
        over = {**common, **(overrides or {})}
        if config == DISTILL_CONFIG:
            over.setdefault("projection", projection)
        add(
            name,
            "raw",
            group,
            config=config,
            model=model,
            overrides=over,
            n_scans=n_train,
            batch_size=batch[config],
            warmup_epochs=1,
            timed_epochs=int(args.raw_epochs),
            **extra,
        )

    def datapath(name: str, config: str, group: str, variant: str, overrides: dict | None = None, **extra) -> None:
        over = {**common, **(overrides or {})}
        if config == DISTILL_CONFIG:
            over.setdefault("projection", projection)
            extra.setdefault("teacher_key", "image_3d")
        add(
            name,
            "datapath",
            group,
            config=config,
            variant=variant,
            overrides=over,
            warmup_epochs=1,
            timed_epochs=int(args.datapath_epochs),
            **extra,
        )

    # training: the bundle pipeline (the configs' defaults) against the raw networks
    pipeline("teacher_pipeline", TEACHER_CONFIG, "teacher")
    raw("teacher_raw", TEACHER_CONFIG, "teacher", "teacher", what="teacher step (no data pipeline)")
    nocache, cache = {"cache_teacher_outputs": False}, {"cache_teacher_outputs": True}
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

    # trainer overhead: each config's trainer around a near-free network against a bare loop (ms per iteration)
    for name, config, over in (("trainer_teacher", TEACHER_CONFIG, {}), ("trainer_distill", DISTILL_CONFIG, cache)):
        over = {**common, "max_epochs": epochs, "run_name": name, **over}
        if config == DISTILL_CONFIG:
            over.setdefault("projection", projection)
        add(name, "trainer", "trainer", config=config, overrides=over, warmup_epochs=int(args.warmup_epochs))

    # the data path alone, at the configs' batch sizes (the ceiling), with the configs' defaults and MONAI's
    datapath("teacher_datapath", TEACHER_CONFIG, "datapath", "bundle")
    datapath("distill_datapath", DISTILL_CONFIG, "datapath", "bundle")
    datapath("teacher_datapath_monai", TEACHER_CONFIG, "datapath", "monai", overrides=MONAI_DEFAULT)
    datapath("distill_datapath_monai", DISTILL_CONFIG, "datapath", "monai", overrides=MONAI_DEFAULT)
    recipe = {  # MONAI's fast-training recipe: CacheDataset + ToDeviced + ThreadDataLoader without workers
        **MONAI_DEFAULT,
        "train_transforms": "$@volume_transforms + [monai.transforms.ToDeviced(keys='image', device=@device)]",
        "train#dataloader": {
            "_target_": "ThreadDataLoader",
            "dataset": "@train#dataset",
            "batch_size": "@batch_size",
            "shuffle": True,
            "num_workers": 0,
        },
    }
    datapath("teacher_datapath_monai_recipe", TEACHER_CONFIG, "datapath", "monai_recipe", overrides=recipe)
    if cuda:  # the stacked cache in host memory: every batch crosses to the device
        datapath("teacher_datapath_host", TEACHER_CONFIG, "datapath", "host", overrides={"cache_device": "cpu"})
    # fixed per-batch overhead: the same data path at a tiny grid beside the working grid, one batch size
    ob = int(args.overhead_batch_size)
    # the grid option accepts >= 16 voxels per side (the networks need it), so the pair is at least (32, 16)
    big, tiny = max(int(args.spatial_size), 2 * TINY_GRID), TINY_GRID
    for variant, over in (("bundle", {}), ("monai", MONAI_DEFAULT)):
        for grid in (big, tiny):
            datapath(
                f"overhead_{variant}_{grid}",
                TEACHER_CONFIG,
                "overhead",
                variant,
                overrides={**over, "spatial_size": [grid] * 3, "batch_size": ob},
                grid=grid,
            )

    # inference: per-scan latency (batch 1) and folder throughput, teacher and students, end to end
    n_lat, warm = int(args.latency_scans), int(args.latency_warmup)
    picked = [files[i % len(files)] for i in range(n_lat + warm)]
    inf_common = {k: v for k, v in common.items() if k in ("bundle_root", "dataset_dir", "spatial_size", "device")}
    inf_common["load_pretrain"] = False  # random weights: the timings do not depend on them
    folder = str(Path(files[0]).parent)
    n_folder = sum(1 for f in Path(folder).iterdir() if f.name.endswith((".nii", ".nii.gz")))
    folder_over = {"input": folder, "batch_size": int(args.inference_batch_size)}
    if args.inference_workers is not None:
        folder_over["num_workers"] = int(args.inference_workers)
    # the configs' template centre (partial resampling of the planes read) and the automatic centre (whole volume)
    students = [(p, "config") for p in args.projections] + [(p, "auto") for p in args.projections]
    add("latency_teacher", "latency", "inference", model="teacher", overrides=inf_common, files=picked, warmup=warm)
    add(
        "folder_teacher",
        "folder",
        "inference",
        model="teacher",
        overrides={**inf_common, **folder_over},
        n_scans=n_folder,
    )
    for p, centre in students:
        suffix = "" if centre == "config" else "_auto"
        over = {**inf_common, "projection": p, **({} if centre == "config" else {"slice_centre": centre})}
        add(
            f"latency_{p}{suffix}",
            "latency",
            "inference",
            model="student",
            projection=p,
            overrides=over,
            files=picked,
            warmup=warm,
        )
        add(
            f"folder_{p}{suffix}",
            "folder",
            "inference",
            model="student",
            projection=p,
            overrides={**over, **folder_over},
            n_scans=n_folder,
        )
    add("decode", "decode", "inference", files=picked, warmup=warm)

    # scale: cache and data-path epoch against the number of scans and the grid
    if not args.no_scale:
        scale_dir = Path(args.work_dir_resolved) / "scale"
        for n in args.scale_scans:
            for grid in [int(args.spatial_size)] + [g for g in args.scale_grids if n == args.scale_scans[0]]:
                _scale(add, common, train, scale_dir, n, grid, ob, disk=False)
        _scale(add, common, train, scale_dir, max(args.scale_scans), int(args.spatial_size), ob, disk=True)

    if args.no_fast_path:
        return _only(cases, args)
    # fast-path options, each against its baseline in this run
    pipeline(
        "teacher_pipeline_monai",
        TEACHER_CONFIG,
        "fast",
        overrides=MONAI_DEFAULT,
        baseline="teacher_pipeline",
        option="bundle data path (stacked cache, plain tensors) vs MONAI defaults, teacher",
        inverse=True,
    )
    pipeline(
        "distill_cache_pipeline_monai",
        DISTILL_CONFIG,
        "fast",
        overrides={**cache, **MONAI_DEFAULT},
        baseline="distill_cache_pipeline",
        option="bundle data path vs MONAI defaults, distillation with teacher cache",
        inverse=True,
    )
    contiguous = {"channels_last": False}
    pipeline(
        "teacher_pipeline_contiguous",
        TEACHER_CONFIG,
        "fast",
        overrides=contiguous,
        baseline="teacher_pipeline",
        option="3D teacher in channels-last (NDHWC) layout vs contiguous, teacher training",
        inverse=True,
    )
    pipeline(
        "distill_nocache_contiguous",
        DISTILL_CONFIG,
        "fast",
        overrides={**nocache, **contiguous},
        baseline="distill_nocache_pipeline",
        option="frozen 3D teacher channels-last vs contiguous, distillation without teacher cache",
        inverse=True,
    )
    raw(
        "teacher_raw_contiguous",
        TEACHER_CONFIG,
        "teacher",
        "fast",
        overrides=contiguous,
        baseline="teacher_raw",
        option="3D teacher channels-last vs contiguous, raw teacher step",
        inverse=True,
    )
    raw(
        "distill_cache_raw_channels_last",
        DISTILL_CONFIG,
        "student",
        "fast",
        channels_last=True,
        baseline="distill_cache_raw",
        option="2D student channels-last (an option, off in the configs), raw student step",
    )
    if args.compile:
        raw(
            "teacher_raw_compile",
            TEACHER_CONFIG,
            "teacher",
            "fast",
            compile=True,
            baseline="teacher_raw",
            option="torch.compile, raw teacher step",
        )
        raw(
            "distill_cache_raw_compile",
            DISTILL_CONFIG,
            "student",
            "fast",
            compile=True,
            baseline="distill_cache_raw",
            option="torch.compile, raw student step",
        )
    if cuda:  # the configs turn both on by default on CUDA: measure each turned off
        pipeline(
            "teacher_pipeline_fp32",
            TEACHER_CONFIG,
            "fast",
            overrides={"amp": False},
            baseline="teacher_pipeline",
            option="float32 instead of mixed precision (teacher)",
            inverse=True,
        )
        pipeline(
            "distill_cache_fp32",
            DISTILL_CONFIG,
            "fast",
            overrides={**cache, "amp": False},
            baseline="distill_cache_pipeline",
            option="float32 instead of mixed precision (distillation)",
            inverse=True,
        )
        raw(
            "teacher_raw_amp",
            TEACHER_CONFIG,
            "teacher",
            "fast",
            amp=True,
            baseline="teacher_raw",
            option="mixed precision, raw teacher step",
        )
        pipeline(
            "teacher_pipeline_no_cudnn_benchmark",
            TEACHER_CONFIG,
            "fast",
            overrides={"cudnn_benchmark": False},
            baseline="teacher_pipeline",
            option="cudnn.benchmark off (teacher)",
            inverse=True,
        )
    return _only(cases, args)


def _scale(add, common: dict, train: list[dict], scale_dir: Path, n: int, grid: int, batch: int, disk: bool) -> None:
    """Plan a scale case. Its datalist and scan copies are written when the case runs (``scale_sources``), not here:
    planning writes nothing (3,000 copies of a scan are gigabytes)."""
    datalist = scale_dir / f"datalist-{n}.json"
    over = {**common, "datalist_file": str(datalist), "spatial_size": [grid] * 3, "batch_size": batch}
    if disk:
        over["persistent_cache_dir"] = str(scale_dir / f"cache-{n}-{grid}")
    name = f"scale_{n}_{grid}" + ("_disk" if disk else "")
    add(name, "scale", "scale", n_scans=n, grid=grid, overrides=over, epochs=2, scale_sources=train)
