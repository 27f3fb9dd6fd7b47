# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The experiment matrix, run through the bundle's own entry points; its defaults are the README's main job.

    python -m scripts.study [--projections joint_fusion_slices ...] [--seeds 0 1 2] [--train-fractions 0.1 1.0]
                            [--skip-teacher] [--dataset-dir DIR] [--set KEY=VALUE ...]

Steps (each one a ``python -m monai.bundle run ...`` command, printed before it runs):

1. train the 3D teacher once (``configs/train_teacher.json``, on the full training split; the synthetic phantom
   set is generated first when the dataset folder has no datalist) and score it on the test split
   (``configs/evaluate.json``);
2. for every projection × training fraction × seed, distil the 2D student from the frozen teacher
   (``configs/distill.json``) and train the identical student without the teacher (``--kd_enabled False``),
   and score both on the test split; a training fraction below 1 keeps that share of the training subjects
   (same subset for KD and no-KD);
3. fit the lowest-putamen SBR threshold on the training split and score it on the test split, beside the
   always-PD baseline;
4. print the metrics side by side (mean ± std over seeds) and write them to ``eval/<run>/summary.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from scripts.data import load_datalist
from scripts.metrics import classification_report
from scripts.sbr import evaluate_sbr_baseline
from scripts.synthetic import ensure_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
REPORTED = ("accuracy", "sensitivity", "specificity", "f1_macro", "f1_weighted", "roc_auc")


def run_bundle(config_files: Sequence[str], run_id: str | None, overrides: dict, log: list[str]) -> float:
    """Run ``python -m monai.bundle run [run_id] --config_file ...`` from the bundle root; return seconds taken."""
    files = [f"configs/{f}" for f in config_files]
    config_arg = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else []) + ["--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    printable = "python " + " ".join(shlex.quote(c) for c in cmd[1:])
    print(f"\n$ {printable}", flush=True)
    log.append(printable)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"command failed with exit code {result.returncode}: {printable}")
    return time.perf_counter() - start


def read_metrics(run_dir: Path, datalist: str, split: str = "test") -> dict:
    """Metrics of an evaluation run from its per-scan predictions (``predictions.csv``: file, P(HC), P(PD))."""
    path = run_dir / "predictions.csv"
    if not path.is_file():
        raise SystemExit(f"expected predictions at {path}, but the evaluation wrote none.")
    with path.open() as f:
        scores = {row[0]: float(row[2]) for row in csv.reader(f)}
    labels = {e["image"]: e["label"] for e in load_datalist(datalist, split)}
    names = sorted(labels)
    return classification_report([labels[n] for n in names], [scores[n] for n in names])


def summarise(per_seed: list[dict]) -> dict:
    """Mean and (sample) std over seeds of each reported metric."""
    out = {}
    for name in REPORTED:
        values = [m[name] for m in per_seed if m.get(name) is not None]
        if values:
            out[name] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
    return out


def format_table(rows: dict[str, dict]) -> str:
    header = "| model | " + " | ".join(REPORTED) + " |"
    lines = [header, "|" + "---|" * (len(REPORTED) + 1)]
    for name, summary in rows.items():
        cells = []
        for metric in REPORTED:
            s = summary.get(metric)
            if s is None:
                cells.append("n/a")
            elif s["n"] > 1:
                cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}")
            else:
                cells.append(f"{s['mean']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.study", description=__doc__.split("\n")[0])
    parser.add_argument("--projections", nargs="+", default=["joint_fusion_slices"], help="student projections")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds (the teacher uses the first)")
    parser.add_argument("--train-fractions", type=float, nargs="+", default=[1.0], help="student training subsets")
    parser.add_argument("--dataset-dir", default=None, help="dataset folder (default: the configs' synthetic set)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="override the teacher's max_epochs")
    parser.add_argument("--student-epochs", type=int, default=None, help="override the students' max_epochs")
    parser.add_argument("--skip-teacher", action="store_true", help="reuse models/teacher.pt instead of training")
    parser.add_argument("--name", default="study", help="prefix of the run folder under eval/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    args = parser.parse_args(argv)
    for kv in args.set:
        if "=" not in kv:
            parser.error(f"--set expects KEY=VALUE, got {kv!r}")

    run = f"{args.name}-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    common = dict(kv.split("=", 1) for kv in args.set)
    if args.dataset_dir:
        common["dataset_dir"] = os.path.abspath(args.dataset_dir)
    if not sys.stdout.isatty():
        common.setdefault("progress_bar", "False")
    root = Path(common.get("bundle_root", BUNDLE_ROOT))  # where the runs write (``--set bundle_root=...``)
    log: list[str] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()

    teacher = {**common, "seed": args.seeds[0]}
    if args.teacher_epochs is not None:
        teacher["max_epochs"] = args.teacher_epochs
    if not args.skip_teacher:
        timings["teacher training"] = run_bundle(
            ["train_teacher.json"], "training", {**teacher, "run_name": f"{run}/teacher"}, log
        )
    run_bundle(["train_teacher.json", "evaluate.json"], None, {**teacher, "run_name": f"{run}/teacher-test"}, log)
    datalist = ensure_dataset(common.get("dataset_dir", root / "data" / "synthetic_spect"))
    results = {"3D teacher": [read_metrics(root / "eval" / run / "teacher-test", datalist)]}

    for projection in args.projections:
        for fraction in args.train_fractions:
            for kd in (True, False):
                name = f"2D student {'with' if kd else 'without'} KD ({projection}"
                name += f", {fraction:.0%} of training subjects)" if fraction < 1 else ")"
                results[name] = []
                for seed in args.seeds:
                    tag = f"{projection}-f{fraction:g}-{'kd' if kd else 'nokd'}-seed{seed}"
                    overrides = {**common, "projection": projection, "train_fraction": fraction, "seed": seed}
                    overrides["kd_enabled"] = kd
                    if args.student_epochs is not None:
                        overrides["max_epochs"] = args.student_epochs
                    timings[f"student {tag}"] = run_bundle(
                        ["distill.json"], "training", {**overrides, "run_name": f"{run}/{tag}"}, log
                    )
                    run_bundle(
                        ["distill.json", "evaluate.json"], None, {**overrides, "run_name": f"{run}/{tag}-test"}, log
                    )
                    results[name].append(read_metrics(root / "eval" / run / f"{tag}-test", datalist))

    sbr = evaluate_sbr_baseline(datalist, fit_split="training", eval_split="test")
    results["SBR threshold (lowest putamen)"] = [sbr["metrics"]]
    labels = [e["label"] for e in load_datalist(datalist, "test")]
    results["always PD (trivial baseline)"] = [classification_report(labels, [1.0] * len(labels))]
    n, n_pd = len(labels), sum(labels)

    summary = {name: summarise(values) for name, values in results.items()}
    table = format_table(summary)
    total = time.perf_counter() - started
    out_dir = root / "eval" / run
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"Test split: {n} scans ({n_pd} PD, {n - n_pd} HC) of {datalist}; student seeds {args.seeds}; "
        f"mean ± sample std over seeds where more than one."
    )
    record = {
        "dataset": str(datalist),
        "seeds": args.seeds,
        "projections": args.projections,
        "train_fractions": args.train_fractions,
        "test_scans": n,
        "test_pd": n_pd,
        "summary": summary,
        "per_seed": results,
        "sbr_threshold": sbr["threshold"],
        "commands": log,
        "seconds": {**timings, "total": total},
    }
    (out_dir / "summary.json").write_text(json.dumps(record, indent=2))
    (out_dir / "summary.md").write_text(f"# {run}\n\n{header}\n\n{table}\n\nTotal {total / 60:.1f} min.\n")
    print(f"\n{header}\n\n{table}\n\nTotal {total / 60:.1f} min. Summary: {out_dir / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
