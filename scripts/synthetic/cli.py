# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The generator's command line, ``python -m scripts.synthetic`` (see ``--help``): a data set (``--out``), the
study's three sets (``--study-data``), the information budget (``--information``) or an in-memory calibration
summary (``--calibrate``), all through :mod:`scripts.synthetic.phantom`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from scripts.synthetic.phantom import MODALITIES, PRESETS, calibrate_population, generate_dataset, make_study_data

__all__ = ["main"]


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}.")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``python -m scripts.synthetic --help``."""
    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()).replace("%", "%%")
    parser = argparse.ArgumentParser(
        prog="python -m scripts.synthetic",
        description="Generate a synthetic DaTscan / AV133 phantom data set, the study data folder, or an in-memory "
        "calibration summary.",
    )
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--out", help="output folder (datalist.json and images/)")
    task.add_argument(
        "--study-data",
        metavar="DIR",
        help="build DIR/benchmark, DIR/av133 and DIR/spect_other_site (each once, with seeds derived from --seed)",
    )
    task.add_argument(
        "--information",
        action="store_true",
        help="render the population on the 64^3 input grid and print its information budget: PD vs HC from the whole "
        "volume vs the voxels each 2D projection sees (scripts/synthetic/information.py)",
    )
    task.add_argument(
        "--calibrate",
        action="store_true",
        help="render the population in memory and print its SBR calibration summary as JSON (no files)",
    )
    parser.add_argument("--preset", default="default", choices=list(PRESETS), help=f"named parameter set: {presets}")
    parser.add_argument("--n-subjects", type=int, default=None, help="number of subjects (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modality", choices=MODALITIES, default=None, help="default: the preset's (spect)")
    parser.add_argument("--pd-fraction", type=float, default=None, help="default: the preset's")
    parser.add_argument("--max-visits", type=int, default=None, help="default: the preset's (1)")
    parser.add_argument(
        "--split", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"), help="default: the preset's"
    )
    parser.add_argument(
        "--extra-test-subjects",
        type=int,
        default=None,
        metavar="N",
        help="subjects added to the test split only (default: the preset's; benchmark 880, a 1,000-scan test split)",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of --information")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a generator parameter, e.g. --set mild_fraction=0.1 --set fwhm_range_mm=[16,20]",
    )
    args = parser.parse_args(argv)
    design = {
        "modality": args.modality,
        "pd_fraction": args.pd_fraction,
        "max_visits": args.max_visits,
        "split": None if args.split is None else tuple(args.split),
    }
    if args.study_data:
        unused = [f"--{k.replace('_', '-')}" for k, v in design.items() if v is not None]
        unused += ["--set"] * bool(args.overrides) + ["--preset"] * (args.preset != "default")
        unused += ["--extra-test-subjects"] * (args.extra_test_subjects is not None)
        if unused:
            parser.error(f"{', '.join(unused)} cannot be used with --study-data (its sets are fixed presets).")
        try:
            paths = make_study_data(args.study_data, seed=args.seed, workers=args.workers, n_subjects=args.n_subjects)
        except ValueError as err:
            parser.error(str(err))
        for name, path in paths.items():
            meta = json.loads(path.read_text())["metadata"]
            print(f"{name}: preset {meta['preset']}, seed {meta['seed']}, {meta['n_scans']} scans -> {path}")
        return 0
    try:
        if args.information:
            from scripts.synthetic.information import format_budget, information_budget

            unused = [f"--{k.replace('_', '-')}" for k, v in design.items() if v is not None]
            if unused:
                parser.error(f"{', '.join(unused)} cannot be used with --information (the preset's design is used).")
            result = information_budget(
                args.preset,
                args.n_subjects,
                seed=args.seed,
                workers=args.workers,
                n_boot=args.bootstrap,
                **dict(args.overrides),
            )
            print(format_budget(result))
            print(f"({result['seconds']:.0f} s)")
            return 0
        if args.calibrate:
            summary = calibrate_population(
                args.preset, args.n_subjects, seed=args.seed, workers=args.workers, **design, **dict(args.overrides)
            )
            print(json.dumps(summary, indent=1))
            return 0
        path = generate_dataset(
            args.out,
            args.n_subjects,
            seed=args.seed,
            workers=args.workers,
            preset=args.preset,
            extra_test_subjects=args.extra_test_subjects,
            **design,
            **dict(args.overrides),
        )
    except ValueError as err:
        parser.error(str(err))
    meta = json.loads(path.read_text())["metadata"]
    c = meta["counts"]
    print(
        f"{meta['modality']}: {meta['n_scans']} scans of {meta['n_subjects']} subjects "
        f"(train {c['training']['n_scans']}, val {c['validation']['n_scans']}, test {c['test']['n_scans']}) "
        f"in {meta['seconds']:.1f} s -> {path} (preset {meta['preset']})"
    )
    return 0
