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
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose, Lambdad
from scripts.benchmark.runner import (
    EpochTimer,
    PlainTensorBatch,
    ReleaseTeacherInput,
    _parser,
    _run_isolated,
    main,
    percentile,
    plan_cases,
    run_case,
)
from scripts.engine import TeacherOutputCache
from scripts.synthetic.phantom import generate_dataset

N_SCANS, BATCH, PROJECTION = 8, 4, "early_fusion_slices"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    out = work / "bench.json"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--subjects", str(N_SCANS), "--spatial-size", "16"]
    argv += ["--batch-size", str(BATCH), "--projections", PROJECTION, "--work-dir", str(work), "--out", str(out)]
    returned = main(argv)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))  # the file holds the returned report
    return written


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_report_has_every_section_and_no_error(report):
    assert set(report) >= {"hardware", "settings", "teacher_training", "distillation", "inference", "memory"}
    assert set(report) >= {"fast_path", "errors"}
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
        for key in ("scans_per_s", "epoch_s", "full_batch_iteration_s_median", "peak_rss_mb"):
            assert _positive(run[key]), (kind, key, run[key])
        # throughput is the scans of the (single, quick) timed epoch over its duration
        assert run["scans_per_s"] == pytest.approx(N_SCANS / run["epoch_s"], rel=1e-9)
    assert _positive(part["pipeline_over_raw"])
    assert part["pipeline_over_raw"] == pytest.approx(part["pipeline"]["scans_per_s"] / part["raw"]["scans_per_s"])


def test_validation_is_removed_and_the_teacher_cache_is_used_only_when_enabled(report):
    distill = report["distillation"]
    for section in ("teacher_training", "distillation"):
        runs = [report[section]] if section == "teacher_training" else [distill["no_cache"], distill["cache"]]
        for run in runs:
            assert "ValidationHandler" not in run["pipeline"]["train_handlers"]
            assert "LrScheduleHandler" in run["pipeline"]["train_handlers"]
    assert distill["no_cache"]["pipeline"]["teacher_cache"] is None
    # warm-up epoch fills the cache (one miss per scan), the timed epoch reads it (one hit per scan)
    assert distill["cache"]["pipeline"]["teacher_cache"] == {"hits": N_SCANS, "misses": N_SCANS}
    assert _positive(distill["cache_speedup_pipeline"]) and _positive(distill["cache_speedup_raw"])


def test_latencies_of_teacher_and_each_projection(report):
    inference = report["inference"]
    runs = [inference["teacher"], inference["students"][PROJECTION]]
    assert runs[0]["input_shape"] == [1, 1, 16, 16, 16]
    assert runs[1]["input_shape"] == [1, 3, 16, 16]  # three adjacent axial slices
    for run in runs:
        assert run["scans"] == 3
        assert _positive(run["p50_ms"]) and run["p95_ms"] >= run["p50_ms"]
        assert _positive(run["preprocess_p50_ms"]) and _positive(run["model_p50_ms"])
    ratio = inference["student_over_teacher_p50"][PROJECTION]
    assert ratio == pytest.approx(runs[1]["p50_ms"] / runs[0]["p50_ms"])


def test_memory_and_fast_path_entries(report):
    assert report["memory"] and all(_positive(m["peak_rss_mb"]) for m in report["memory"].values())
    assert all(m["cuda_peak_mb"] is None for m in report["memory"].values())  # CPU run
    fast = report["fast_path"]
    for name in ("teacher_pipeline_threadloader", "distill_cache_release", "distill_cache_plain"):
        assert _positive(fast[name]["speedup"]) and isinstance(fast[name]["wins"], bool)
        assert fast[name]["speedup"] == pytest.approx(fast[name]["scans_per_s"] / fast[name]["baseline_scans_per_s"])
    assert fast["teacher_pipeline_threadloader"]["detail"]["dataloader"] == "ThreadDataLoader"
    assert fast["distill_cache_plain"]["detail"]["prepare_batch"] == "PlainTensorBatch"
    # the released teacher input did not break the cache lookups of the timed epoch
    assert fast["distill_cache_release"]["detail"]["teacher_cache"] == {"hits": N_SCANS, "misses": N_SCANS}
    assert "skipped" in fast["amp"]  # CUDA-only


@pytest.fixture(scope="module")
def five_scans(tmp_path_factory):
    """A datalist folder with five phantom scans, all in the training split."""
    data = generate_dataset(tmp_path_factory.mktemp("five"), n_subjects=5, seed=1, split=(1.0, 0.0, 0.0), workers=1)
    return data.parent


def test_isolated_case_reports_its_own_process_memory(five_scans, tmp_path):
    """The default (non-quick) mode runs each case in a fresh interpreter."""
    images = sorted(str(p) for p in (five_scans / "images").glob("*.nii.gz"))
    spec = {
        "name": "inference_teacher",
        "kind": "inference",
        "model": "teacher",
        "device": "cpu",
        "overrides": {"bundle_root": str(tmp_path), "spatial_size": [16, 16, 16], "device": "$torch.device('cpu')"},
        "files": images[:3],
        "warmup": 1,
    }
    result = _run_isolated(spec, tmp_path, timeout=300)
    assert "error" not in result, result.get("error")
    assert result["scans"] == 2 and _positive(result["p50_ms"])
    assert _positive(result["peak_rss_mb"]) and result["peak_rss_mb"] >= result["rss_at_start_mb"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_guards_cuda_only_options_and_follows_the_arguments(five_scans, tmp_path, device):
    args = _parser().parse_args(["--device", device, "--projections", "entropy", "single_slice", "--batch-size", "2"])
    cases = {c["name"]: c for c in plan_cases(args, five_scans, tmp_path)}
    gpu_only = {n for n in cases if n.endswith(("_amp", "_cudnn_benchmark"))}
    assert bool(gpu_only) == (device == "cuda")
    assert {"inference_entropy", "inference_single_slice"} <= set(cases)
    assert cases["distill_cache_pipeline"]["overrides"]["projection"] == "entropy"  # the first projection
    assert cases["distill_cache_pipeline"]["overrides"]["cache_teacher_outputs"] is True
    assert cases["distill_nocache_pipeline"]["overrides"]["cache_teacher_outputs"] is False
    assert all(c["overrides"].get("batch_size", 2) == 2 for c in cases.values())
    assert cases["teacher_raw"]["n_scans"] == 5 and cases["teacher_raw"]["batch_size"] == 2
    assert all(c["device"] == device for c in cases.values())
    assert len(cases["inference_teacher"]["files"]) == 20 + 2  # cycled over the five scans
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
    timer = EpochTimer("cpu")
    timer.attach(engine)
    engine.run(batches, max_epochs=2)
    assert timer.scans == [8, 8] and timer.iterations == [3, 3]
    assert timer.iteration_scans == [[3, 3, 2], [3, 3, 2]]
    assert len(timer.seconds) == 2 and all(s >= 0 for s in timer.seconds)
    # every iteration interval lies inside its epoch's interval
    assert all(s >= sum(times) for s, times in zip(timer.seconds, timer.iteration_seconds))


def _volume_dataset(n: int) -> CacheDataset:
    items = [
        {"image_3d": MetaTensor(torch.rand(1, 6, 6, 6), meta={"filename_or_obj": f"scan{i}.nii.gz"}), "label": i % 2}
        for i in range(n)
    ]
    return CacheDataset(items, transform=Compose([Lambdad("label", lambda x: x)]), progress=False)


def test_release_teacher_input_waits_until_every_scan_is_cached():
    dataset = _volume_dataset(3)
    engine = Engine(lambda e, b: None)
    engine.teacher_cache = TeacherOutputCache()
    handler = ReleaseTeacherInput(dataset, key="image_3d")
    engine.teacher_cache.put(["scan0.nii.gz", "scan1.nii.gz"], torch.zeros(2, 2), torch.zeros(2, 4))
    handler(engine)  # one scan not cached yet: the volumes stay
    assert not handler.released and all(dataset[i]["image_3d"].shape == (1, 6, 6, 6) for i in range(3))
    engine.teacher_cache.put(["scan2.nii.gz"], torch.zeros(1, 2), torch.zeros(1, 4))
    handler(engine)
    assert handler.released
    for i in range(3):
        volume = dataset[i]["image_3d"]
        assert volume.shape == (1, 1, 1, 1) and volume.meta["filename_or_obj"] == f"scan{i}.nii.gz"


def test_release_teacher_input_does_nothing_without_a_teacher_cache():
    dataset = _volume_dataset(2)
    engine = Engine(lambda e, b: None)
    engine.teacher_cache = None
    handler = ReleaseTeacherInput(dataset)
    handler(engine)
    assert not handler.released and dataset[0]["image_3d"].shape == (1, 6, 6, 6)
    with pytest.raises(TypeError, match="CacheDataset"):
        ReleaseTeacherInput([{"image_3d": torch.zeros(1)}])


def test_plain_tensor_batch_strips_metadata_but_not_values():
    image = MetaTensor(torch.arange(8.0).reshape(2, 1, 2, 2), meta={"filename_or_obj": ["a", "b"]})
    batch = {"image": image, "label": torch.tensor([0, 1]), "image_3d": image}
    x, y = PlainTensorBatch()(batch, torch.device("cpu"))
    assert type(x) is torch.Tensor and type(y) is torch.Tensor
    assert torch.equal(x, torch.arange(8.0).reshape(2, 1, 2, 2)) and torch.equal(y, torch.tensor([0, 1]))
    assert isinstance(batch["image_3d"], MetaTensor)  # the batch itself is untouched
    x, _ = PlainTensorBatch(enabled=False)(batch, torch.device("cpu"))
    assert isinstance(x, MetaTensor) and x.meta["filename_or_obj"] == ["a", "b"]  # MONAI's default behaviour


def test_unknown_case_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown case kind 'nope'"):
        run_case({"kind": "nope"})
