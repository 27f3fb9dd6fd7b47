# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""MONAI Label integration: the app in ``monailabel_app/`` served by a real ``monailabel start_server``.

Runs only in the MONAI Label environment (``bash tests/monailabel/run.sh``); elsewhere the module is skipped.
Everything is local: phantom scans, freshly initialised checkpoints, a server on 127.0.0.1 started in a folder
that holds no bundle (the app must read the bundle's configs from the bundle folder, not from its working
directory). The bundle is a copy whose configs differ from the repository's (a 32³ grid, another learning
rate), so that reading the repository's configs by mistake shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# a submodule, because this test folder itself is importable as a namespace package called "monailabel"
pytest.importorskip("monailabel.interfaces.app", reason="MONAI Label is not installed (bash tests/monailabel/run.sh)")

import httpx  # noqa: E402  (a monailabel dependency)
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
APP_SRC = REPO / "monailabel_app"
MODEL = "pd_datscan_kd_classification"
N_SUBJECTS = 9  # one of them stays unlabelled
START_TIMEOUT_S = 180
TRAIN_TIMEOUT_S = 300
GRID = [32, 32, 32]  # the copy's spatial_size (the repository's is 64³)
LEARNING_RATE = 0.002  # the copy's learning_rate in train_teacher.json, which distill.json includes by macro

if str(APP_SRC) not in sys.path:
    sys.path.insert(0, str(APP_SRC))

from lib.bundle import BundleNotFoundError, resolve_bundle_path  # noqa: E402
from lib.labels import LabelFileError, read_label_file, register_label_files, write_label_file  # noqa: E402
from lib.trainers import DistillTrainTask, TrainingFailedError, TrainRequestError  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402


# --------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def forget_bundle_modules():
    """Forget the bundle's ``scripts`` package after each test.

    A test imports it from its own copy of the bundle (MONAI Label's bundle tasks and the helpers put that copy on
    ``sys.path``), and a passing test's ``tmp_path`` is removed when it ends; a later test must import the package
    from its own copy, never reuse one whose files are gone. (Here, not in a ``conftest.py``: that name would shadow
    ``tests/conftest.py``, which the main suite imports.)"""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "scripts" or name.startswith("scripts."):
            del sys.modules[name]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_bundle(dst: Path) -> Path:
    """A throw-away copy of the bundle (configs + scripts), with its own grid and learning rate (see above)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "configs", dst / "configs", ignore=ignore)
    shutil.copytree(REPO / "scripts", dst / "scripts", ignore=ignore)
    changes = (("inference.json", "spatial_size", GRID), ("train_teacher.json", "learning_rate", LEARNING_RATE))
    for name, key, value in changes:
        config = json.loads((dst / "configs" / name).read_text())
        config[key] = value
        (dst / "configs" / name).write_text(json.dumps(config, indent=4))
    (dst / "models").mkdir(parents=True)
    return dst


def _parser(bundle: Path, config: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "cpu"
    return parser


def _save_fresh_checkpoints(bundle: Path) -> None:
    """Seeded, untrained student (``models/model.pt``) and teacher (``models/teacher.pt``) checkpoints."""
    sys.path.insert(0, str(bundle))
    try:
        torch.manual_seed(0)
        student = _parser(bundle, "inference.json").get_parsed_content("network_def")
        torch.save({"model": student.state_dict()}, bundle / "models" / "model.pt")
        teacher = _parser(bundle, "inference.json").get_parsed_content("teacher_def")
        torch.save({"model": teacher.state_dict()}, bundle / "models" / "teacher.pt")
    finally:
        sys.path.remove(str(bundle))


def _expected_pd_probability(bundle: Path, image: Path) -> float:
    """Softmax PD probability of the bundle's student on one scan, computed in this process (no MONAI Label)."""
    sys.path.insert(0, str(bundle))
    try:
        parser = _parser(bundle, "inference.json")
        net = parser.get_parsed_content("network_def")
        state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
        # the bundle's CheckpointSaver writes a bare state dict; the test's fresh checkpoint is {"model": ...}
        net.load_state_dict(state.get("model", state), strict=True)
        net.eval()
        data = parser.get_parsed_content("preprocessing")({"image": str(image)})
        with torch.no_grad():
            logits = net(data["image"].as_tensor()[None].float())
        return float(torch.softmax(logits, dim=1)[0, 1])
    finally:
        sys.path.remove(str(bundle))


def _make_studies(root: Path) -> tuple[Path, dict[str, int], str, str]:
    """Phantom scans in a MONAI Label studies folder, with JSON labels on disk for all but two scans.

    Returns the folder, the true label of every image id, the id whose label the test uploads over HTTP and the
    id that stays unlabelled.
    """
    from scripts.synthetic.phantom import generate_dataset

    datalist = generate_dataset(root / "phantoms", n_subjects=N_SUBJECTS, seed=11, pd_fraction=0.5, split=(1, 0, 0))
    studies = root / "studies"
    studies.mkdir()
    truth = {}
    for entry in json.loads(datalist.read_text())["training"]:
        src = datalist.parent / entry["image"]
        image_id = src.name[: -len(".nii.gz")]
        shutil.copy(src, studies / src.name)
        truth[image_id] = int(entry["label"])
    hc = sorted(i for i, lab in truth.items() if lab == 0)
    pd_ = sorted(i for i, lab in truth.items() if lab == 1)
    assert len(hc) >= 3 and len(pd_) >= 3, truth
    unlabelled = hc[-1] if len(hc) > len(pd_) else pd_[-1]
    uploaded = pd_[0]
    spellings = {0: ["HC", 0, "hc"], 1: ["PD", 1, "pd"]}
    for n, image_id in enumerate(sorted(truth)):
        if image_id not in (uploaded, unlabelled):
            write_label_file(studies / "labels" / "final" / f"{image_id}.json", spellings[truth[image_id]][n % 3])
    return studies, truth, uploaded, unlabelled


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its training subprocesses (its own process group), by id."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


# -------------------------------------------------------------------------------------------- in-process checks
def test_label_file_errors_name_the_file_and_the_expected_format(tmp_path):
    good = write_label_file(tmp_path / "a.json", "PD")
    assert read_label_file(good) == "PD"
    cases = {
        "missing.json": (None, "not found"),
        "seg.nii.gz": (b"\x1f\x8b", "not a .json file"),
        "broken.json": (b"{label: PD", "not valid JSON"),
        "nokey.json": (b'{"class": "PD"}', "no 'label' key"),
        "list.json": (b'["PD"]', "no 'label' key"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(LabelFileError, match=message) as err:
            read_label_file(tmp_path / name)
        assert name in str(err.value) and '{"label": "PD"}' in str(err.value)
    with pytest.raises(LabelFileError, match="must end in .json"):
        write_label_file(tmp_path / "x.txt", 1)


def test_bundle_is_found_locally_in_the_documented_order(tmp_path):
    assert resolve_bundle_path(APP_SRC, {}) == str(REPO)  # the app inside the repository serves the repository
    app = tmp_path / "app"
    linked = _copy_bundle(app / "model" / MODEL)
    assert resolve_bundle_path(app, {}) == str(linked)
    other = _copy_bundle(tmp_path / "elsewhere")
    assert resolve_bundle_path(app, {"bundle_path": str(other)}) == str(other)
    (other / "configs" / "distill.json").unlink()
    with pytest.raises(BundleNotFoundError, match="configs/distill.json"):
        resolve_bundle_path(app, {"bundle_path": str(other)})


def test_json_labels_found_on_disk_are_registered_through_the_datastore_api(tmp_path):
    for name in ("s1.nii.gz", "s2.nii.gz", "s3.nii.gz", "s4.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    labels = tmp_path / "labels" / "final"
    write_label_file(labels / "s1.json", "PD")
    write_label_file(labels / "s3.json", 0)
    write_label_file(labels / "orphan.json", 0)  # no image: ignored
    store = LocalDatastore(str(tmp_path), extensions=("*.nii.gz", "*.nii"))
    assert store.datalist() == []  # MONAI Label's local datastore alone does not see JSON label files
    store.save_label("s4", str(write_label_file(tmp_path / "upload" / "s4.json", "HC")), "final", {})
    assert sorted(register_label_files(store, labels)) == ["s1", "s3"]
    pairs = {Path(d["image"]).name: Path(d["label"]).name for d in store.datalist()}
    assert pairs == {"s1.nii.gz": "s1.json", "s3.nii.gz": "s3.json", "s4.nii.gz": "s4.json"}
    assert read_label_file(labels / "s1.json") == "PD"  # registered in place, unchanged
    assert register_label_files(store, labels) == []  # already registered
    assert sorted(store.list_images()) == ["s1", "s2", "s3", "s4"]  # the datastore's own JSON file is not an image
    reopened = LocalDatastore(str(tmp_path), extensions=("*.nii.gz", "*.nii"))
    assert len(reopened.datalist()) == 3  # kept in the datastore's index


class _FakeDatastore:
    def __init__(self, items):
        self.items = items

    def datalist(self):
        return self.items


def test_train_datalist_turns_label_files_into_classes_and_rejects_bad_ones(tmp_path):
    bundle = _copy_bundle(tmp_path / "bundle")
    task = DistillTrainTask(str(bundle), {})
    assert task.is_valid()
    images = []
    for i in range(4):
        images.append(tmp_path / f"sub-{i:04d}_ses-01.nii.gz")
        images[-1].write_bytes(b"")
    labels = ["PD", "hc", 1, "0"]
    items = [
        {"image": str(img), "label": str(write_label_file(tmp_path / "labels" / f"{i}.json", lab))}
        for i, (img, lab) in enumerate(zip(images, labels))
    ]
    out = task._fetch_datalist({"model": MODEL}, _FakeDatastore(items))
    assert [(e["image"], e["label"]) for e in out] == [(str(img), y) for img, y in zip(images, [1, 0, 1, 0])]

    bad = str(write_label_file(tmp_path / "labels" / "bad.json", "maybe"))
    with pytest.raises(ValueError, match=r"bad\.json.*label must be 0/HC or 1/PD, got 'maybe'"):
        task._fetch_datalist({}, _FakeDatastore([*items, {"image": str(images[0]), "label": bad}]))
    one_class = [it for it, y in zip(items, [1, 0, 1, 0]) if y == 1]
    with pytest.raises(TrainRequestError, match="0 HC and 2 PD"):
        task._fetch_datalist({}, _FakeDatastore(one_class))
    with pytest.raises(TrainRequestError, match="val_split must be a fraction"):
        task._partition_datalist(out, {"val_split": 0})
    good = {"max_epochs": 2, "batch_size": 2, "learning_rate": 1e-4}
    updated = task._update_overrides({"displayable_configs": good})
    assert updated["progress_bar"] is False and updated["synthetic_data"] is False
    for key, value, message in (
        ("batch_size", 1, "batch_size must be an int >= 2"),
        ("max_epochs", 1.5, "max_epochs must be an int >= 1"),
        ("learning_rate", "fast", "learning_rate must be a number > 0"),
    ):
        with pytest.raises(TrainRequestError, match=message):
            task._update_overrides({"displayable_configs": {**good, key: value}})


def test_training_config_is_read_from_the_bundle_folder_whatever_the_working_directory(tmp_path, monkeypatch):
    bundle = _copy_bundle(tmp_path / "bundle")
    for cwd in (REPO, tmp_path):  # the repository (other configs) and a folder without configs
        monkeypatch.chdir(cwd)
        task = DistillTrainTask(str(bundle), {})
        assert task.is_valid()
        assert "%configs/" not in json.dumps(task.bundle_config.config)  # every macro expanded
        assert task.bundle_config.get_parsed_content("spatial_size") == GRID
        options = task.config()
        assert (options["max_epochs"], options["batch_size"]) == (15, 16)  # distill.json's displayable_configs
        assert options["learning_rate"] == pytest.approx(LEARNING_RATE)  # the copy's, through its macro
        assert options["multi_gpu"] is True  # MONAI Label's default: torchrun with configs/multi_gpu.json
    assert task.const.multi_gpu_configs() == ["multi_gpu.json"] and (bundle / "configs" / "multi_gpu.json").is_file()


# ------------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    bundle = _copy_bundle(root / "bundle")
    _save_fresh_checkpoints(bundle)
    studies, truth, uploaded, unlabelled = _make_studies(root)
    app = root / "app"
    shutil.copytree(APP_SRC, app, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))

    port = _free_port()
    cli = Path(sys.executable).with_name("monailabel")
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "monailabel.main"]
    cmd += ["start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--conf", "models", MODEL, "--conf", "bundle_path", str(bundle)]
    # as in an activated environment: the `monailabel` launcher runs `python` from PATH
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update({"VIRTUAL_ENV": sys.prefix, "PYTHONUNBUFFERED": "1"})
    log_path = root / "server.log"
    log = open(log_path, "w")
    elsewhere = root / "elsewhere"  # not the repository root: nothing there resolves the bundle's macros
    elsewhere.mkdir()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=elsewhere, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def log_tail(n: int = 60) -> str:
        log.flush()
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-n:])

    try:
        deadline, started = time.monotonic() + START_TIMEOUT_S, time.monotonic()
        info = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{log_tail()}")
            try:
                r = httpx.get(f"{base}/info/", timeout=5)
                if r.status_code == 200:
                    info = r.json()
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        if info is None:
            pytest.fail(f"server did not answer /info/ within {START_TIMEOUT_S} s:\n{log_tail()}")
        print(f"server up in {time.monotonic() - started:.1f} s")
        yield {
            "base": base,
            "info": info,
            "bundle": bundle,
            "studies": studies,
            "truth": truth,
            "uploaded": uploaded,
            "unlabelled": unlabelled,
            "log_path": log_path,
            "log_tail": log_tail,
        }
    finally:
        _stop(proc)
        log.close()


def test_info_lists_the_student_as_a_2d_classifier_and_the_trainer(server):
    info = server["info"]
    model = info["models"][MODEL]
    assert model["type"] == "classification"
    assert model["dimension"] == 2
    assert model["labels"] == {"hc": 0, "pd": 1}
    assert model["config"]["model_filename"] == ["model.pt"]  # the teacher is not offered for inference
    assert MODEL in info["trainers"]
    options = info["trainers"][MODEL]["config"]
    assert "teacher.pt" not in options["model_filename"]
    assert (options["max_epochs"], options["batch_size"]) == (15, 16)
    assert options["learning_rate"] == pytest.approx(LEARNING_RATE)
    assert options["multi_gpu"] is True
    assert "sam2" not in json.dumps(info["models"]).lower()


def test_uploaded_label_is_stored_as_the_final_label(server):
    base, image_id = server["base"], server["uploaded"]
    r = httpx.put(
        f"{base}/datastore/label",
        params={"image": image_id, "tag": "final"},
        files={"label": ("label.json", b'{"label": "PD"}', "application/json")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    stored = server["studies"] / "labels" / "final" / f"{image_id}.json"
    assert read_label_file(stored) == "PD"
    listing = httpx.get(f"{base}/datastore/", params={"output": "all"}, timeout=30).json()
    labelled = {k for k, v in listing["objects"].items() if "final" in v.get("labels", {})}
    assert labelled == set(server["truth"]) - {server["unlabelled"]}


def _infer(server, image_id: str) -> dict:
    url, form = f"{server['base']}/infer/{MODEL}", {"params": json.dumps({"device": "cpu"})}
    r = httpx.post(url, params={"image": image_id}, data=form, timeout=120)
    assert r.status_code == 200, f"{r.status_code} {r.text}\n{server['log_tail']()}"
    return r.json()


def _pd_score(result: dict) -> float:
    prediction = {p["label"]: p for p in result["prediction"]}
    assert set(prediction) == {"hc", "pd"} and prediction["pd"]["idx"] == 1
    assert prediction["hc"]["score"] + prediction["pd"]["score"] == pytest.approx(1.0, abs=1e-5)
    return prediction["pd"]["score"]


def test_infer_returns_the_students_pd_probability(server):
    image_id = server["unlabelled"]
    score = _pd_score(_infer(server, image_id))
    expected = _expected_pd_probability(server["bundle"], server["studies"] / f"{image_id}.nii.gz")
    assert score == pytest.approx(expected, abs=1e-4)


def _train(server, params: dict) -> tuple[dict, str]:
    """Submit a training request and wait (bounded) for it to end; returns the task and its last output lines."""
    r = httpx.post(f"{server['base']}/train/{MODEL}", json=params, timeout=30)
    assert r.status_code == 200, r.text
    task_id = r.json()["id"]
    deadline, task = time.monotonic() + TRAIN_TIMEOUT_S, {}
    while time.monotonic() < deadline:
        task = httpx.get(f"{server['base']}/train/", timeout=10).json()
        if task.get("id") == task_id and task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    return task, "\n".join(task.get("details", []))


TRAIN_PARAMS = {"max_epochs": 1, "batch_size": 3, "val_split": 0.25, "device": "cpu"}  # learning_rate: default


def test_train_distils_on_datastore_labels_and_updates_the_served_student(server):
    bundle = server["bundle"]
    student = bundle / "models" / "model.pt"
    before = _sha256(student)
    task, details = _train(server, TRAIN_PARAMS)
    assert task.get("status") == "DONE", f"training ended as {task}:\n{details}\n{server['log_tail']()}"

    log = server["log_path"].read_text(errors="replace")
    n_pd = sum(server["truth"].values()) - (server["truth"][server["unlabelled"]] == 1)
    n_hc = len(server["truth"]) - 1 - n_pd
    assert f"Labelled scans in the datastore: {len(server['truth']) - 1} ({n_hc} HC, {n_pd} PD)" in log
    options = f"'displayable_configs': {{'max_epochs': 1, 'batch_size': 3, 'learning_rate': {LEARNING_RATE}}}"
    assert options in log and "'train#trainer#max_epochs': 1" in log
    runs = sorted((bundle / "eval").glob("distill-*"))
    assert runs and (runs[-1] / "validation" / "metrics.csv").is_file()
    assert not (bundle / "data").exists()  # no synthetic set generated: the datastore gave the data
    assert _sha256(student) != before, "training did not publish a new models/model.pt"

    # the server reloads the new checkpoint without a restart
    image_id = server["unlabelled"]
    score = _pd_score(_infer(server, image_id))
    expected = _expected_pd_probability(bundle, server["studies"] / f"{image_id}.nii.gz")
    assert score == pytest.approx(expected, abs=1e-4)


def test_train_reports_a_bad_label_placed_on_disk_while_the_server_runs(server):
    label = server["studies"] / "labels" / "final" / f"{server['unlabelled']}.json"
    write_label_file(label, "maybe")
    try:
        task, details = _train(server, TRAIN_PARAMS)
    finally:
        label.unlink()
    assert task.get("status") == "ERROR", f"training ended as {task}:\n{details}"
    assert f"{label.name}, entry 0" in details and "label must be 0/HC or 1/PD, got 'maybe'" in details, details


def test_train_reports_a_bad_option_value(server):
    task, details = _train(server, {**TRAIN_PARAMS, "batch_size": 1})
    assert task.get("status") == "ERROR", f"training ended as {task}:\n{details}"
    assert "batch_size must be an int >= 2" in details, details


def test_pretrained_false_trains_from_scratch_and_true_loads_the_student_strictly(tmp_path):
    bundle = _copy_bundle(tmp_path / "bundle")
    task = DistillTrainTask(str(bundle), {})
    student = bundle / "models" / "model.pt"
    student.write_bytes(b"")
    handlers: list = []
    task._load_checkpoint(str(student), False, handlers)
    assert handlers == []
    task._load_checkpoint(str(student), True, handlers)
    assert [(h["_target_"], h["load_path"], h["strict"]) for h in handlers] == [
        ("CheckpointLoader", str(student), True)
    ]


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks would share the one GPU")
def test_multi_gpu_training_runs_torchrun_with_the_bundle_override_and_reports_failures(tmp_path, monkeypatch):
    """MONAI Label's multi-GPU path (forced on, two ranks; on a CPU machine the override uses gloo)."""
    bundle = _copy_bundle(tmp_path / "bundle")
    _save_fresh_checkpoints(bundle)
    studies = _make_studies(tmp_path)[0]
    store = LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"))
    assert len(register_label_files(store, studies / "labels" / "final")) == N_SUBJECTS - 2
    monkeypatch.chdir(tmp_path)  # torchrun starts here, away from the bundle
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # torchrun
    monkeypatch.setenv("PYTHONPATH", str(bundle))  # as MONAI Label's task runner sets it for a training
    task = DistillTrainTask(str(bundle), {})
    request = {"model": MODEL, "max_epochs": 1, "batch_size": 3, "val_split": 0.3, "device": "cpu"}  # 3 scans per rank
    request.update({"force_multi_gpu": True, "gpus": "0,1"})
    before = _sha256(bundle / "models" / "model.pt")
    assert task(request, store) == {}
    assert "%configs/" not in (bundle / "configs" / "monailabel_train.json").read_text()  # what torchrun read
    runs = [p for p in (bundle / "eval").iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "validation" / "metrics.csv").is_file(), runs  # rank 0 alone writes
    assert _sha256(bundle / "models" / "model.pt") != before
    assert not (bundle / "data").exists()  # no synthetic set generated: the datastore gave the data

    # MONAI Label 0.8.5 would report a failed torchrun as done; the task raises instead
    with pytest.raises(TrainingFailedError, match="exit code 3"):
        task.run_multi_gpu(request, [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
