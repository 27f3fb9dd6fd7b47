# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The benchmark report: ratios and verdicts from the case results (:func:`build_report`), and its tables, printed
(:func:`format_report`) or as the Markdown of ``docs/performance.md`` (:func:`markdown_report`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "WIN_THRESHOLD",
    "GPU_TARGETS",
    "build_report",
    "report_tables",
    "format_report",
    "markdown_report",
    "write_markdown",
]

TRAINER_OVERHEAD_MS = 0.7
"""Target: what the trainer adds per iteration (80 % of the raw network's pace at H100 rates)."""
MARKERS = ("<!-- benchmark tables: start -->", "<!-- benchmark tables: end -->")
"""A page that holds both lines gets the tables written between them (the rest of the page is kept)."""

TEACHER, DISTILL = "train_teacher.json", "distill.json"
WIN_THRESHOLD = 0.05
"""An option "wins" when it is at least this much faster (relative) than the baseline it is compared with."""

GPU_TARGETS = {"teacher_raw_scans_per_s": 3000.0, "distill_cache_raw_scans_per_s": 6000.0, "data_path_factor": 3.0}
"""Raw network rates of one H100 (fp32, 64³) and the data-path target: at least 3× the raw rate."""


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _get(results: Mapping[str, dict], name: str, key: str) -> float | None:
    value = (results.get(name) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fit(t1: float | None, t0: float | None, b1: float, b0: float) -> tuple[float | None, float | None, float | None]:
    """``(overhead ms, GB/s, copy share)`` of the line ``t = overhead + bytes / bandwidth`` through two points."""
    if t1 is None or t0 is None:
        return None, None, None
    if t1 <= t0:  # the copy time is within the noise: all of it counts as overhead
        return t0, None, None
    per_byte = (t1 - t0) / (b1 - b0)  # ms per byte
    overhead = max(0.0, t0 - b0 * per_byte)
    return overhead, 1e-6 / per_byte, 1.0 - overhead / t1


def _overhead(results: Mapping[str, dict], big: str, tiny: str) -> dict[str, Any]:
    """Fixed per-batch cost from two data-path runs that differ only in the bytes per batch:
    ``t = overhead + bytes / bandwidth`` through both points, from wall time and from CPU time (the process's
    own work, which other jobs on a shared machine hardly change)."""
    t1, t0 = _get(results, big, "ms_per_batch"), _get(results, tiny, "ms_per_batch")
    c1, c0 = _get(results, big, "cpu_ms_per_batch"), _get(results, tiny, "cpu_ms_per_batch")
    b1, b0 = _get(results, big, "bytes_per_batch"), _get(results, tiny, "bytes_per_batch")
    out: dict[str, Any] = {
        "ms_per_batch": t1,
        "tiny_ms_per_batch": t0,
        "cpu_ms_per_batch": c1,
        "tiny_cpu_ms_per_batch": c0,
        "bytes_per_batch": b1,
        "tiny_bytes": b0,
    }
    if b1 is None or b0 is None or b1 == b0:
        return out
    out["overhead_ms"], out["bandwidth_gb_s"], out["copy_share"] = _fit(t1, t0, b1, b0)
    out["cpu_overhead_ms"], out["cpu_bandwidth_gb_s"], out["cpu_copy_share"] = _fit(c1, c0, b1, b0)
    return out


def build_report(
    settings: Mapping[str, Any], hardware: Mapping[str, Any], cases: Sequence[Mapping], results: Mapping[str, dict]
) -> dict[str, Any]:
    """Assemble the JSON report from the case results (ratios, speed-ups, memory, fast-path verdicts)."""

    def comparison(pipeline: str, raw: str) -> dict[str, Any]:
        p, r = _get(results, pipeline, "scans_per_s"), _get(results, raw, "scans_per_s")
        return {
            "pipeline": results.get(pipeline),
            "raw": results.get(raw),
            "pipeline_over_raw": _ratio(p, r),
            "pipeline_over_raw_cpu": _ratio(
                _get(results, pipeline, "scans_per_cpu_s"), _get(results, raw, "scans_per_cpu_s")
            ),
            "pipeline_overhead_ms_per_scan": 1000.0 * (1.0 / p - 1.0 / r) if p and r else None,
        }

    data_path = {}
    for model, config, raw in (("teacher", TEACHER, "teacher_raw"), ("distill", DISTILL, "distill_cache_raw")):
        rate_raw = _get(results, raw, "scans_per_s")
        entry: dict[str, Any] = {"raw_scans_per_s": rate_raw, "variants": {}}
        for spec in cases:
            if spec["kind"] == "datapath" and spec["group"] == "datapath" and spec["config"] == config:
                rate = _get(results, spec["name"], "scans_per_s")
                entry["variants"][spec["variant"]] = {
                    "case": spec["name"],
                    "scans_per_s": rate,
                    "ms_per_batch": _get(results, spec["name"], "ms_per_batch"),
                    "batch_size": (results.get(spec["name"]) or {}).get("batch_size"),
                    "over_raw": _ratio(rate, rate_raw),
                }
        data_path[model] = entry
    overhead = {}
    for variant in ("bundle", "monai"):
        names = sorted(
            (c for c in cases if c["group"] == "overhead" and c["variant"] == variant), key=lambda c: -c["grid"]
        )
        if len(names) == 2:
            overhead[variant] = {
                "grid": names[0]["grid"],
                "tiny_grid": names[1]["grid"],
                "batch_size": names[0]["overrides"]["batch_size"],
                **_overhead(results, names[0]["name"], names[1]["name"]),
            }
    inference = _inference_section(cases, results)
    scale = [
        {"case": c["name"], **{k: v for k, v in (results.get(c["name"]) or {}).items() if k != "what"}}
        for c in cases
        if c["kind"] == "scale"
    ]
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
        if spec.get("inverse"):  # the option turns a default off: report what the default gains
            speedup = _ratio(1.0, speedup)
        fast[name] = {
            "option": spec.get("option", name),
            "baseline": base,
            "inverse": bool(spec.get("inverse")),
            "scans_per_s": _get(results, name, "scans_per_s"),
            "baseline_scans_per_s": _get(results, base, "scans_per_s"),
            "speedup": speedup,
            "speedup_cpu": _ratio(_get(results, name, "scans_per_cpu_s"), _get(results, base, "scans_per_cpu_s")),
            "wins": None if speedup is None else bool(speedup >= 1.0 + WIN_THRESHOLD),
            "peak_rss_mb": _get(results, name, "peak_rss_mb"),
            "baseline_peak_rss_mb": _get(results, base, "peak_rss_mb"),
            "detail": results.get(name),
        }
    cuda = str(settings.get("device", "cpu")).startswith("cuda")
    if not cuda:
        fast["amp"] = {"skipped": "mixed precision and cudnn.benchmark are CUDA-only (on by default there)"}
    if not settings.get("compile"):
        fast.setdefault("compile", {"skipped": "torch.compile not requested (--compile)"})
    errors = {name: r["error"] for name, r in results.items() if isinstance(r, dict) and "error" in r}
    report = {
        "hardware": dict(hardware),
        "settings": dict(settings),
        "teacher_training": comparison("teacher_pipeline", "teacher_raw"),
        "distillation": {
            "no_cache": comparison("distill_nocache_pipeline", "distill_nocache_raw"),
            "cache": comparison("distill_cache_pipeline", "distill_cache_raw"),
            "cache_speedup_pipeline": _ratio(
                _get(results, "distill_cache_pipeline", "scans_per_s"),
                _get(results, "distill_nocache_pipeline", "scans_per_s"),
            ),
            "cache_speedup_raw": _ratio(
                _get(results, "distill_cache_raw", "scans_per_s"), _get(results, "distill_nocache_raw", "scans_per_s")
            ),
        },
        "trainer_overhead": {
            name: results[name]
            for name in ("trainer_teacher", "trainer_distill")
            if isinstance(results.get(name), dict) and "error" not in results[name]
        },
        "data_path": data_path,
        "overhead": overhead,
        "inference": inference,
        "scale": scale,
        "memory": memory,
        "fast_path": fast,
        "errors": errors,
        "warnings": _warnings(hardware, cases, results),
    }
    report["targets"] = _targets(report, cuda)
    return report


def _inference_section(cases: Sequence[Mapping], results: Mapping[str, dict]) -> dict[str, Any]:
    teacher_p50 = _get(results, "latency_teacher", "p50_ms")
    teacher_rate = _get(results, "folder_teacher", "scans_per_s")
    teacher_cpu = _get(results, "folder_teacher", "cpu_ms_per_scan")
    rows = []
    for spec in cases:
        if spec["kind"] != "latency":
            continue
        lat = results.get(spec["name"]) or {}
        folder_name = "folder_" + spec["name"][len("latency_") :]
        folder = results.get(folder_name) or {}
        rows.append(
            {
                "name": spec["name"][len("latency_") :],
                "model": spec["model"],
                "projection": spec.get("projection"),
                "slice_centre": lat.get("slice_centre"),
                "p50_ms": lat.get("p50_ms"),
                "p95_ms": lat.get("p95_ms"),
                "preprocess_p50_ms": lat.get("preprocess_p50_ms"),
                "model_p50_ms": lat.get("model_p50_ms"),
                "cheaper_than_teacher_p50": (
                    _ratio(teacher_p50, lat.get("p50_ms")) if spec["model"] != "teacher" else None
                ),
                "cheaper_bound_free_network": (
                    _ratio(teacher_p50, lat.get("preprocess_p50_ms")) if spec["model"] != "teacher" else None
                ),
                "folder_scans_per_s": folder.get("scans_per_s"),
                "folder_cpu_ms_per_scan": folder.get("cpu_ms_per_scan"),
                "folder_over_teacher": (
                    _ratio(folder.get("scans_per_s"), teacher_rate) if spec["model"] != "teacher" else None
                ),
                "folder_cpu_cheaper_than_teacher": (
                    _ratio(teacher_cpu, folder.get("cpu_ms_per_scan")) if spec["model"] != "teacher" else None
                ),
                "folder_workers": folder.get("num_workers"),
                "folder_batch_size": folder.get("batch_size"),
            }
        )
    return {"rows": rows, "decode": results.get("decode"), "latency_teacher": results.get("latency_teacher")}


def _targets(report: Mapping[str, Any], cuda: bool) -> list[dict[str, Any]]:
    """Each target of the performance work, with the figure measured in this run and whether it is met."""
    targets: list[dict[str, Any]] = []
    dp = report["data_path"]["teacher"]["variants"].get("bundle", {})
    if cuda:
        rate = dp.get("scans_per_s")
        goal = GPU_TARGETS["data_path_factor"] * GPU_TARGETS["teacher_raw_scans_per_s"]
        targets.append(
            {
                "target": f"teacher data path >= {goal:.0f} scans/s (GPU)",
                "value": rate,
                "met": None if rate is None else rate >= goal,
            }
        )
    for name, row in report.get("trainer_overhead", {}).items():
        value = row.get("loop_overhead_ms_per_iteration", row.get("overhead_ms_per_iteration"))
        targets.append(
            {
                "target": f"{name}: trainer overhead <= {TRAINER_OVERHEAD_MS} ms/iteration above the bare loop "
                "(iterations; the epoch's end apart)",
                "value": value,
                "met": None if value is None else value <= TRAINER_OVERHEAD_MS,
            }
        )
    over = report["overhead"].get("bundle", {})
    value = over.get("overhead_ms")  # wall clock; the CPU-time figure is in the overhead section
    targets.append(
        {
            "target": f"per-batch overhead < 1 ms at batch {over.get('batch_size')}",
            "value": value,
            "met": None if value is None else value < 1.0,
        }
    )
    share = over.get("copy_share")
    targets.append(
        {
            "target": "data path limited by the copy (copy share of a batch > 50 %)",
            "value": share,
            "met": None if share is None else share > 0.5,
        }
    )
    for row in report["inference"]["rows"]:
        if row["model"] == "teacher" or row["projection"] not in ("early_fusion_slices", "joint_fusion_slices"):
            continue
        goal = 10.0 if row["projection"] == "early_fusion_slices" else 5.0
        for key, what in (
            ("cheaper_than_teacher_p50", "latency p50"),
            ("folder_cpu_cheaper_than_teacher", "folder CPU"),
        ):
            value = row.get(key)
            targets.append(
                {
                    "target": f"{row['name']}: {what} >= {goal:.0f}x cheaper than the teacher",
                    "value": value,
                    "met": None if value is None else value >= goal,
                }
            )
    return targets


def _warnings(hardware: Mapping[str, Any], cases: Sequence[Mapping], results: Mapping[str, dict]) -> list[str]:
    warnings = []
    cores = hardware.get("cpu_affinity") or hardware.get("cpu_count") or 1
    starved = []
    for spec in cases:
        r = results.get(spec["name"]) or {}
        share, threads = r.get("cpu_s_per_wall_s"), r.get("torch_num_threads") or 1
        timed = spec["kind"] in ("pipeline", "raw", "latency")
        if timed and isinstance(share, (int, float)) and not spec.get("compile") and share < 0.85 * min(threads, cores):
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
    return warnings


# --------------------------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


Table = tuple[str, list[str], list[list[str]]]


def report_tables(report: Mapping[str, Any]) -> list[Table]:
    """The report as ``(title, header, rows)`` tables, in the order of ``docs/performance.md``."""
    tables: list[Table] = []
    rows = []
    for title, section in (
        ("teacher", report["teacher_training"]),
        ("distillation, no teacher cache", report["distillation"]["no_cache"]),
        ("distillation, teacher-output cache", report["distillation"]["cache"]),
    ):
        p, r = section.get("pipeline") or {}, section.get("raw") or {}
        rows.append(
            [
                title,
                _fmt(p.get("batch_size"), "d"),
                _fmt(p.get("scans_per_s")),
                _fmt(r.get("scans_per_s")),
                _fmt(section.get("pipeline_over_raw")),
                _fmt(p.get("peak_rss_mb"), ".0f"),
            ]
        )
    tables.append(
        (
            "Training: bundle pipeline vs raw network",
            ["case", "batch", "pipeline scans/s", "raw scans/s", "pipeline / raw", "pipeline peak RSS MB"],
            rows,
        )
    )

    rows = [
        [
            name,
            str(t.get("trainer")),
            _fmt(t.get("batch_size"), "d"),
            "every " + _fmt(t.get("val_interval"), "d") if t.get("validation") else "off",
            _fmt(t.get("log_interval"), "d"),
            _fmt(t.get("iterations_per_epoch"), "d"),
            _fmt(t.get("loop_ms_per_iteration"), ".3f"),
            _fmt(t.get("bare_ms_per_iteration"), ".3f"),
            _fmt(t.get("loop_overhead_ms_per_iteration"), ".3f"),
            _fmt(t.get("data_path_ms_per_iteration"), ".3f"),
            _fmt(t.get("trainer_own_ms_per_iteration"), ".3f"),
            _fmt(t.get("epoch_end_ms"), ".1f"),
            _fmt(t.get("trainer_ms_per_iteration"), ".3f"),
        ]
        for name, t in report.get("trainer_overhead", {}).items()
    ]
    if rows:
        tables.append(
            (
                "Trainer overhead: the config's trainer around a near-free network vs a bare loop",
                [
                    "case",
                    "trainer",
                    "batch",
                    "validation (epochs)",
                    "loss read every",
                    "iterations / epoch",
                    "iteration ms",
                    "bare loop ms",
                    "overhead ms / iteration",
                    "of which data path ms",
                    "of which trainer ms",
                    "epoch end ms / epoch",
                    "whole epoch ms / iteration",
                ],
                rows,
            )
        )

    rows = []
    names = {
        "bundle": "bundle (stacked cache, plain tensors)",
        "monai": "MONAI defaults (collated MetaTensors)",
        "monai_recipe": "MONAI recipe (ToDeviced + ThreadDataLoader)",
        "host": "stacked cache in host memory",
    }
    for model, entry in report["data_path"].items():
        for variant, v in entry["variants"].items():
            rows.append(
                [
                    model,
                    names.get(variant, variant),
                    _fmt(v.get("batch_size"), "d"),
                    _fmt(v.get("scans_per_s"), ".0f"),
                    _fmt(v.get("ms_per_batch"), ".3f"),
                    _fmt(entry.get("raw_scans_per_s")),
                    _fmt(v.get("over_raw"), ".0f"),
                ]
            )
    tables.append(
        (
            "Data-path ceiling: loader -> batch -> device, no network",
            ["training", "data path", "batch", "scans/s", "ms / batch", "raw network scans/s", "data path / raw"],
            rows,
        )
    )

    rows = []
    for variant, o in report["overhead"].items():
        rows.append(
            [
                names.get(variant, variant),
                _fmt(o.get("batch_size"), "d"),
                f"{o['grid']}³ / {o['tiny_grid']}³",
                _fmt(o.get("ms_per_batch"), ".3f"),
                _fmt(o.get("tiny_ms_per_batch"), ".3f"),
                _fmt((o.get("bytes_per_batch") or 0) / 1e6, ".1f"),
                _fmt(o.get("overhead_ms"), ".3f"),
                _fmt(o.get("cpu_overhead_ms"), ".3f"),
                _fmt(o.get("bandwidth_gb_s"), ".1f"),
                _fmt(None if o.get("copy_share") is None else 100 * o["copy_share"], ".0f"),
                _fmt(None if o.get("cpu_copy_share") is None else 100 * o["cpu_copy_share"], ".0f"),
            ]
        )
    tables.append(
        (
            "Fixed per-batch overhead of the teacher data path",
            [
                "data path",
                "batch",
                "grids",
                "ms / batch",
                "tiny-grid ms / batch",
                "MB / batch",
                "fixed overhead ms / batch",
                "same from CPU time",
                "copy GB/s",
                "copy share %",
                "same from CPU time",
            ],
            rows,
        )
    )

    rows = []
    for row in report["inference"]["rows"]:
        centre = (
            ""
            if row["model"] == "teacher"
            else (" (auto centre)" if row["slice_centre"] == "auto" else " (configured centre)")
        )
        name = "teacher (3D)" if row["model"] == "teacher" else f"{row['projection']}{centre}"
        rows.append(
            [
                name,
                _fmt(row["p50_ms"], ".1f"),
                _fmt(row["p95_ms"], ".1f"),
                _fmt(row["preprocess_p50_ms"], ".1f"),
                _fmt(row["model_p50_ms"], ".1f"),
                _fmt(row["cheaper_than_teacher_p50"], ".1f"),
                _fmt(row.get("cheaper_bound_free_network"), ".1f"),
                _fmt(row["folder_scans_per_s"], ".1f"),
                _fmt(row["folder_cpu_ms_per_scan"], ".1f"),
                _fmt(row["folder_over_teacher"], ".1f"),
                _fmt(row["folder_cpu_cheaper_than_teacher"], ".1f"),
            ]
        )
    decode = report["inference"].get("decode") or {}
    rows.append(
        [
            "decode only (nibabel, one process)",
            _fmt(decode.get("decode_p50_ms"), ".1f"),
            "–",
            "–",
            "–",
            "–",
            "–",
            _fmt(decode.get("decode_scans_per_s"), ".1f"),
            _fmt(decode.get("decode_p50_ms"), ".1f"),
            "–",
            "–",
        ]
    )
    rows.append(
        [
            "LoadScand only (decode + MONAI LoadImage + checks)",
            _fmt(decode.get("load_p50_ms"), ".1f"),
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
        ]
    )
    tables.append(
        (
            "Inference, NIfTI on disk -> PD probability",
            [
                "model",
                "latency p50 ms",
                "p95 ms",
                "preprocessing p50",
                "network p50",
                "latency x cheaper",
                "bound if the network were free",
                "folder scans/s",
                "folder CPU ms / scan",
                "folder x teacher",
                "folder CPU x cheaper",
            ],
            rows,
        )
    )

    rows = []
    for s in report["scale"]:
        if "skipped" in s:
            rows.append(
                [
                    _fmt(s.get("n_scans"), "d"),
                    f"{s.get('spatial_size')}³",
                    s.get("cache", "–"),
                    f"skipped: {s['skipped']}",
                    "–",
                    "–",
                    _fmt((s.get("cache_bytes_needed") or 0) / 1024**3, ".2f"),
                    "–",
                ]
            )
            continue
        if "error" in s:
            rows.append([s["case"], "–", "–", f"error: {str(s['error']).splitlines()[-1]}", "–", "–", "–", "–"])
            continue
        size = s.get("disk_bytes") if s.get("cache") == "disk" else s.get("cache_bytes")
        rows.append(
            [
                _fmt(s.get("n_scans"), "d"),
                f"{s.get('spatial_size')}³",
                s.get("cache"),
                _fmt(s.get("cache_fill_s"), ".1f"),
                _fmt(s.get("cache_fill_ms_per_scan"), ".1f"),
                _fmt(s.get("scans_per_s"), ".0f"),
                _fmt((size or 0) / 1024**3, ".2f"),
                _fmt(s.get("peak_rss_mb"), ".0f"),
            ]
        )
    tables.append(
        (
            "Scale: teacher cache and data-path epoch vs number of scans and grid",
            [
                "scans",
                "grid",
                "cache",
                "cache fill s",
                "fill ms / scan",
                "data path scans/s",
                "cache GB",
                "peak RSS MB",
            ],
            rows,
        )
    )

    rows = []
    for name, v in report["fast_path"].items():
        if "skipped" in v:
            rows.append([name, "–", "–", "–", v["skipped"]])
            continue
        rows.append(
            [
                v["option"],
                _fmt(v["baseline_scans_per_s"] if v["inverse"] else v["scans_per_s"]),
                _fmt(v["scans_per_s"] if v["inverse"] else v["baseline_scans_per_s"]),
                _fmt(v["speedup"], ".3f"),
                _fmt(v["wins"]),
            ]
        )
    tables.append(
        (
            "Fast-path options, each against its baseline in the same run",
            ["option", "with: scans/s", "without: scans/s", "speed-up", "wins (>= 5 %)"],
            rows,
        )
    )

    rows = [[t["target"], _fmt(t["value"], ".3g"), _fmt(t["met"])] for t in report["targets"]]
    tables.append(("Targets", ["target", "measured", "met"], rows))
    return tables


def _conditions(report: Mapping[str, Any]) -> str:
    hw, st = report["hardware"], report["settings"]
    load0 = (hw.get("load_average") or [None])[0]
    load1 = (hw.get("load_average_end") or [None])[0]
    return (
        f"{hw['device']} ({hw['device_name']}), {hw['cpu_count']} CPUs, {hw.get('memory_total_gb')} GB, torch "
        f"{hw['torch']} ({st.get('threads') or hw['torch_num_threads']} threads), MONAI {hw['monai']}; "
        f"{st['n_train']} training scans at {st['spatial_size']}³; 1-min load average {_fmt(load0)} at the start, "
        f"{_fmt(load1)} at the end; {st.get('total_wall_s', 0):.0f} s; commit {hw.get('git_commit')}; "
        f"`{hw.get('command')}`"
    )


def format_report(report: Mapping[str, Any]) -> str:
    """The printed summary: the tables as fixed-width text."""
    lines = [_conditions(report)]
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    for title, header, rows in report_tables(report):
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
        lines += ["", title]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    for name, err in report.get("errors", {}).items():
        lines.append(f"ERROR in {name}: {err.splitlines()[-1] if err else ''}")
    return "\n".join(lines)


def markdown_report(report: Mapping[str, Any]) -> str:
    """The tables of ``docs/performance.md`` as Markdown, with the conditions of the run."""
    lines = [
        "<!-- generated by python -m scripts.benchmark --report; do not edit by hand -->",
        "",
        f"Conditions: {_conditions(report)}",
    ]
    warnings = [f"> **Warning:** {w}" for w in report.get("warnings", [])]
    lines += ["", *warnings] if warnings else []
    for title, header, rows in report_tables(report):
        lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if report.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {str(v).splitlines()[-1]}" for k, v in report["errors"].items())]
    return "\n".join(lines) + "\n"


def write_markdown(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the Markdown tables to ``path``: between the :data:`MARKERS` lines when the file has them (so that
    ``--report docs/performance.md`` refreshes the page's tables and keeps its text), else as the whole file."""
    path = Path(path)
    tables = markdown_report(report)
    text = path.read_text() if path.is_file() else ""
    if MARKERS[0] in text and MARKERS[1] in text:
        head, rest = text.split(MARKERS[0], 1)
        tail = rest.split(MARKERS[1], 1)[1]
        text = f"{head}{MARKERS[0]}\n{tables}{MARKERS[1]}{tail}"
    else:
        text = tables
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
