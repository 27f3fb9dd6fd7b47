# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Throughput, latency and memory of the bundle's training data path, training, distillation and inference.

``python -m scripts.benchmark [--device cpu|cuda] [--subjects N] [--spatial-size 64] [--threads 1] [--out bench.json]
[--report docs/performance.md] [--quick]``

One run measures, on one synthetic phantom set (see :mod:`scripts.benchmark.cases` for each kind of case and
:func:`scripts.benchmark.plan.plan_cases` for the list):

* **training**: the bundle pipeline built from ``configs/train_teacher.json`` / ``configs/distill.json`` against
  the raw networks on random tensors of the same shapes and batch sizes;
* **the data-path ceiling**: the configs' dataset, loader and ``prepare_batch`` alone (loader → batch → device),
  reported as "data path / raw network", and the fixed per-batch overhead (a tiny grid beside the working grid);
* **inference**: per-scan latency (p50/p95, batch 1) and folder throughput (the inference config's parallel
  ``DataLoader``) for the teacher and each student projection, as ratios to the teacher, with the decoding time
  alone beside them;
* **scale**: cache fill time, memory and data-path epochs for growing numbers of scans and grids, in memory and on
  disk (``persistent_cache_dir``);
* **fast-path options**, each against its baseline.

Every case runs in a fresh interpreter (peak memory of its own) unless ``--no-isolate`` or ``--quick``. The JSON
report (``--out``) holds every figure; ``--report docs/performance.md`` rewrites that page's tables (between its
benchmark-table markers) as Markdown, keeping its text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from scripts.benchmark.cases import DISTILL_CONFIG, bundle_parser, run_case, run_isolated
from scripts.benchmark.plan import datalist_files, plan_cases
from scripts.benchmark.report import WIN_THRESHOLD, build_report, format_report, write_markdown
from scripts.benchmark.timing import cpu_pressure, hardware_info

__all__ = ["main", "parser"]

DEFAULT_PROJECTIONS = ("joint_fusion_slices", "early_fusion_slices")
GROUPS = ("teacher", "distill", "trainer", "datapath", "overhead", "inference", "scale", "fast")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.benchmark",
        description="Throughput, latency and memory of the bundle's data path, training, distillation and inference.",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--subjects", type=int, default=64, help="synthetic subjects, all in the training split (64)")
    p.add_argument("--dataset-dir", default=None, help="use this dataset folder (with datalist.json) instead")
    p.add_argument("--spatial-size", type=int, default=64, help="cubic grid of the preprocessed volumes (64)")
    p.add_argument("--batch-size", type=int, default=None, help="override both training configs' batch size")
    p.add_argument("--projections", nargs="+", default=list(DEFAULT_PROJECTIONS), help="student projections")
    p.add_argument("--distill-projection", default=None, help="projection of the distillation runs (first above)")
    p.add_argument("--epochs", type=int, default=3, help="timed pipeline epochs (median reported, default 3)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first (default 1)")
    p.add_argument("--raw-epochs", type=int, default=3, help="timed raw epochs (after one warm-up epoch)")
    p.add_argument("--datapath-epochs", type=int, default=10, help="timed data-path epochs (default 10)")
    p.add_argument("--overhead-batch-size", type=int, default=32, help="batch of the overhead cases (32)")
    p.add_argument("--latency-scans", type=int, default=20, help="timed scans per latency case (20)")
    p.add_argument("--latency-warmup", type=int, default=2, help="untimed scans first (2)")
    p.add_argument("--inference-batch-size", type=int, default=8, help="batch of the folder cases (8)")
    p.add_argument(
        "--inference-workers",
        type=int,
        default=None,
        help="loader workers of the folder cases (default: the inference config's own)",
    )
    p.add_argument("--scale-scans", type=int, nargs="+", default=[100, 300, 1000, 3000], help="scale: scans")
    p.add_argument(
        "--scale-grids",
        type=int,
        nargs="*",
        default=[96, 128],
        help="scale: other grids (at the first number of scans)",
    )
    p.add_argument("--no-scale", action="store_true", help="skip the scale cases")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    p.add_argument("--no-fast-path", action="store_true", help="skip the fast-path option cases")
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=GROUPS,
        help="run only these groups of cases (default: all): " + ", ".join(GROUPS),
    )
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None, help="one process per case")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="run every case in this process")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per isolated case")
    p.add_argument("--work-dir", default=None, help="folder for the data and the runs (default: a temporary one)")
    p.add_argument("--out", default="bench.json", help="JSON report path (default bench.json)")
    p.add_argument(
        "--report",
        default=None,
        help="also write the Markdown tables here (between the benchmark-table markers of a page that has them, "
        "e.g. docs/performance.md)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke mode: 1 timed epoch, 3 latency scans, in-process, small scale cases"
    )
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from scripts.projections import PROJECTIONS

    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda was given but torch.cuda.is_available() is False.")
    for name in [*args.projections, *([args.distill_projection] if args.distill_projection else [])]:
        if name not in PROJECTIONS:
            p.error(f"unknown projection {name!r}; valid: {', '.join(PROJECTIONS)}.")
    if args.spatial_size < 16:
        p.error(f"--spatial-size must be >= 16 (the networks divide it by 32), got {args.spatial_size}.")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}.")
    for name in ("subjects", "epochs", "raw_epochs", "datapath_epochs", "latency_scans", "inference_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if any(n < 1 for n in args.scale_scans) or any(g < 8 for g in args.scale_grids):
        p.error("--scale-scans must be >= 1 and --scale-grids >= 8.")
    for name in ("batch_size", "overhead_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 2:
            p.error(f"--{name.replace('_', '-')} must be >= 2 (batch normalisation in training), got {value}.")


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
    """Run the benchmark and return the report (``0`` for an internal ``--case`` call).

    A case that fails is recorded under ``errors`` (the others still run); the command then exits with 1.
    """
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.case:  # internal: one isolated case
        spec = json.loads(Path(args.case).read_text())
        result = run_case(spec)
        Path(spec["output"]).write_text(json.dumps(result))
        return 0
    if args.quick:
        args.epochs, args.raw_epochs = min(args.epochs, 1), min(args.raw_epochs, 1)
        args.datapath_epochs = min(args.datapath_epochs, 2)
        args.latency_scans, args.latency_warmup = min(args.latency_scans, 3), min(args.latency_warmup, 1)
        if "--scale-scans" not in argv:
            args.scale_scans = sorted({max(1, args.subjects // 2), args.subjects})
        if "--scale-grids" not in argv:
            args.scale_grids = [min(args.spatial_size * 2, 32)]
    if args.isolate is None:
        args.isolate = not args.quick
    _check_args(p, args)
    if args.threads:
        torch.set_num_threads(int(args.threads))

    own_dir = args.work_dir is None
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="pd-kd-bench-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    args.work_dir_resolved = str(work_dir)
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
            results[spec["name"]] = run_isolated(spec, work_dir, args.case_timeout)
        else:
            try:
                results[spec["name"]] = run_case(spec)
            except Exception as e:  # noqa: BLE001 - recorded in the report, the other cases still run
                results[spec["name"]] = {"error": f"{type(e).__name__}: {e}"}
    train, _ = datalist_files(dataset_dir)
    settings = {
        "device": args.device,
        "subjects": args.subjects if not args.dataset_dir else None,
        "dataset_dir": str(dataset_dir) if args.dataset_dir else "generated (synthetic phantoms)",
        "n_train": len(train),
        "spatial_size": int(args.spatial_size),
        "batch_size": {
            "teacher": int(args.batch_size or bundle_parser(["train_teacher.json"]).get_parsed_content("batch_size")),
            "distill": int(args.batch_size or bundle_parser([DISTILL_CONFIG]).get_parsed_content("batch_size")),
        },
        "projections": list(args.projections),
        "distill_projection": args.distill_projection or args.projections[0],
        "warmup_epochs": int(args.warmup_epochs),
        "timed_epochs": int(args.epochs),
        "raw_epochs": int(args.raw_epochs),
        "datapath_epochs": int(args.datapath_epochs),
        "overhead_batch_size": int(args.overhead_batch_size),
        "latency_scans": int(args.latency_scans),
        "latency_warmup": int(args.latency_warmup),
        "scale_scans": None if args.no_scale else list(args.scale_scans),
        "scale_grids": None if args.no_scale else list(args.scale_grids),
        "isolated_processes": bool(args.isolate),
        "memory_method": (
            "peak RSS (getrusage RUSAGE_SELF ru_maxrss) of a fresh interpreter per case, including imports"
            if args.isolate
            else "peak RSS of the single benchmark process so far (cases not isolated; cumulative)"
        ),
        "quick": bool(args.quick),
        "only": list(args.only) if args.only else None,
        "compile": bool(args.compile),
        "threads": args.threads,
        "win_threshold": WIN_THRESHOLD,
        "total_wall_s": time.perf_counter() - started,
    }
    hardware = {
        **hardware,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure_some_avg10_end": cpu_pressure(),
    }
    report = build_report(settings, hardware, cases, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.report:
        write_markdown(report, args.report)
    print(format_report(report))
    print(f"report written to {out}" + (f", tables to {args.report}" if args.report else ""))
    if own_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return report
