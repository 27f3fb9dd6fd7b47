# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The benchmark: a ``--quick`` run on a tiny phantom set (16³, 8 scans, CPU) and its components.

No assertion depends on how fast anything ran: only on the report's structure, on counts that follow from the
data and the batch size, and on the numbers being positive.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from ignite.engine import Engine
from scripts.benchmark.cases import run_case, run_isolated
from scripts.benchmark.plan import plan_cases
from scripts.benchmark.report import _overhead
from scripts.benchmark.runner import main, parser
from scripts.benchmark.timing import EpochTimer, percentile
from scripts.synthetic.phantom import generate_dataset

N_SCANS, BATCH, PROJECTION = 8, 4, "early_fusion_slices"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    out = work / "bench.json"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--subjects", str(N_SCANS), "--spatial-size", "16"]
    argv += ["--batch-size", str(BATCH), "--overhead-batch-size", str(BATCH), "--projections", PROJECTION]
    argv += ["--work-dir", str(work), "--out", str(out), "--report", str(work / "tables.md")]
    returned = main(argv)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))  # the file holds the returned report
    written["markdown"] = (work / "tables.md").read_text()
    return written


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_report_has_every_section_and_no_error(report):
    assert set(report) >= {"hardware", "settings", "teacher_training", "distillation", "inference", "memory"}
    assert set(report) >= {"data_path", "overhead", "scale", "fast_path", "targets", "errors"}
    assert report["errors"] == {}
    hw = report["hardware"]
    assert {"cpu_model", "cpu_count", "torch", "monai", "device", "device_name", "torch_num_threads"} <= set(hw)
    assert hw["device"] == "cpu" and "scripts.benchmark" in hw["command"] and "--quick" in hw["command"]
    assert report["settings"]["n_train"] == N_SCANS and report["settings"]["quick"] is True


@pytest.mark.parametrize(
    "section",
    [("teacher_training",), ("distillation", "no_cache"), ("distillation", "cache")],
    ids=["teacher", "distill-nocache", "distill-cache"],
)
def test_pipeline_and_raw_runs_cover_one_epoch_of_the_training_split(report, section):
    part = report
    for key in section:
        part = part[key]
    iterations = math.ceil(N_SCANS / BATCH)
    for kind in ("pipeline", "raw"):
        run = part[kind]
        assert run["scans_per_epoch"] == N_SCANS and run["iterations_per_epoch"] == iterations
        assert run["batch_size"] == BATCH
        for key in ("scans_per_s", "epoch_s", "iteration_s_mean", "peak_rss_mb"):
            assert _positive(run[key]), (kind, key, run[key])
        # throughput is the scans of the (single, quick) timed epoch over its duration
        assert run["scans_per_s"] == pytest.approx(N_SCANS / run["epoch_s"], rel=1e-9)
    assert _positive(part["pipeline_over_raw"])
    assert part["pipeline_over_raw"] == pytest.approx(part["pipeline"]["scans_per_s"] / part["raw"]["scans_per_s"])


def test_validation_runs_as_configured_and_the_teacher_cache_is_used_only_when_enabled(report):
    distill = report["distillation"]
    for section in ("teacher_training", "distillation"):
        runs = [report[section]] if section == "teacher_training" else [distill["no_cache"], distill["cache"]]
        for run in runs:
            assert "ValidationHandler" in run["pipeline"]["train_handlers"]
            assert run["pipeline"]["validation"] is True and run["pipeline"]["val_interval"] == 1
            assert "LrScheduleHandler" in run["pipeline"]["train_handlers"]
    assert distill["no_cache"]["pipeline"]["teacher_cache"] is None
    # warm-up epoch fills the cache (one miss per scan), the timed epoch reads it (one hit per scan)
    assert distill["cache"]["pipeline"]["teacher_cache"] == {"hits": N_SCANS, "misses": N_SCANS}
    assert _positive(distill["cache_speedup_pipeline"]) and _positive(distill["cache_speedup_raw"])


def test_data_path_ceiling_of_each_variant_and_its_ratio_to_the_raw_network(report):
    raw_rates = {
        "teacher": report["teacher_training"]["raw"]["scans_per_s"],
        "distill": report["distillation"]["cache"]["raw"]["scans_per_s"],
    }
    for model, raw_rate in raw_rates.items():
        entry = report["data_path"][model]
        assert entry["raw_scans_per_s"] == raw_rate and {"bundle", "monai"} <= set(entry["variants"])
        for variant in entry["variants"].values():
            assert _positive(variant["scans_per_s"]) and variant["batch_size"] == BATCH
            assert variant["over_raw"] == pytest.approx(variant["scans_per_s"] / raw_rate)
    assert report["settings"]["datapath_epochs"] == 2


def test_trainer_overhead_of_both_trainers_against_a_bare_loop(report):
    rows = report["trainer_overhead"]
    assert set(rows) == {"trainer_teacher", "trainer_distill"}
    assert rows["trainer_teacher"]["trainer"] == "LeanTrainer"
    assert rows["trainer_distill"]["trainer"] == "DistillationTrainer" and rows["trainer_distill"]["teacher_cache"]
    for row in rows.values():
        assert row["iterations_per_epoch"] == math.ceil(N_SCANS / BATCH) and row["batch_size"] == BATCH
        assert _positive(row["trainer_ms_per_iteration"]) and _positive(row["bare_ms_per_iteration"])
        want = row["trainer_ms_per_iteration"] - row["bare_ms_per_iteration"]
        assert row["overhead_ms_per_iteration"] == pytest.approx(want)
        # the epoch split where its last iteration ends: the iterations and the epoch's end (validation, checkpoints)
        assert 0 < row["loop_ms_per_iteration"] <= row["trainer_ms_per_iteration"] and row["epoch_end_ms"] > 0
        assert row["loop_overhead_ms_per_iteration"] == pytest.approx(
            row["loop_ms_per_iteration"] - row["bare_ms_per_iteration"]
        )
        # that overhead split into the data path (a bare loop over the trainer's loader) and the trainer's own share
        assert _positive(row["loader_loop_ms_per_iteration"])
        assert row["data_path_ms_per_iteration"] + row["trainer_own_ms_per_iteration"] == pytest.approx(
            row["loop_overhead_ms_per_iteration"]
        )
        assert row["validation"] is True and row["log_interval"] >= 1
    targets = [t["target"] for t in report["targets"]]
    assert sum("trainer overhead <= 0.7 ms/iteration" in t for t in targets) == 2
    assert "Trainer overhead" in report["markdown"] and "of which trainer ms" in report["markdown"]


def test_only_runs_the_named_groups(five_scans, tmp_path):
    args = parser().parse_args(["--only", "trainer", "inference"])
    args.work_dir_resolved = str(tmp_path)
    groups = {c["group"] for c in plan_cases(args, five_scans, tmp_path)}
    assert groups == {"trainer", "inference"}
    with pytest.raises(SystemExit):
        parser().parse_args(["--only", "nothing"])


def test_fixed_per_batch_overhead_from_two_grids(report):
    for variant in ("bundle", "monai"):
        o = report["overhead"][variant]
        assert o["grid"] == 32 and o["tiny_grid"] == 16 and o["batch_size"] == BATCH  # the smallest grids allowed
        assert o["bytes_per_batch"] > o["tiny_bytes"] > 0 and _positive(o["ms_per_batch"])
        assert o["overhead_ms"] is None or 0 <= o["overhead_ms"] <= o["tiny_ms_per_batch"]


def test_overhead_separates_the_fixed_cost_from_the_copy():
    results = {
        "big": {"ms_per_batch": 5.0, "bytes_per_batch": 4e6},
        "tiny": {"ms_per_batch": 1.1, "bytes_per_batch": 1e5},
    }
    o = _overhead(results, "big", "tiny")  # 3.9 ms for 3.9 MB: 1 GB/s, and 1 ms fixed
    assert o["overhead_ms"] == pytest.approx(1.0) and o["bandwidth_gb_s"] == pytest.approx(1.0)
    assert o["copy_share"] == pytest.approx(0.8)


def test_latency_and_folder_throughput_of_teacher_and_students(report):
    rows = {r["name"]: r for r in report["inference"]["rows"]}
    assert set(rows) == {"teacher", PROJECTION, f"{PROJECTION}_auto"}
    assert rows[f"{PROJECTION}_auto"]["slice_centre"] == "auto"
    teacher = rows["teacher"]
    for row in rows.values():
        assert _positive(row["p50_ms"]) and row["p95_ms"] >= row["p50_ms"]
        assert _positive(row["preprocess_p50_ms"]) and _positive(row["model_p50_ms"])
        assert _positive(row["folder_scans_per_s"]) and _positive(row["folder_cpu_ms_per_scan"])
        if row is not teacher:
            assert row["cheaper_than_teacher_p50"] == pytest.approx(teacher["p50_ms"] / row["p50_ms"])
            assert row["folder_over_teacher"] == pytest.approx(
                row["folder_scans_per_s"] / teacher["folder_scans_per_s"]
            )
    decode = report["inference"]["decode"]
    assert decode["scans"] == 3 and _positive(decode["decode_p50_ms"]) and _positive(decode["load_p50_ms"])
    assert report["inference"]["latency_teacher"]["input_shape"] == [1, 1, 16, 16, 16]


def test_scale_cases_in_memory_and_on_disk(report):
    scale = {(s["n_scans"], s["spatial_size"], s["cache"]): s for s in report["scale"]}
    assert {(4, 16, "memory"), (8, 16, "memory"), (4, 32, "memory"), (8, 16, "disk")} == set(scale)
    for (n, grid, cache), s in scale.items():
        assert _positive(s["cache_fill_s"]) and _positive(s["scans_per_s"])
        if cache == "memory":  # the stacked cache: one float32 volume and one int64 label per scan
            assert s["stacked_cache"] and s["cache_bytes"] == n * (4 * grid**3 + 8)
        else:
            assert not s["stacked_cache"] and s["disk_bytes"] > n * 4 * grid**3


def test_memory_fast_path_entries_targets_and_tables(report):
    assert report["memory"] and all(_positive(m["peak_rss_mb"]) for m in report["memory"].values())
    assert all(m["cuda_peak_mb"] is None for m in report["memory"].values())  # CPU run
    fast = report["fast_path"]
    for name in ("teacher_pipeline_monai", "distill_cache_pipeline_monai", "teacher_pipeline_contiguous"):
        assert _positive(fast[name]["speedup"]) and isinstance(fast[name]["wins"], bool)
    # the MONAI-default cases turn the bundle's data path off: the speed-up is what the bundle's default gains
    monai = fast["teacher_pipeline_monai"]
    assert monai["inverse"] and monai["speedup"] == pytest.approx(monai["baseline_scans_per_s"] / monai["scans_per_s"])
    assert monai["detail"]["stacked_cache"] is False and monai["detail"]["plain_tensor_batch"] is False
    assert report["teacher_training"]["pipeline"]["stacked_cache"] is True
    assert report["teacher_training"]["pipeline"]["plain_tensor_batch"] is True
    assert report["teacher_training"]["pipeline"]["teacher_channels_last"] is True  # the configs' default
    assert fast["teacher_pipeline_contiguous"]["detail"]["teacher_channels_last"] is False
    assert fast["distill_nocache_contiguous"]["detail"]["teacher_channels_last"] is False
    assert report["distillation"]["no_cache"]["raw"]["teacher_channels_last"] is True
    assert "skipped" in fast["amp"]  # CUDA-only
    assert all(isinstance(t["met"], bool) or t["met"] is None for t in report["targets"])
    assert any("overhead" in t["target"] for t in report["targets"])
    for title in ("Training", "Data-path ceiling", "Fixed per-batch overhead", "Inference", "Scale", "Targets"):
        assert f"### {title}" in report["markdown"]


@pytest.fixture(scope="module")
def five_scans(tmp_path_factory):
    """A datalist folder with five phantom scans, all in the training split."""
    data = generate_dataset(tmp_path_factory.mktemp("five"), n_subjects=5, seed=1, split=(1.0, 0.0, 0.0), workers=1)
    return data.parent


def test_isolated_case_reports_its_own_process_memory(five_scans, tmp_path):
    """The default (non-quick) mode runs each case in a fresh interpreter."""
    images = sorted(str(p) for p in (five_scans / "images").glob("*.nii.gz"))
    spec = {
        "name": "latency_teacher",
        "kind": "latency",
        "model": "teacher",
        "device": "cpu",
        "overrides": {
            "bundle_root": str(tmp_path),
            "spatial_size": [16, 16, 16],
            "device": "$torch.device('cpu')",
            "load_pretrain": False,  # random weights, as the planned latency cases
        },
        "files": images[:3],
        "warmup": 1,
    }
    result = run_isolated(spec, tmp_path, timeout=300)
    assert "error" not in result, result.get("error")
    assert result["scans"] == 2 and _positive(result["p50_ms"])
    assert _positive(result["peak_rss_mb"]) and result["peak_rss_mb"] >= result["rss_at_start_mb"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_guards_cuda_only_options_and_follows_the_arguments(five_scans, tmp_path, device):
    args = parser().parse_args(["--device", device, "--projections", "entropy", "single_slice", "--batch-size", "2"])
    args.work_dir_resolved = str(tmp_path)
    cases = {c["name"]: c for c in plan_cases(args, five_scans, tmp_path)}
    gpu_only = {n for n in cases if n.endswith(("_amp", "_fp32", "_cudnn_benchmark", "_host"))}
    assert bool(gpu_only) == (device == "cuda")
    assert {"latency_entropy", "latency_single_slice_auto", "folder_entropy", "folder_teacher"} <= set(cases)
    assert cases["latency_single_slice_auto"]["overrides"]["slice_centre"] == "auto"
    assert {c["n_scans"] for c in cases.values() if c["kind"] == "scale"} == {100, 300, 1000, 3000}
    assert not any(tmp_path.iterdir()), "planning writes nothing (the scale cases copy their scans when they run)"
    assert cases["distill_cache_pipeline"]["overrides"]["projection"] == "entropy"  # the first projection
    assert cases["distill_cache_pipeline"]["overrides"]["cache_teacher_outputs"] is True
    assert cases["distill_nocache_pipeline"]["overrides"]["cache_teacher_outputs"] is False
    assert all(c["overrides"].get("batch_size", 2) == 2 for c in cases.values() if c["kind"] in ("pipeline", "raw"))
    assert cases["teacher_raw"]["n_scans"] == 5 and cases["teacher_raw"]["batch_size"] == 2
    assert all(c["device"] == device for c in cases.values())
    assert len(cases["latency_teacher"]["files"]) == 20 + 2  # cycled over the five scans
    for case in cases.values():
        if case.get("group") == "fast":
            assert case["baseline"] in cases


def test_percentile_matches_linear_interpolation_between_order_statistics():
    values = [7.0, 1.0, 3.0, 10.0, 4.0]
    ordered = sorted(values)  # 1 3 4 7 10
    assert percentile(values, 50) == 4.0
    # p95: position 0.95 * 4 = 3.8 -> 7 + 0.8 * (10 - 7)
    assert percentile(values, 95) == pytest.approx(7.0 + 0.8 * 3.0)
    assert percentile(values, 0) == ordered[0] and percentile(values, 100) == ordered[-1]
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile(values, 101)


def test_epoch_timer_counts_scans_and_iterations_of_each_epoch():
    batches = [{"image": torch.zeros(b, 1, 4, 4)} for b in (3, 3, 2)]
    engine = Engine(lambda e, batch: None)
    timer = EpochTimer("cpu", per_iteration=True)
    timer.attach(engine)
    engine.run(batches, max_epochs=2)
    assert timer.scans == [8, 8] and timer.iterations == [3, 3]
    assert timer.iteration_scans == [[3, 3, 2], [3, 3, 2]]
    assert len(timer.seconds) == 2 and all(s >= 0 for s in timer.seconds)
    # every iteration interval lies inside its epoch's interval
    assert all(s >= sum(times) for s, times in zip(timer.seconds, timer.iteration_seconds))


def test_unknown_case_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown case kind 'nope'"):
        run_case({"kind": "nope"})


def test_markdown_tables_replace_only_the_marked_block_of_a_page(report, tmp_path):
    from scripts.benchmark.report import MARKERS, report_tables, write_markdown

    page = tmp_path / "performance.md"
    page.write_text(f"# Title\n\ntext before\n\n{MARKERS[0]}\nold tables\n{MARKERS[1]}\n\ntext after\n")
    write_markdown(report, page)
    text = page.read_text()
    assert text.startswith("# Title\n\ntext before\n") and text.endswith(f"{MARKERS[1]}\n\ntext after\n")
    assert "old tables" not in text and "### Data-path ceiling" in text and "Conditions:" in text
    for title, header, rows in report_tables(report):
        assert rows and all(len(row) == len(header) for row in rows), title
    write_markdown(report, tmp_path / "tables.md")  # a page without markers: the tables alone
    assert (tmp_path / "tables.md").read_text().startswith("<!-- generated by python -m scripts.benchmark")
