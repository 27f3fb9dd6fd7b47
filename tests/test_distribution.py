# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Distribution and integration: model-zoo checks, TorchScript export, the release archive and its download,
multi-process training with torchrun, and MLflow tracking.

Most tests run the bundle's own command lines (``python -m monai.bundle ...``, ``python -m scripts.tools.package``,
``python -m torch.distributed.run ...``) in subprocesses, on CPU, with freshly initialised weights and a tiny
synthetic phantom set.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import serve_directory
from monai.bundle import ConfigParser
from scripts.tools import package

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE_ROOT / "configs"
SCHEMA = BUNDLE_ROOT / "tests" / "schema" / "meta_schema_20240725.json"
NAME = "pd_datscan_kd_classification"
METADATA = json.loads((CONFIGS / "metadata.json").read_text())
VERSION = METADATA["version"]
TINY = ["--spatial_size", "[32,32,32]", "--max_epochs", "1", "--batch_size", "2", "--progress_bar", "False"]

# handlers that write files or logs; on ranks other than 0 every one of them must be disabled
WRITING_HANDLERS = {
    "StatsHandler",
    "TensorBoardStatsHandler",
    "ignite.handlers.ProgressBar",
    "CheckpointSaver",
    "scripts.runs.BestCheckpointSaver",
    "scripts.handlers.PublishCheckpoint",
}
# handlers that take part in training (or gather across ranks before rank 0 writes); they must run on every rank
SHARED_HANDLERS = {
    "ValidationHandler",
    "LrScheduleHandler",
    "EarlyStopHandler",
    "MetricsSaver",  # gathers across ranks and writes on rank 0 itself (save_rank)
}


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
def _env(pythonpath: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MONAI_FAIL_ON_DUPLICATE_CONFIG"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a command; return its combined output, or fail the test with the end of that output."""
    result = subprocess.run(
        args, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(f"command failed ({result.returncode}): {' '.join(args)}\n{result.stdout[-4000:]}")
    return result.stdout


def _bundle(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", *args]


def _config_list(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


def _parser(*names: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in names])
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.resolve_macro_and_relative_ids()  # blocks a training config includes from another config file
    return parser


def _network(config: str, net_id: str = "network_def", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _parser(config).get_parsed_content(net_id)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _write_weights(folder: Path) -> dict[str, Path]:
    """Freshly initialised student and teacher state dicts, as the bundle's configs define them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"model.pt": folder / "model.pt", "teacher.pt": folder / "teacher.pt"}
    torch.save(_network("inference.json", seed=1).state_dict(), paths["model.pt"])
    torch.save(_network("train_teacher.json", seed=2).state_dict(), paths["teacher.pt"])
    return paths


def _copy_bundle_sources(dest: Path) -> Path:
    """A copy of the bundle's distributable sources (what the packager reads), with original timestamps."""
    for name in ("LICENSE", "README.md"):
        if (BUNDLE_ROOT / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(BUNDLE_ROOT / name, dest / name)
    for tree in ("configs", "scripts", "docs"):
        if (BUNDLE_ROOT / tree).is_dir():
            shutil.copytree(BUNDLE_ROOT / tree, dest / tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """12 synthetic subjects (6 PD, 6 HC): 8 training, 2 validation and 2 test scans."""
    from scripts.synthetic.phantom import generate_dataset

    out = tmp_path_factory.mktemp("ddp_phantoms")
    generate_dataset(out, n_subjects=12, seed=5, pd_fraction=0.5, workers=1)
    return out


# --------------------------------------------------------------------------------------------------------------------
# model-zoo checks
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_config_is_valid_json_without_duplicate_keys_and_pretty_printed(path):
    text = path.read_text()
    content = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    # the model zoo's pre-commit hook: pretty-format-json --indent=4 --no-sort-keys
    assert text == json.dumps(content, indent=4) + "\n"


def test_metadata_verifies_against_the_vendored_schema_offline(tmp_path):
    schema = tmp_path / "schema.json"
    shutil.copyfile(SCHEMA, schema)
    out = _run(
        _bundle("verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"), "--filepath", str(schema)),
        cwd=BUNDLE_ROOT,
    )
    assert "metadata is verified with no error" in out
    # the same check rejects metadata without a field the schema requires
    from monai.bundle import verify_metadata

    broken = {k: v for k, v in METADATA.items() if k != "required_packages_version"}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="required_packages_version"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))


def test_student_network_matches_network_data_format():
    out = _run(
        _bundle(
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            str(CONFIGS / "metadata.json"),
            "--config_file",
            str(CONFIGS / "inference.json"),
        ),
        cwd=BUNDLE_ROOT,
    )
    assert "data shape of network is verified with no error" in out


@pytest.mark.parametrize(("config", "net_id"), [("train_teacher.json", "network_def"), ("distill.json", "teacher_def")])
def test_teacher_network_matches_teacher_data_format(config, net_id):
    from monai.bundle import verify_net_in_out

    meta = str(CONFIGS / "metadata.json")
    teacher_format = {"_meta_#network_data_format": METADATA["teacher_data_format"]}
    verify_net_in_out(net_id=net_id, meta_file=meta, config_file=str(CONFIGS / config), device="cpu", **teacher_format)
    # the check compares: a format announcing three output channels is rejected
    wrong = json.loads(json.dumps(METADATA["teacher_data_format"]))
    wrong["outputs"]["pred"]["num_channels"] = 3
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(
            net_id=net_id,
            meta_file=meta,
            config_file=str(CONFIGS / config),
            device="cpu",
            **{"_meta_#network_data_format": wrong},
        )


# --------------------------------------------------------------------------------------------------------------------
# TorchScript export
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "data_format"),
    [("inference.json", "network_data_format"), ("train_teacher.json", "teacher_data_format")],
    ids=["student", "teacher"],
)
def test_torchscript_export_computes_what_the_checkpoint_computes(tmp_path, config, data_format):
    from monai.data import load_net_with_metadata

    state = _network(config, seed=3).state_dict()
    ckpt, exported = tmp_path / "weights.pt", tmp_path / "exported.ts"
    torch.save(state, ckpt)
    _run(
        _bundle(
            "ckpt_export",
            "network_def",
            "--filepath",
            str(exported),
            "--ckpt_file",
            str(ckpt),
            "--meta_file",
            str(CONFIGS / "metadata.json"),
            "--config_file",
            str(CONFIGS / config),
        ),
        cwd=BUNDLE_ROOT,
    )
    scripted, meta, extra = load_net_with_metadata(str(exported), map_location="cpu", more_extra_files=[config])
    assert meta["version"] == VERSION and json.loads(extra[config]) == json.loads((CONFIGS / config).read_text())

    eager = _network(config, seed=4)  # other initial weights: the checkpoint must overwrite them
    eager.load_state_dict(torch.load(ckpt, weights_only=True))
    eager.eval()
    scripted.eval()
    image = METADATA[data_format]["inputs"]["image"]
    x = torch.rand(2, image["num_channels"], *image["spatial_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = eager(x), scripted(x)
    assert got.shape == (2, METADATA[data_format]["outputs"]["pred"]["num_channels"])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# the release archive
# --------------------------------------------------------------------------------------------------------------------
def _dummy_weights(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    content = {"model.pt": b"student" * 100, "teacher.pt": b"teacher" * 100}
    for name, data in content.items():
        (folder / name).write_bytes(data)
    return content


def test_archive_has_one_top_folder_stores_the_weights_and_is_reproducible(tmp_path):
    bundle = _copy_bundle_sources(tmp_path / "bundle")
    (bundle / "scripts" / "__pycache__").mkdir(exist_ok=True)
    (bundle / "scripts" / "__pycache__" / "data.cpython-311.pyc").write_bytes(b"compiled")
    (bundle / "configs" / ".hidden.json").write_text("{}")
    (bundle / "configs" / "monailabel_train.json").write_text("{}")  # MONAI Label's multi-GPU export
    weights = _dummy_weights(tmp_path / "weights")

    first = package.build_archive(bundle, tmp_path / "out1", with_weights=True, weights_dir=tmp_path / "weights")
    with zipfile.ZipFile(first.path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        stored = {n: zf.read(n) for n in names}
    assert first.path.name == f"{NAME}_v{VERSION}.zip"
    assert names == sorted(names) and all(n.startswith(f"{NAME}/") for n in names)
    assert not any(n.endswith("/") for n in names)  # no directory entries
    for required in ("LICENSE", "configs/metadata.json", "configs/inference.json", "scripts/__init__.py"):
        assert f"{NAME}/{required}" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") or "/." in n for n in names)
    assert f"{NAME}/large_files.yml" not in names
    assert f"{NAME}/configs/monailabel_train.json" not in names
    assert stored[f"{NAME}/models/model.pt"] == weights["model.pt"]
    assert stored[f"{NAME}/models/teacher.pt"] == weights["teacher.pt"]
    assert stored[f"{NAME}/configs/metadata.json"] == (BUNDLE_ROOT / "configs" / "metadata.json").read_bytes()
    assert {i.date_time for i in infos} == {(2022, 5, 30, 0, 0, 0)}

    sha1 = hashlib.sha1(first.path.read_bytes()).hexdigest()
    info = json.loads((tmp_path / "out1" / "model_info.json").read_text())
    assert info == {f"{NAME}_v{VERSION}": {"checksum": sha1, "source": first.path.resolve().as_uri()}}

    # new modification times (a fresh checkout) give the same bytes
    for path in bundle.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    second = package.build_archive(bundle, tmp_path / "out2", with_weights=True, weights_dir=tmp_path / "weights")
    assert second.path.read_bytes() == first.path.read_bytes()


def test_archive_without_weights_lists_them_with_url_and_sha256(tmp_path):
    weights = _dummy_weights(tmp_path / "weights")
    base = "https://example.org/releases/download/v9"
    result = package.build_archive(
        BUNDLE_ROOT, tmp_path / "out", weights_dir=tmp_path / "weights", weights_url=base + "/", release_url=base
    )
    with zipfile.ZipFile(result.path) as zf:
        names = zf.namelist()
        listed = yaml.safe_load(zf.read(f"{NAME}/large_files.yml"))
    assert not any(n.startswith(f"{NAME}/models/") for n in names)
    assert listed == {
        "large_files": [
            {
                "path": f"models/{name}",
                "url": f"{base}/{name}",
                "hash_val": hashlib.sha256(data).hexdigest(),
                "hash_type": "sha256",
            }
            for name, data in sorted(weights.items())
        ]
    }
    info = json.loads(result.model_info.read_text())
    assert info[f"{NAME}_v{VERSION}"]["source"] == f"{base}/{NAME}_v{VERSION}.zip"


def test_model_info_keeps_the_entries_of_other_versions(tmp_path):
    (tmp_path / "model_info.json").write_text(json.dumps({f"{NAME}_v0.0.1": {"checksum": "abc", "source": "x"}}))
    _dummy_weights(tmp_path / "weights")
    package.build_archive(BUNDLE_ROOT, tmp_path, with_weights=True, weights_dir=tmp_path / "weights")
    info = json.loads((tmp_path / "model_info.json").read_text())
    assert set(info) == {f"{NAME}_v0.0.1", f"{NAME}_v{VERSION}"}
    assert info[f"{NAME}_v0.0.1"] == {"checksum": "abc", "source": "x"}


def test_packaging_refuses_missing_student_weights_or_weights_url(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "teacher.pt").write_bytes(b"t")
    common = ["--bundle-root", str(BUNDLE_ROOT), "--out", str(tmp_path / "out"), "--weights-dir"]
    with pytest.raises(SystemExit) as exit_info:
        package.main([*common, str(tmp_path / "weights"), "--with-weights"])
    assert exit_info.value.code == 2 and "no model.pt" in capsys.readouterr().err
    _dummy_weights(tmp_path / "weights")
    with pytest.raises(SystemExit) as exit_info:
        package.main([*common, str(tmp_path / "weights")])
    assert exit_info.value.code == 2 and "--weights-url" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.zip"))


def test_download_over_http_then_infer_and_load_from_the_downloaded_copy(tmp_path, phantoms):
    from monai.bundle import load

    serve, bundles, elsewhere = tmp_path / "serve", tmp_path / "bundles", tmp_path / "elsewhere"
    for folder in (serve, bundles, elsewhere):
        folder.mkdir()
    weights = _write_weights(serve / "weights")
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, phantom in enumerate(sorted((phantoms / "images").glob("*.nii*"))[:2]):  # plausible DaTscans, MNI grid
        shutil.copy(phantom, scans / f"scan{i}.nii.gz")

    with serve_directory(serve) as port:
        base = f"http://127.0.0.1:{port}"
        _run(
            [
                sys.executable,
                "-m",
                "scripts.tools.package",
                "--out",
                str(serve),
                "--weights-dir",
                str(serve / "weights"),
                "--weights-url",
                f"{base}/weights",
                "--release-url",
                base,
            ],
            cwd=BUNDLE_ROOT,
        )
        zip_name = f"{NAME}_v{VERSION}.zip"
        info = json.loads((serve / "model_info.json").read_text())
        assert info[f"{NAME}_v{VERSION}"]["source"] == f"{base}/{zip_name}"
        _run(
            _bundle(
                "download",
                "--name",
                NAME,
                "--url",
                f"{base}/{zip_name}",
                "--bundle_dir",
                str(bundles),
                "--progress",
                "0",
            ),
            cwd=elsewhere,
        )
        copy_root = bundles / NAME
        assert (copy_root / "configs" / "metadata.json").is_file() and (copy_root / "large_files.yml").is_file()
        assert not (copy_root / "models" / "model.pt").exists()
        _run(_bundle("download_large_files", "--bundle_path", str(copy_root)), cwd=elsewhere)
    for name, path in weights.items():
        assert (copy_root / "models" / name).read_bytes() == path.read_bytes()

    # inference from the downloaded copy, run from another working directory
    _run(
        _bundle(
            "run",
            "--config_file",
            str(copy_root / "configs" / "inference.json"),
            "--bundle_root",
            str(copy_root),
            "--input",
            str(scans),
        ),
        cwd=elsewhere,
        env=_env(pythonpath=copy_root),
    )
    runs = list((copy_root / "eval").glob("inference-*"))
    assert len(runs) == 1
    header = json.loads((runs[0] / "predictions.json").read_text())
    assert Path(header["model_file"]).resolve() == (copy_root / "models" / "model.pt").resolve()
    with (runs[0] / "predictions.csv").open() as f:
        rows = {Path(r["image"]).name: float(r["pd_probability"]) for r in csv.DictReader(f)}
    assert sorted(rows) == ["scan0.nii.gz", "scan1.nii.gz"]

    # the same probabilities from the packaged weights, computed here
    parser = _parser("inference.json")
    preprocessing = parser.get_parsed_content("preprocessing")
    student = parser.get_parsed_content("network_def")
    student.load_state_dict(torch.load(weights["model.pt"], weights_only=True))
    student.eval()
    for name, probability in rows.items():
        image = preprocessing({"image": str(scans / name)})["image"]
        with torch.no_grad():
            expected = torch.softmax(student(image.as_tensor()[None].float()), dim=1)[0, 1].item()
        assert probability == pytest.approx(expected, abs=2e-6)

    # monai.bundle.load fills a student instance with the packaged weights
    fresh = _network("inference.json", seed=7)
    reference = torch.load(weights["model.pt"], weights_only=True)
    assert any(not torch.equal(v, reference[k]) for k, v in fresh.state_dict().items())
    loaded = load(name=NAME, bundle_dir=str(bundles), model=fresh, device="cpu", progress=False)
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


# --------------------------------------------------------------------------------------------------------------------
# multi-GPU overrides (torchrun); run on CPU with the gloo backend
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["train_teacher.json", "distill.json"])
def test_one_multi_gpu_override_serves_both_trainings_and_rank0_alone_writes(base):
    merged = _parser(base, "multi_gpu.json")
    for section in ("train", "validate"):
        for i, handler in enumerate(merged[f"{section}#handlers"]):
            if isinstance(handler, str):  # a reference (the early-stop handler): must stay on every rank
                continue
            disabled = str(handler.get("_disabled_", ""))
            where = f"{base}: {section}#handlers#{i} ({handler['_target_']})"
            if handler["_target_"] in WRITING_HANDLERS:
                assert "not" in disabled and "@is_rank0" in disabled, f"{where} writes but runs on every rank"
            else:
                assert handler["_target_"] in SHARED_HANDLERS, f"{where}: decide whether it runs on every rank"
                assert "is_rank0" not in disabled, f"{where} takes part in training and must run on every rank"
    network = merged["network"]
    assert network["_target_"] == "torch.nn.parallel.DistributedDataParallel" and "@network_def" in network["module"]
    assert "DistributedDataParallel" not in json.dumps(merged.get("teacher_def", {}))
    for section in ("train", "validate"):
        assert merged[f"{section}#dataloader#sampler"].replace("::", "#") == f"@{section}#sampler"
        assert merged[f"{section}#sampler#_target_"] == "DistributedSampler"
    assert merged["validate#sampler#even_divisible"] is False  # each validation scan counted once
    assert any("destroy_process_group" in str(step) for step in merged["finalize"])
    # the flag is what decides: evaluated on rank 0 the writing handlers are on, on another rank they are off
    for rank0 in (True, False):
        merged = _parser(base, "multi_gpu.json")
        merged.update({"is_rank0": rank0, "progress_bar": True})
        for section in ("train", "validate"):
            for i, handler in enumerate(merged[f"{section}#handlers"]):
                if isinstance(handler, dict) and handler["_target_"] in WRITING_HANDLERS:
                    disabled = merged.get_parsed_content(f"{section}#handlers#{i}#_disabled_")
                    assert disabled is (not rank0), f"{section}#handlers#{i} on rank0={rank0}: disabled={disabled}"


def _torchrun(config: str, bundle_root: Path, data: Path, logs: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        _config_list(config, "multi_gpu.json"),
        "--bundle_root",
        str(bundle_root),
        "--dataset_dir",
        str(data),
        *TINY,
    ]
    result = subprocess.run(
        args, cwd=BUNDLE_ROOT, env=_env(pythonpath=BUNDLE_ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=400,
    )  # fmt: skip
    if result.returncode != 0:  # the launcher says only which rank died: show what each rank printed
        files = sorted(logs.rglob("*.log"))
        ranks = "".join(f"\n--- {f.relative_to(logs)} ---\n{f.read_text()[-3000:]}" for f in files)
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-2000:]}{ranks}")


def _rank_logs(logs: Path) -> dict[int, str]:
    out = {}
    for rank in (0, 1):
        files = list(logs.glob(f"*/attempt_0/{rank}/stdout.log")) + list(logs.glob(f"*/attempt_0/{rank}/stderr.log"))
        assert files, f"no log of rank {rank} under {logs}"
        out[rank] = "".join(f.read_text() for f in files)
    return out


def _check_single_writer(bundle_root: Path, logs: Path, trainer: str, checkpoint: str, config: str) -> Path:
    rank_logs = _rank_logs(logs)
    for rank, text in rank_logs.items():
        assert f"{trainer} - INFO - Engine run finished" in text, f"training did not finish on rank {rank}"
    assert rank_logs[0].count("published to") == 1 and "published to" not in rank_logs[1]

    runs = [p for p in (bundle_root / "eval").iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder (rank 0's), found {[p.name for p in runs]}"
    run = runs[0]
    assert [p.name for p in run.glob("*.pt")] == [checkpoint]
    assert [p.name for p in run.rglob("*.csv")] == ["metrics.csv"]
    with (run / "validation" / "metrics.csv").open() as f:
        metrics = {name: float(value) for name, value in csv.reader(f)}
    # the validation split holds one HC and one PD scan, one per rank: ROC AUC, sensitivity and specificity are
    # defined only when the metrics gather both ranks' scans
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("val_auc", "val_sensitivity", "val_specificity")), metrics
    events = list(run.glob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # one writing process (pid in the name)
    published = bundle_root / "models" / checkpoint
    assert published.read_bytes() == (run / checkpoint).read_bytes()
    # a plain state dict of the unwrapped network (no "module." prefix from DistributedDataParallel)
    _network(config).load_state_dict(torch.load(published, weights_only=True), strict=True)
    return run


def test_torchrun_two_processes_train_the_teacher_and_only_rank0_writes(tmp_path, phantoms):
    bundle_root = tmp_path / "bundle"
    bundle_root.mkdir()
    _torchrun("train_teacher.json", bundle_root, phantoms, tmp_path / "logs")
    run = _check_single_writer(bundle_root, tmp_path / "logs", "LeanTrainer", "teacher.pt", "train_teacher.json")
    # TensorBoard scalars of the run: the training loss per iteration and the validation metrics per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train_loss", "val_f1_macro"} <= tags


def test_torchrun_two_processes_distil_the_student_and_only_rank0_writes(tmp_path, phantoms):
    bundle_root = tmp_path / "bundle"
    (bundle_root / "models").mkdir(parents=True)
    teacher = _network("distill.json", "teacher_def", seed=5)
    torch.save(teacher.state_dict(), bundle_root / "models" / "teacher.pt")
    _torchrun("distill.json", bundle_root, phantoms, tmp_path / "logs")
    _check_single_writer(bundle_root, tmp_path / "logs", "DistillationTrainer", "model.pt", "inference.json")
    # the frozen teacher is read, never written
    saved = torch.load(bundle_root / "models" / "teacher.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())


# --------------------------------------------------------------------------------------------------------------------
# experiment tracking with MLflow (optional dependency: requirements-tracking.txt)
# --------------------------------------------------------------------------------------------------------------------
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None and importlib.util.find_spec("sqlalchemy") is not None


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow tracking needs `pip install -r requirements-tracking.txt`")
def test_mlflow_tracking_of_teacher_training_and_distillation(tmp_path, phantoms):
    import mlflow

    bundle_root = tmp_path / "bundle"
    bundle_root.mkdir()
    teacher_db = tmp_path / "teacher" / "mlruns.db"
    teacher_db.parent.mkdir()
    common = ["--bundle_root", str(bundle_root), "--dataset_dir", str(phantoms), *TINY]
    # MONAI's built-in settings, with a local SQLite store
    uri = f"sqlite:///{teacher_db}"
    config = str(CONFIGS / "train_teacher.json")
    _run(
        _bundle("run", "training", "--config_file", config, *common, "--tracking", "mlflow", "--tracking_uri", uri),
        cwd=BUNDLE_ROOT,  # the training configs include blocks of configs/inference.json (paths from the bundle root)
        env=_env(pythonpath=BUNDLE_ROOT),
    )
    # the bundle's settings (configs/mlflow.json): every loss term, the run's parameters, its validation report
    settings = str(CONFIGS / "mlflow.json")
    config = str(CONFIGS / "distill.json")
    _run(
        _bundle("run", "training", "--config_file", config, *common, "--tracking", settings),
        cwd=BUNDLE_ROOT,
        env=_env(pythonpath=BUNDLE_ROOT),
    )

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("teacher-")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_f1_macro")] == [1]

    client = mlflow.MlflowClient(f"sqlite:///{bundle_root / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("distill-")
    assert [p.name for p in (bundle_root / "eval").glob("distill-*")] == [run.info.run_name]
    for term in ("train_loss", "loss_ce", "loss_fg", "loss_lg"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, term)] == [1, 2, 3, 4]
    assert {"val_f1_macro", "val_auc", "val_accuracy"} <= set(run.data.metrics)
    params = run.data.params
    assert params["network"] == "Student2D" and params["projection"] == "joint_fusion_slices"
    assert params["spatial_size"] == "[32, 32, 32]" and "fg_weight" in params["loss_settings"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "metrics.csv" in artifacts
    local = client.download_artifacts(run.info.run_id, "metrics.csv", str(tmp_path))
    with open(local) as f:
        logged = {name: float(value) for name, value in csv.reader(f)}
    assert logged["val_f1_macro"] == pytest.approx(run.data.metrics["val_f1_macro"])
