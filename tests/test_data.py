# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
import json
import os

import numpy as np
import pytest
import torch
from conftest import MNI_AFFINE, config_preprocessing, write_nifti
from monai.data import list_data_collate
from scripts.data import (
    DatalistError,
    build_datalist,
    list_scans,
    load_datalist,
    main,
    split_by_subject,
    subsample_by_subject,
)
from scripts.errors import find_input_error
from scripts.transforms import IntensityNormalize


def _entries(n_hc=10, n_pd=20, visits=3):
    out = []
    for i in range(n_hc + n_pd):
        label = int(i >= n_hc)
        for v in range(visits if label else 1):
            out.append({"image": f"sub-{i:03d}_ses-{v}.nii.gz", "label": label, "subject": f"sub-{i:03d}"})
    return out


def test_split_by_subject_keeps_every_subject_in_one_split_and_stratifies():
    splits = split_by_subject(_entries(), (0.6, 0.2, 0.2), seed=1)
    subjects = {s: {e["subject"] for e in splits[s]} for s in ("training", "validation", "test")}
    assert not subjects["training"] & subjects["validation"]
    assert not subjects["training"] & subjects["test"]
    assert not subjects["validation"] & subjects["test"]
    assert sum(len(v) for v in subjects.values()) == 30
    hc = {s: len({e["subject"] for e in splits[s] if e["label"] == 0}) for s in splits}
    pd_ = {s: len({e["subject"] for e in splits[s] if e["label"] == 1}) for s in splits}
    assert (hc["training"], hc["validation"], hc["test"]) == (6, 2, 2)
    assert (pd_["training"], pd_["validation"], pd_["test"]) == (12, 4, 4)
    # all 3 visits of a PD subject travel together
    for split in splits.values():
        for e in split:
            if e["label"] == 1:
                assert sum(x["subject"] == e["subject"] for x in split) == 3


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    a = split_by_subject(_entries(), seed=5)
    assert a == split_by_subject(_entries(), seed=5)
    assert a != split_by_subject(_entries(), seed=6)


def test_split_rejects_conflicting_subject_labels_and_bad_fractions():
    entries = _entries(2, 2, 1) + [{"image": "x.nii.gz", "label": 1, "subject": "sub-000"}]
    with pytest.raises(DatalistError, match="sub-000 has scans with different labels"):
        split_by_subject(entries)
    with pytest.raises(DatalistError, match="summing to 1"):
        split_by_subject(_entries(), (0.5, 0.2, 0.2))


def _byo_folder(tmp_path, n_subjects=10):
    images = tmp_path / "scans"
    rows = ["image,label,subject,age"]
    for i in range(n_subjects):
        label = "PD" if i % 2 else "HC"
        visits = 2 if i == 1 else 1  # subject 1 has two visits: they must not leak across splits
        for v in range(visits):
            name = f"scan_{i}_{v}.nii.gz"
            write_nifti(images / name, np.zeros((4, 4, 4)))
            rows.append(f"{name},{label},patient{i},{60 + i}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return images, labels


def test_build_datalist_from_folder_and_csv(tmp_path):
    images, labels = _byo_folder(tmp_path)
    out = build_datalist(images, labels, tmp_path / "lists" / "datalist.json", seed=0)
    content = json.loads(out.read_text())
    where = {e["subject"]: s for s in ("training", "validation", "test") for e in content[s]}
    visits = [s for s in ("training", "validation", "test") for e in content[s] if e["subject"] == "patient1"]
    assert len(visits) == 2 and len(set(visits)) == 1
    assert len(where) == 10
    entry = load_datalist(out, "training", fields=None)[0]  # every column kept
    assert entry["label"] in (0, 1) and entry["image"].startswith(str(tmp_path)) and entry["age"].isdigit()
    # relative paths in the file so the folder can move
    assert not content["training"][0]["image"].startswith("/")


def test_build_datalist_errors_name_the_file_and_line(tmp_path):
    images, labels = _byo_folder(tmp_path)
    labels.write_text(labels.read_text() + "missing.nii.gz,PD,p99,70\n")
    with pytest.raises(DatalistError, match=r"labels.csv, line 13: image .*missing.nii.gz not found"):
        build_datalist(images, labels, tmp_path / "d.json")
    images, labels = _byo_folder(tmp_path / "b")
    labels.write_text(labels.read_text().replace("scan_3_0.nii.gz,PD", "scan_3_0.nii.gz,maybe"))
    with pytest.raises(DatalistError, match=r"line 6: label must be 0/HC or 1/PD, got 'maybe'"):
        build_datalist(images, labels, tmp_path / "d.json")


def test_cli_refuses_to_overwrite_a_datalist(tmp_path, capsys):
    images, labels = _byo_folder(tmp_path)
    out = tmp_path / "datalist.json"
    assert main(["--images", str(images), "--labels", str(labels), "--out", str(out)]) == 0
    before = out.read_text()
    with pytest.raises(SystemExit) as err:
        main(["--images", str(images), "--labels", str(labels), "--out", str(out)])
    assert err.value.code == 2 and "already exists" in capsys.readouterr().err
    assert out.read_text() == before


def test_load_datalist_errors(tmp_path):
    with pytest.raises(DatalistError, match="not found"):
        load_datalist(tmp_path / "nope.json")
    bad = tmp_path / "d.json"
    bad.write_text(json.dumps({"training": [{"image": "gone.nii.gz", "label": 1}]}))
    with pytest.raises(DatalistError, match=r"gone.nii.gz\): image file not found"):
        load_datalist(bad)
    with pytest.raises(DatalistError, match=r"no list named 'test'; available: \['training'\]"):
        load_datalist(bad, "test")


def test_list_scans_accepts_a_file_a_folder_and_a_datalist(tmp_path):
    a = write_nifti(tmp_path / "in" / "a.nii.gz", np.zeros((4, 4, 4)))
    write_nifti(tmp_path / "in" / "b.nii", np.zeros((4, 4, 4)))
    assert [e["image"] for e in list_scans(a)] == [str(a)]
    assert [e["image"].rsplit("/", 1)[1] for e in list_scans(tmp_path / "in")] == ["a.nii.gz", "b.nii"]
    dl = tmp_path / "in" / "d.json"
    dl.write_text(json.dumps({"training": [{"image": "a.nii.gz"}], "test": [{"image": "b.nii"}]}))
    assert len(list_scans(dl, "test")) == 1 and len(list_scans(dl, "all")) == 2 and len(list_scans(dl)) == 1
    for given in (tmp_path / "in", a):  # a split cannot apply to a folder or a scan: refused, not ignored
        with pytest.raises(DatalistError, match=f"--input_split 'all' selects a list of a datalist JSON.*{given}"):
            list_scans(given, "all")
    with pytest.raises(DatalistError, match="no NIfTI files"):
        list_scans(tmp_path / "in" / "..")


def test_preprocessing_shape_orientation_and_affine(tmp_path):
    # a bright voxel at a known world position on the LAS-stored MNI grid must stay at that position
    vol = np.zeros((91, 109, 91), np.float32)
    ijk = np.array([30, 70, 40])
    vol[tuple(ijk)] = 100.0
    path = write_nifti(tmp_path / "v.nii.gz", vol)
    world = MNI_AFFINE @ np.append(ijk, 1)
    # a single bright voxel is a near-empty volume: allowed here, where only the geometry is tested
    preprocessing = config_preprocessing(spatial_size=(64, 64, 64), intensity="minmax", allow_nonstandard_input=True)
    out = preprocessing({"image": str(path), "label": 1})
    img = out["image"]
    assert tuple(img.shape) == (1, 64, 64, 64) and img.dtype == torch.float32
    batch = list_data_collate([out])  # what the engines receive
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [1]
    affine = img.affine.numpy()
    assert np.all(np.diag(affine)[:3] > 0)  # RAS after orientation
    peak = np.unravel_index(int(torch.argmax(img[0])), (64, 64, 64))
    peak_world = affine @ np.append(peak, 1)
    voxel = np.abs(np.diag(affine)[:3])
    assert np.all(np.abs(peak_world[:3] - world[:3]) <= voxel)
    assert float(img.min()) == 0.0 and float(img.max()) == pytest.approx(1.0)
    assert img.meta["filename_or_obj"] == str(path)


def test_intensity_modes():
    x = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4) * 3 + 7
    mm = IntensityNormalize("minmax")(x)
    assert float(mm.min()) == 0 and float(mm.max()) == 1
    z = IntensityNormalize("zscore")(x)
    assert float(z.mean()) == pytest.approx(0, abs=1e-6) and float(z.std()) == pytest.approx(1, abs=1e-6)
    assert torch.all(IntensityNormalize("minmax")(torch.ones(1, 2, 2, 2)) == 0)
    with pytest.raises(ValueError, match="percentile"):
        IntensityNormalize("percentile")


def test_occipital_normalisation_reads_the_reference_region(tmp_path):
    from scripts.anatomy import template_rois

    rois = template_rois((91, 109, 91), MNI_AFFINE)
    vol = np.full((91, 109, 91), 2.0, np.float32)
    vol[rois["occipital"]] = 4.0
    path = write_nifti(tmp_path / "v.nii.gz", vol)
    img = config_preprocessing(spatial_size=(91, 109, 91), intensity="occipital")({"image": str(path)})["image"]
    # the occipital region reads 1 and the rest 0.5 (interior voxels, away from the region's border)
    assert float(torch.median(img)) == pytest.approx(0.5, abs=1e-4)
    assert float(img.max()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "content, message",
    [
        ("garbage", "could not be read"),
        (np.zeros((4, 4, 4, 3)), "expected a single 3D volume"),
        (np.full((8, 8, 8), np.nan), "NaN or infinite"),
    ],
)
def test_bad_scans_give_a_clear_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.nii.gz"
    if isinstance(content, str):
        path.write_bytes(b"this is not a NIfTI file")
    else:
        write_nifti(path, content)
    with pytest.raises(Exception) as err:
        config_preprocessing(spatial_size=(8, 8, 8))({"image": str(path), "label": 0})
    error = find_input_error(err.value)  # MONAI wraps it in "applying transform"; the excepthook prints this
    assert error is not None and message in str(error) and str(path) in str(error)


def test_dicom_series_folder_is_read_with_itk(tmp_path):
    itk = pytest.importorskip("itk")
    arr = (np.arange(8 * 10 * 12).reshape(12, 10, 8) % 97).astype(np.int16)  # ITK order (z, y, x)
    image = itk.image_from_array(arr)
    image.SetSpacing([2.0, 2.0, 2.0])
    folder = tmp_path / "dicom"
    folder.mkdir()
    names = [str(folder / f"slice{i:03d}.dcm") for i in range(arr.shape[0])]
    writer = itk.ImageSeriesWriter[itk.Image[itk.SS, 3], itk.Image[itk.SS, 2]].New(
        Input=image, ImageIO=itk.GDCMImageIO.New(), FileNames=names
    )
    writer.Update()
    assert [e["image"] for e in list_scans(folder)] == [str(folder)]
    preprocessing = config_preprocessing(spatial_size=(8, 10, 12), intensity="minmax", allow_nonstandard_input=True)
    out = preprocessing({"image": str(folder)})
    assert tuple(out["image"].shape) == (1, 8, 10, 12)


def test_subsample_by_subject_keeps_whole_subjects_and_both_classes():
    entries = _entries(n_hc=10, n_pd=20, visits=3)
    subset = subsample_by_subject(entries, 0.2, seed=0)
    hc = {e["subject"] for e in subset if e["label"] == 0}
    pd_ = {e["subject"] for e in subset if e["label"] == 1}
    assert (len(hc), len(pd_)) == (2, 4)
    assert len(subset) == 2 + 4 * 3  # every visit of a kept PD subject
    assert subset == subsample_by_subject(entries, 0.2, seed=0) != subsample_by_subject(entries, 0.2, seed=1)
    assert len(subsample_by_subject(entries, 0.01, seed=0)) == 1 + 3  # at least one subject per class
    assert subsample_by_subject(entries, 1.0) == entries
    with pytest.raises(DatalistError, match=r"train fraction must be in \(0, 1\]"):
        subsample_by_subject(entries, 0.0)


@pytest.mark.parametrize("config", ["train_teacher.json", "distill.json"])
def test_train_fraction_keeps_whole_multi_visit_subjects_through_the_configs_datalist(tmp_path, config):
    """The training configs' own ``train#datalist`` component subsamples subjects, not scans."""
    from conftest import BUNDLE_ROOT
    from monai.bundle import ConfigParser

    entries = _entries(n_hc=10, n_pd=20, visits=3)
    for e in entries:
        (tmp_path / e["image"]).write_bytes(b"")  # the datalist reader checks that the files exist
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries, "validation": [], "test": []}))
    parser = ConfigParser()
    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)  # macros resolve from the bundle root
    try:
        parser.read_config(f"configs/{config}")
        parser.update({"dataset_dir": str(tmp_path), "train_fraction": 0.5, "data_seed": 3})
        subset = parser.get_parsed_content("train#datalist")
    finally:
        os.chdir(cwd)
    visits = {}
    for e in entries:
        visits.setdefault(e["subject"], set()).add(os.path.basename(e["image"]))
    kept = {}
    for e in subset:
        kept.setdefault(e["subject"], set()).add(os.path.basename(e["image"]))
    assert all(kept[s] == visits[s] for s in kept)  # every visit of a kept subject, none of a dropped one
    assert sum(1 for s in kept if s.startswith("sub-0") and int(s[4:]) < 10) == 5  # half of the 10 HC subjects
    assert len(kept) == 15 and len(subset) == 5 + 10 * 3
