# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Reliability, in process: options that mean what they say, self-describing checkpoints, careful publishing, run
folders, input checks for messy scans and datalists, streaming predictions."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import locale
import logging
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, MNI_AFFINE, write_nifti
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scripts.checkpoints import (
    METADATA_KEY,
    DescribedModel,
    check_checkpoint,
    check_teacher,
    read_checkpoint,
    save_checkpoint,
    split_digest,
)
from scripts.data import DatalistError, build_datalist, load_datalist
from scripts.errors import InputError, MissingFileError
from scripts.handlers import PredictionSaver, PublishCheckpoint, skip_failed_scans
from scripts.networks import Student2D, Teacher3D
from scripts.options import OptionError, check_options, check_value, parse_bool
from scripts.runs import claim_run_folder
from scripts.transforms import (
    FAILED_KEY,
    WARNINGS_KEY,
    LoadScand,
    collate_with_failures,
    dicom_series_problems,
    grid_problems,
    intensity_problems,
)

CONFIGS = BUNDLE_ROOT / "configs"
STUDENT_SETTINGS = {"spatial_size": [32, 32, 32], "intensity": "minmax", "view": "axial", "slice_centre": "auto"}


@pytest.fixture(autouse=True)
def _bundle_root_cwd(monkeypatch):
    monkeypatch.chdir(BUNDLE_ROOT)  # the training configs include blocks of configs/inference.json by relative path


def _parser(*names: str, **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in names])
    parser.update(override)
    parser.parse()
    return parser


# --------------------------------------------------------------------------------------------------------------------
# 1. options
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [("false", False), ("False", False), ("FALSE", False), (" false ", False)]
    + [("true", True), ("TRUE", True), ("True", True), (True, True), (False, False)],
)
def test_booleans_read_true_and_false_in_any_case(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("value", ["no", "0", 0, 1, None, "", "yes"])
def test_other_boolean_spellings_are_refused_with_one_line(value):
    with pytest.raises(OptionError, match=r"^option --kd_enabled expects true or false, got .*\.$"):
        check_value("kd_enabled", value)


def test_overrides_are_normalised_before_the_config_reads_them(tmp_path):
    parser = _parser("distill.json", bundle_root=str(tmp_path), kd_enabled="false", progress_bar="FALSE")
    check_options(parser)
    assert parser["kd_enabled"] is False and parser["progress_bar"] is False
    assert parser.get_parsed_content("checkpoint_name") == "model_nokd.pt"  # no distillation, not model.pt
    assert parser.get_parsed_content("teacher") is None
    assert parser.get_parsed_content("run_name").startswith("nokd-")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("max_epochs", "abc", "option --max_epochs expects an integer >= 1, got 'abc'."),
        ("projection", "nonsense", "option --projection expects one of single_slice"),
        ("projection", "dynamic", "(did you mean 'dynamic_image'?)"),
        ("spatial_size", 64, "option --spatial_size expects three integers >= 16, as in [64,64,64], got 64"),
        ("spatial_size", [64, 64], "got [64, 64]"),
        ("batch_size", 0, "option --batch_size expects an integer >= 1, got 0."),
        ("learning_rate", 0, "option --learning_rate expects a number > 0, got 0."),
        ("cache_rate", 1.5, "expects a number >= 0 and <= 1, got 1.5."),
        ("max_epochs", 2.5, "expects an integer >= 1, got 2.5."),
    ],
)
def test_bad_option_values_are_refused_with_one_line(tmp_path, name, value, expected):
    parser = _parser("train_teacher.json" if name != "projection" else "distill.json", **{name: value})
    with pytest.raises(OptionError) as err:
        check_options(parser)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"num_slices": 4}, "projection settings: num_slices must be odd"),
        ({"slice_centre": "middle"}, "projection settings: centre must be"),
        ({"projection": "entropy_views", "spatial_size": [64, 64, 32]}, "needs a cubic grid; --spatial_size is [64"),
    ],
)
def test_projection_settings_are_checked_together(override, expected):
    with pytest.raises(OptionError) as err:
        check_options(_parser("distill.json", **override))
    assert expected in str(err.value)


def test_unknown_override_is_refused_with_the_closest_valid_name():
    with pytest.raises(OptionError, match=r"^--max_epoch is not an option of this bundle; did you mean --max_epochs\?"):
        check_options(_parser("train_teacher.json", max_epoch=0))
    # MONAI's own ids and nested overrides (MONAI Label, experiment tracking) are not options to check
    check_options(_parser("train_teacher.json", **{"train#trainer#max_epochs": 2, "validate#dataset#data": []}))


def test_an_option_this_config_does_not_read_is_reported(caplog):
    with caplog.at_level(logging.WARNING):
        check_options(_parser("train_teacher.json", kd_enabled=False))
    assert "option --kd_enabled is not used by this config" in caplog.text


# --------------------------------------------------------------------------------------------------------------------
# 2. self-describing checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _student(projection="joint_fusion_slices", seed=0, **kwargs) -> Student2D:
    torch.manual_seed(seed)
    return Student2D(projection=projection, **kwargs)


def _student_checkpoint(path: Path, projection="early_fusion_slices", score=None, split="split-a", seed=0) -> Path:
    settings = {
        **STUDENT_SETTINGS,
        "projection": projection,
        "num_slices": 3,
        "gap": 0,
        "student_backbone": "resnet18",
        "num_classes": 2,
    }
    model = DescribedModel(_student(projection, seed), settings, kind="student")
    if score is not None:  # a checkpoint selected on a validation split with this score
        model.validator = SimpleNamespace(
            state=SimpleNamespace(key_metric_name="val_f1_macro", metrics={"val_f1_macro": score}, epoch=3)
        )
        model._split = (split, 6)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def test_a_checkpoint_is_a_flat_state_dict_that_describes_itself(tmp_path):
    path = _student_checkpoint(tmp_path / "model.pt", score=0.8)
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and "head.weight" in state
    info = state._metadata[METADATA_KEY]
    assert info["network"] == {
        "_target_": "scripts.networks.Student2D",
        "backbone": "resnet18",
        "projection": "early_fusion_slices",
        "in_channels": 3,
        "fusion": "early",
        "num_classes": 2,
    }
    assert info["settings"]["projection"] == "early_fusion_slices" and info["settings"]["spatial_size"] == [32] * 3
    assert (
        info["class_names"] == ["HC", "PD"]
        and info["bundle_version"] == json.loads((CONFIGS / "metadata.json").read_text(encoding="utf-8"))["version"]
    )
    assert info["validation"] == {"metric": "val_f1_macro", "score": 0.8, "epoch": 3, "split": "split-a", "scans": 6}
    # every loader of the bundle's tooling reads it as plain weights
    from monai.handlers import CheckpointLoader
    from monai.networks.utils import copy_model_state  # what ckpt_export uses

    for load in (
        lambda net: net.load_state_dict(torch.load(path, weights_only=True), strict=True),
        lambda net: CheckpointLoader(load_path=str(path), load_dict={"model": net})(SimpleNamespace(state=None)),
        lambda net: copy_model_state(net, torch.load(path, weights_only=True)),
    ):
        fresh = _student("early_fusion_slices", seed=1)
        try:
            load(fresh)
        except AttributeError:  # CheckpointLoader reads engine.state.max_epochs; give it an engine-like state
            CheckpointLoader(load_path=str(path), load_dict={"model": fresh})(
                SimpleNamespace(state=SimpleNamespace(max_epochs=None, epoch=0))
            )
        assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize(
    ("trained", "served"),
    [
        ("early_fusion_slices", "dynamic_image_views"),
        ("early_fusion_slices", "entropy_views"),
        ("single_slice", "entropy"),
    ],
)
def test_a_student_is_served_with_its_own_projection_and_grid(tmp_path, trained, served):
    model = _student_checkpoint(tmp_path / "models" / "model.pt", projection=trained)
    # the same architecture loads strictly into the other projection's network: only the record tells them apart
    _student(served).load_state_dict(torch.load(model, weights_only=True), strict=True)
    parser = _parser("inference.json", bundle_root=str(tmp_path), projection=served)
    with pytest.raises(OptionError) as err:
        check_checkpoint(model, apply_settings=True, parser=parser)
    assert f"was trained with projection='{trained}', this run has projection='{served}': drop --projection" in str(
        err.value
    )
    # left at the defaults, the settings come from the checkpoint
    parser = _parser("inference.json", bundle_root=str(tmp_path))
    check_checkpoint(model, apply_settings=True, parser=parser)
    assert parser["projection"] == trained and parser["spatial_size"] == [32, 32, 32]
    assert parser.get_parsed_content("projection_transform").spec.name == trained
    # given explicitly with another value: refused, naming both
    parser = _parser("inference.json", bundle_root=str(tmp_path), spatial_size=[48, 48, 48])
    with pytest.raises(OptionError, match=r"spatial_size=\[32, 32, 32\], this run has spatial_size=\[48, 48, 48\]"):
        check_checkpoint(model, apply_settings=True, parser=parser)


def test_a_wrong_missing_or_damaged_checkpoint_is_one_line(tmp_path):
    parser = _parser("inference.json", bundle_root=str(tmp_path))
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(Teacher3D(), teacher, {"spatial_size": [64] * 3, "teacher_backbone": "resnet10"}, kind="teacher")
    with pytest.raises(InputError, match=r"holds a Teacher3D \(teacher\); this config serves a Student2D"):
        check_checkpoint(teacher, parser=parser)
    legacy = tmp_path / "legacy.pt"  # a plain state dict of another student (no record): the weights decide
    torch.save(_student("entropy").state_dict(), legacy)
    with pytest.raises(InputError, match=r"legacy.pt does not fit network_def .*: (Missing|Unexpected|size mismatch)"):
        check_checkpoint(legacy, parser=parser)
    with pytest.raises(MissingFileError, match=r"gone.pt not found. Train it first: python -m monai.bundle run"):
        check_checkpoint(tmp_path / "gone.pt", parser=parser)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(_student_checkpoint(tmp_path / "ok.pt").read_bytes()[:5000])
    with pytest.raises(InputError, match=r"damaged.pt could not be read \(.*\); the file is damaged"):
        check_checkpoint(damaged, parser=parser)
    with pytest.raises(InputError, match=r"checkpoint .* is a folder; give the checkpoint file"):
        check_checkpoint(tmp_path, parser=parser)
    other = tmp_path / "datalist.json"  # another kind of file: no advice about torch.load's arguments
    other.write_text('{"training": []}')
    with pytest.raises(InputError, match=r"datalist.json could not be read \(UnpicklingError: not a file torch.save"):
        check_checkpoint(other, parser=parser)


def test_a_teacher_trained_on_another_grid_is_refused_for_distillation(tmp_path):
    teacher = tmp_path / "models" / "teacher.pt"
    settings = {"spatial_size": [32, 32, 32], "intensity": "minmax", "teacher_backbone": "resnet10", "num_classes": 2}
    save_checkpoint(Teacher3D(), teacher, settings, kind="teacher")
    with pytest.raises(OptionError, match=r"teacher checkpoint .* trained with spatial_size=\[32, 32, 32\], this run"):
        check_teacher(_parser("distill.json", bundle_root=str(tmp_path)))
    assert check_teacher(_parser("distill.json", bundle_root=str(tmp_path), spatial_size=[32, 32, 32])) is not None
    assert check_teacher(_parser("distill.json", bundle_root=str(tmp_path), kd_enabled=False)) is None


def test_the_teacher_cache_is_refused_when_a_random_transform_changes_the_teachers_input(tmp_path):
    flip = {"_target_": "RandFlipd", "keys": "image", "prob": 0.5, "spatial_axis": 0}

    def parser(order: str, **override):
        p = _parser("distill.json", bundle_root=str(tmp_path), **override)
        p["flip"] = flip
        p["train_transforms"] = f"$@volume_transforms + [{order}, @projection_transform]"
        return p

    with pytest.raises(OptionError, match=r"random transform\(s\) RandFlipd: the teacher's outputs cached .* stale"):
        check_teacher(parser("@flip, @keep_volume"))
    # the same flip after the teacher's copy only changes the student's input: the cache stays valid
    with pytest.raises(MissingFileError, match="teacher checkpoint .* not found"):
        check_teacher(parser("@keep_volume, @flip"))
    with pytest.raises(MissingFileError, match="teacher checkpoint .* not found"):
        check_teacher(parser("@flip, @keep_volume", cache_teacher_outputs=False))


def test_a_run_is_not_resumed_with_other_settings(tmp_path):
    path = _student_checkpoint(tmp_path / "state.pt", projection="early_fusion_slices")
    other = DescribedModel(_student("dynamic_image_views"), {**STUDENT_SETTINGS, "projection": "dynamic_image_views"})
    with pytest.raises(InputError, match="saved with projection='early_fusion_slices', this run has projection="):
        other.load_state_dict(torch.load(path, weights_only=True))


# --------------------------------------------------------------------------------------------------------------------
# 3. publishing and run folders
# --------------------------------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_publishing_keeps_a_better_model_and_the_previous_file(tmp_path, caplog):
    published = _student_checkpoint(tmp_path / "models" / "model.pt", score=0.9, seed=1)
    good = _digest(published)
    worse = _student_checkpoint(tmp_path / "eval" / "worse" / "model.pt", score=0.4, seed=2)
    with caplog.at_level(logging.WARNING):
        assert not PublishCheckpoint(worse, published).publish()
    assert _digest(published) == good and "models/model.pt kept: it scored val_f1_macro 0.9000" in caplog.text
    # asked explicitly, it is replaced and the previous file is kept
    assert PublishCheckpoint(worse, published, overwrite="True").publish()
    assert _digest(published) == _digest(worse) and _digest(tmp_path / "models" / "previous" / "model.pt") == good
    # a score on another validation split is not comparable: the new run is published
    other = _student_checkpoint(tmp_path / "eval" / "other" / "model.pt", score=0.1, split="split-b", seed=3)
    assert PublishCheckpoint(other, published).publish() and _digest(published) == _digest(other)
    # a run that wrote no checkpoint says so and leaves the published model alone
    before = _digest(published)
    with caplog.at_level(logging.WARNING):
        PublishCheckpoint(tmp_path / "eval" / "none" / "model.pt", published)(SimpleNamespace(logger=None))
    assert "training finished without a checkpoint" in caplog.text and _digest(published) == before


def _publish_many(args):
    source, destination, times = args
    for _ in range(times):
        PublishCheckpoint(source, destination, overwrite=True).publish()
    return True


def test_concurrent_publishes_never_mix_or_lose_files(tmp_path):
    sources = []
    for i in range(6):
        sources.append(tmp_path / f"run{i}" / "model.pt")
        sources[-1].parent.mkdir()
        torch.save({"w": torch.full((300_000,), float(i))}, sources[-1])
    destination = tmp_path / "models" / "model.pt"
    with multiprocessing.get_context("fork").Pool(6) as pool:
        assert all(pool.map(_publish_many, [(s, destination, 4) for s in sources]))
    assert _digest(destination) in {_digest(s) for s in sources}
    assert sorted(p.name for p in destination.parent.iterdir()) == ["model.pt", "previous"]


def test_a_run_folder_is_never_reused(tmp_path):
    run = tmp_path / "eval" / "teacher"
    claim_run_folder(run)
    assert json.loads((run / "run.json").read_text(encoding="utf-8"))["runs"][0]["kind"] == "training"
    (run / "teacher.pt").write_bytes(b"x")
    with pytest.raises(OptionError, match=r"run folder .*teacher already holds a run; choose another --run_name"):
        claim_run_folder(run)
    with pytest.raises(OptionError, match=r"holds no completed epoch to continue from"):
        claim_run_folder(run, resume="true")
    with pytest.raises(OptionError, match=r"run folder .*other not found; pass the --run_name .*runs in .*: teacher\)"):
        claim_run_folder(tmp_path / "eval" / "other", resume=True)
    (run / "resume").mkdir()
    (run / "resume" / "state_checkpoint_2.pt").write_bytes(b"x")
    claim_run_folder(run, resume=True)
    assert [r["resumed"] for r in json.loads((run / "run.json").read_text(encoding="utf-8"))["runs"]] == [False, True]


# --------------------------------------------------------------------------------------------------------------------
# 5. input checks
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "affine", "problem"),
    [
        ((91, 109, 91), MNI_AFFINE, None),
        ((182, 218, 182), np.diag([-1.0, 1.0, 1.0, 1.0]), None),  # MNI at 1 mm
        ((79, 95, 68), np.diag([2.0, 2.0, 2.0, 1.0]), None),  # SPM's bounding box
        ((256, 256, 30), np.diag([1.0, 1.0, 1.0, 1.0]), "field of view of 256x256x30 mm"),
        ((19, 22, 19), np.diag([10.0, 10.0, 10.0, 1.0]), "voxels of 10x10x10 mm"),
        ((91, 109, 91), np.eye(4), "field of view of 91x109x91 mm"),  # no physical spacing
        ((91, 109, 91), np.diag([0.0, 2.0, 2.0, 1.0]), "no valid voxel-to-world affine"),
    ],
)
def test_grid_check(shape, affine, problem):
    found = grid_problems(shape, affine)
    assert found == [] if problem is None else (len(found) == 1 and problem in found[0])


def test_grid_check_refuses_an_oblique_scan():
    c, s = np.cos(0.4), np.sin(0.4)
    oblique = np.array([[2 * c, -2 * s, 0, 0], [2 * s, 2 * c, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    assert "oblique" in grid_problems((91, 109, 91), oblique)[0]


def test_intensity_check():
    assert "empty (all voxels 0)" in intensity_problems(torch.zeros(1, 8, 8, 8))[0]
    assert "constant (all voxels 7)" in intensity_problems(torch.full((1, 8, 8, 8), 7.0))[0]
    spike = torch.zeros(1, 20, 20, 20)
    spike[0, 3, 4, 5] = 10.0
    assert "nearly empty" in intensity_problems(spike)[0]
    assert intensity_problems(torch.rand(1, 20, 20, 20, generator=torch.Generator().manual_seed(0))) == []


def _mni_volume(seed=0) -> np.ndarray:
    vol = np.random.default_rng(seed).random((91, 109, 91)).astype(np.float32)
    return vol


def test_a_nonstandard_scan_is_refused_by_default_and_flagged_when_allowed(tmp_path):
    slab = write_nifti(tmp_path / "slab.nii.gz", np.random.default_rng(0).random((64, 64, 20)), np.eye(4))
    with pytest.raises(InputError, match=r"slab.nii.gz: grid 64x64x20 .*--allow_nonstandard_input true"):
        LoadScand("image")({"image": str(slab)})
    out = LoadScand("image", allow_nonstandard=True)({"image": str(slab)})
    assert tuple(out["image"].shape) == (1, 64, 64, 20) and "field of view" in out[WARNINGS_KEY]
    good = write_nifti(tmp_path / "good.nii.gz", _mni_volume())
    assert LoadScand("image")({"image": str(good)})[WARNINGS_KEY] == ""


def test_a_4d_image_is_reported_with_its_real_shape(tmp_path):
    path = write_nifti(tmp_path / "dynamic.nii.gz", np.random.default_rng(0).random((91, 109, 91, 3)))
    with pytest.raises(InputError, match=r"a 4D image of shape \(91, 109, 91, 3\) \(3 volumes\)"):
        LoadScand("image")({"image": str(path)})
    out = LoadScand("image", allow_nonstandard=True)({"image": str(path)})
    assert tuple(out["image"].shape) == (1, 91, 109, 91) and "only the first of 3 volumes" in out[WARNINGS_KEY]


def _dicom_series(folder: Path, n_slices: int = 12, modality: str = "NM") -> Path:
    """A DICOM series written slice by slice with ITK, recording each slice's position (ImagePositionPatient).

    GDCM's writer switches the process locale to C; the locale is restored so that later tests are unaffected.
    """
    itk = pytest.importorskip("itk")
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(itk, folder, n_slices, modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(itk, folder: Path, n_slices: int, modality: str = "NM") -> Path:
    folder.mkdir(parents=True)
    volume = (np.random.default_rng(0).random((n_slices, 20, 16)) * 1000).astype(np.int16)  # z, y, x
    for z in range(n_slices):
        image = itk.image_from_array(volume[z].copy())
        image.SetSpacing([2.0, 2.0])
        meta = image.GetMetaDataDictionary()
        tags = {
            "0008|0060": modality,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1",
            "0020|0013": str(z + 1),
            "0020|0032": f"0\\0\\{2.0 * z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }
        for key, value in tags.items():
            meta[key] = value
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        writer = itk.ImageFileWriter[type(image)].New(
            Input=image, FileName=str(folder / f"slice{z:03d}.dcm"), ImageIO=io, UseInputMetaDataDictionary=True
        )
        writer.Update()
    return folder


def test_a_dicom_series_with_unreadable_or_missing_slices_is_reported(tmp_path):
    folder = _dicom_series(tmp_path / "series")
    assert dicom_series_problems(folder, 12) == []
    (folder / "slice005.dcm").unlink()
    assert dicom_series_problems(folder, 11) == [
        "about 1 slice(s) missing (1 gap(s), the largest 4 mm; slice spacing 2 mm)"
    ]
    (folder / "slice008.dcm").write_bytes(b"not a slice")
    problems = dicom_series_problems(folder, 10)
    assert problems[0] == "1 of 11 slice files could not be read (slice008.dcm); the volume has 10 slices"
    # through the loader: refused by default, used (and flagged) when allowed
    with pytest.raises(InputError, match=r"series: 1 of 11 slice files could not be read .* about 2 slice\(s\) miss"):
        LoadScand("image")({"image": str(folder)})
    out = LoadScand("image", allow_nonstandard=True)({"image": str(folder)})
    assert out["image"].shape[-1] == 10 and "could not be read" in out[WARNINGS_KEY]


# --------------------------------------------------------------------------------------------------------------------
# 5. datalists
# --------------------------------------------------------------------------------------------------------------------
def _datalist(tmp_path: Path, n: int = 8) -> dict:
    images = tmp_path / "images"
    for i in range(n):
        write_nifti(images / f"sub-{i:02d}_ses-01.nii.gz", np.zeros((8, 8, 8)))

    def entry(i: int) -> dict:
        return {"image": f"images/sub-{i:02d}_ses-01.nii.gz", "label": i % 2, "subject": f"sub-{i:02d}"}

    return {"training": [entry(i) for i in range(4)], "validation": [entry(4), entry(5)], "test": [entry(6), entry(7)]}


def _write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_datalist_with_duplicates_leakage_or_an_unusable_split_is_refused(tmp_path, caplog):
    content = _datalist(tmp_path)
    assert len(load_datalist(_write(tmp_path, content), "training")) == 4
    duplicate = json.loads(json.dumps(content))
    duplicate["training"].append(dict(duplicate["training"][0]))
    with pytest.raises(DatalistError, match=r"sub-00_ses-01.nii.gz is listed twice \('training' entry 0 and 'tra"):
        load_datalist(_write(tmp_path, duplicate), "training")
    leak = json.loads(json.dumps(content))
    leak["test"][0]["subject"] = "sub-01"
    with pytest.raises(DatalistError, match=r"subject sub-01 has scans in both 'training' and 'test'"):
        load_datalist(_write(tmp_path, leak), "validation")
    empty = {**content, "validation": []}
    with pytest.raises(DatalistError, match=r"has no scans in 'validation'"):
        load_datalist(_write(tmp_path, empty), "validation")
    one_class = {**content, "training": [e for e in content["training"] if e["label"] == 1]}
    with pytest.raises(DatalistError, match=r"'training' split of .* holds only PD \(label 1\) scans"):
        load_datalist(_write(tmp_path, one_class), "training")
    one_class_test = {**content, "test": [content["test"][1]]}
    with caplog.at_level(logging.WARNING):
        load_datalist(_write(tmp_path, one_class_test), "test")
    assert "holds only PD (label 1) scans; metrics that need both classes" in caplog.text


def test_subjects_taken_from_file_names_are_reported(tmp_path, caplog):
    content = _datalist(tmp_path)
    for split in ("training", "validation", "test"):
        for e in content[split]:
            del e["subject"]
    content["training"][0]["image"] = "images/PPMI_3001_NM_Reconstructed_DaTSCAN_S117552_I341187.nii"
    nib.save(
        nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), MNI_AFFINE), str(tmp_path / content["training"][0]["image"])
    )
    content["training"][1]["image"] = "images/scan_b.nii.gz"
    write_nifti(tmp_path / "images" / "scan_b.nii.gz", np.zeros((8, 8, 8)))
    with caplog.at_level(logging.WARNING):
        entries = load_datalist(_write(tmp_path, content), "training")
    assert [e["subject"] for e in entries] == ["PPMI_3001", "scan_b", "sub-02", "sub-03"]
    assert "1 of 4 entries have no 'subject' and no sub-XXXX_/PPMI_<id>_ file name" in caplog.text


def _label_table(tmp_path: Path, text: str, names: list[str]) -> tuple[Path, Path]:
    images = tmp_path / "scans"
    for name in names:
        write_nifti(images / name, np.zeros((4, 4, 4)))
    table = tmp_path / "labels.csv"
    table.write_bytes(text.encode("utf-8"))
    return images, table


def test_label_table_from_a_spreadsheet_is_read(tmp_path):
    names = [f"PPMI_{3000 + i}_NM_S{i}.nii.gz" for i in range(10)]
    rows = "".join(f"{n} ; {'HC' if i % 2 else 'PD'} \r\n" for i, n in enumerate(names))
    images, table = _label_table(tmp_path, "\ufeffImage ; Label \r\n" + rows, names)  # BOM, spaces, ';', CRLF
    content = json.loads(build_datalist(images, table, tmp_path / "datalist.json").read_text(encoding="utf-8"))
    entries = [e for s in ("training", "validation", "test") for e in content[s]]
    assert len(entries) == 10 and {e["subject"] for e in entries} == {f"PPMI_{3000 + i}" for i in range(10)}
    for split in ("validation", "test"):
        assert {e["label"] for e in content[split]} == {0, 1}


def test_a_split_that_would_leave_a_class_out_of_validation_or_test_is_refused(tmp_path):
    names = [f"sub-{i:02d}.nii.gz" for i in range(8)]
    images, table = _label_table(
        tmp_path, "image,label\n" + "".join(f"{n},{'HC' if i == 0 else 'PD'}\n" for i, n in enumerate(names)), names
    )
    with pytest.raises(
        DatalistError, match=r"would leave no HC subject in 'validation' \(the table has 1 HC subject\)"
    ):
        build_datalist(images, table, tmp_path / "datalist.json")
    assert not (tmp_path / "datalist.json").exists()


# --------------------------------------------------------------------------------------------------------------------
# 4. predictions as they are produced
# --------------------------------------------------------------------------------------------------------------------
def test_failed_scans_are_kept_out_of_the_batch_and_given_error_rows(tmp_path):
    good = {"image": torch.zeros(1, 4, 4), "label": 0, WARNINGS_KEY: ""}
    batch = collate_with_failures([good, {"image": "/x/bad.nii.gz", FAILED_KEY: "/x/bad.nii.gz: broken."}])
    assert batch["image"].shape == (1, 1, 4, 4) and batch[FAILED_KEY] == [
        {"image": "/x/bad.nii.gz", "reason": "/x/bad.nii.gz: broken."}
    ]
    only_failures = collate_with_failures([{"image": "/x/a", FAILED_KEY: "a"}])
    engine = SimpleNamespace(state=SimpleNamespace(), _iteration=lambda e, b: pytest.fail("network run on no scan"))
    assert skip_failed_scans(engine, only_failures) == [] and engine.state.failed_scans == [
        {"image": "/x/a", "reason": "a"}
    ]

    saver = PredictionSaver(tmp_path, projection="joint_fusion_slices")
    logger = logging.getLogger("test")
    engine = SimpleNamespace(logger=logger, state=SimpleNamespace(output=[], batch={}, failed_scans=[]))
    saver._start(engine)
    engine.state.output = [{"pred": torch.tensor([0.2, 0.8])}]
    engine.state.batch = [{"image": SimpleNamespace(), WARNINGS_KEY: "voxels of 4x4x4 mm"}]
    engine.state.failed_scans = [{"image": "/x/bad.nii.gz", "reason": "/x/bad.nii.gz: broken."}]
    saver._collect(engine)
    # on disk before the run completes: an interrupted run keeps what it scored
    with (tmp_path / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["pd_probability"] == "0.8" and rows[0]["predicted_label"] == "PD"
    assert rows[0]["warnings"] == "voxels of 4x4x4 mm" and rows[0]["error"] == ""
    assert (
        rows[1]["image"] == "/x/bad.nii.gz" and rows[1]["pd_probability"] == "" and rows[1]["error"].endswith("broken.")
    )
    with pytest.raises(InputError, match=r"^1 of 2 scans could not be scored \(first: /x/bad.nii.gz: broken\)"):
        saver.raise_on_failures()


def test_prediction_saver_keeps_full_precision_scores_for_site_adaptation(tmp_path):
    """The CSV rounds P(PD) to 6 decimals, which flattens every confident HC scan to 0; the site adaptation fits
    the scores' logits, so the saver keeps each scan's score unrounded (``scores``), and a new run starts afresh."""
    saver = PredictionSaver(tmp_path, projection="joint_fusion_slices")
    engine = SimpleNamespace(logger=logging.getLogger("test"), state=SimpleNamespace(output=[], batch={}))
    saver._start(engine)
    engine.state.output = [{"pred": torch.tensor([1.0 - 2e-9, 2e-9])}, {"pred": torch.tensor([0.25, 0.75])}]
    engine.state.batch = [
        {"image": MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": f"/x/{name}.nii.gz"})}
        for name in ("hc", "pd")
    ]
    saver._collect(engine)
    assert [r["pd_probability"] for r in saver.rows] == [0.0, 0.75]
    assert set(saver.scores) == {"/x/hc.nii.gz", "/x/pd.nii.gz"}
    assert saver.scores["/x/hc.nii.gz"] == pytest.approx(2e-9, rel=1e-6) and saver.scores["/x/pd.nii.gz"] == 0.75
    saver._start(engine)
    assert saver.scores == {} and saver.rows == []


def test_split_digest_ignores_order():
    a = [{"image": "/d/a.nii", "label": 0}, {"image": "/d/b.nii", "label": 1}]
    assert split_digest(a) == split_digest(a[::-1]) != split_digest([{**a[0], "label": 1}, a[1]])


def test_read_checkpoint_gives_the_model_of_a_training_state(tmp_path):
    state = {"model": _student().state_dict(), "optimizer": {"state": {}, "param_groups": []}}
    torch.save(state, tmp_path / "state.pt")
    weights, info = read_checkpoint(tmp_path / "state.pt")
    assert "head.weight" in weights and info is None


# --------------------------------------------------------------------------------------------------------------------
# 9. every error a user can meet is in docs/troubleshooting.md
# --------------------------------------------------------------------------------------------------------------------
USER_ERRORS = {"InputError", "DatalistError", "OptionError", "MissingFileError"}


def test_every_user_error_is_explained_in_the_troubleshooting_guide():
    """The leading words of the longest literal part of each user-facing error message appear in the guide."""
    guide = " ".join((BUNDLE_ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8").replace("`", "").split())
    sources = sorted((BUNDLE_ROOT / "scripts").glob("*.py")) + [BUNDLE_ROOT / "scripts" / "synthetic" / "__init__.py"]
    missing, found = [], 0
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = node.exc if isinstance(node, ast.Raise) else None
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) in USER_ERRORS and call.args):
                continue
            parts = [
                v.value for v in ast.walk(call.args[0]) if isinstance(v, ast.Constant) and isinstance(v.value, str)
            ]
            longest = max((" ".join(p.replace("`", "").split()) for p in parts), key=len, default="")
            key = " ".join(longest.strip(" .:;,()").split()[:4]).strip(" .:;,()")
            found += 1
            if key and key not in guide:
                missing.append(f"{path.name}:{node.lineno}: {key!r}")
    assert found > 50 and not missing, missing
