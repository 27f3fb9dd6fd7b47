# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Tests of the striatal binding ratio calculator and the lowest-putamen SBR threshold baseline."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts import sbr
from scripts.anatomy import MNI_2MM_AFFINE, MNI_2MM_SHAPE, resized_affine, template_rois
from scripts.errors import InputError

# Constant "activity" per region: background 1, occipital 2, caudate/putamen subregions as below.
_VALUES = {"caudate_L": 7.0, "caudate_R": 6.0, "putamen_ant_L": 5.0, "putamen_post_L": 3.0, "putamen_ant_R": 6.0}
_VALUES["putamen_post_R"] = 4.0
_OCCIPITAL = 2.0


def _piecewise_volume(shape, affine) -> tuple[np.ndarray, dict[str, float]]:
    """A volume that is constant on each template region, and its SBRs computed by hand from voxel counts."""
    rois = template_rois(shape, affine)
    vol = np.ones(shape, dtype=np.float32)
    vol[rois["occipital"]] = _OCCIPITAL
    for name, value in _VALUES.items():
        vol[rois[name]] = value
    expected = {name: value / _OCCIPITAL - 1 for name, value in _VALUES.items()}
    for side in "LR":
        n_ant, n_post = rois[f"putamen_ant_{side}"].sum(), rois[f"putamen_post_{side}"].sum()
        mean = (n_ant * _VALUES[f"putamen_ant_{side}"] + n_post * _VALUES[f"putamen_post_{side}"]) / (n_ant + n_post)
        expected[f"putamen_{side}"] = mean / _OCCIPITAL - 1
    return vol, expected


@pytest.mark.parametrize("grid", ["mni2mm", "resized64"])
def test_sbr_of_a_piecewise_constant_volume_is_exact(grid):
    if grid == "mni2mm":
        shape, affine = MNI_2MM_SHAPE, MNI_2MM_AFFINE
    else:
        shape, affine = (64, 64, 64), resized_affine(MNI_2MM_AFFINE, MNI_2MM_SHAPE, (64, 64, 64))
    vol, expected = _piecewise_volume(shape, affine)
    out = sbr.compute_sbr(vol, affine)
    assert set(out) == set(sbr.SBR_FEATURES)
    for name, value in expected.items():
        assert out[name] == pytest.approx(value, rel=1e-6), name
    put_l, put_r = expected["putamen_L"], expected["putamen_R"]
    assert out["lowest_putamen"] == pytest.approx(min(put_l, put_r))
    assert out["putamen_ai"] == pytest.approx(200 * abs(put_l - put_r) / (put_l + put_r))
    assert out["mean_striatum"] == pytest.approx((2.5 + 2.0 + put_l + put_r) / 4)
    assert out["caudate_putamen_ratio"] == pytest.approx((2.5 + 2.0) / (put_l + put_r))


def test_sbr_accepts_channel_first_tensors_and_is_scale_invariant():
    vol, expected = _piecewise_volume(MNI_2MM_SHAPE, MNI_2MM_AFFINE)
    out = sbr.compute_sbr(torch.as_tensor(vol)[None] * 37.5, torch.tensor(np.array(MNI_2MM_AFFINE)))
    assert out["caudate_L"] == pytest.approx(expected["caudate_L"], rel=1e-6)
    with pytest.raises(ValueError, match=r"\(X, Y, Z\) or channel-first"):
        sbr.compute_sbr(np.zeros((2, 4, 4, 4)), MNI_2MM_AFFINE)
    with pytest.raises(ValueError, match="occipital"):
        sbr.compute_sbr(np.zeros(MNI_2MM_SHAPE), MNI_2MM_AFFINE)


def test_asymmetry_index_formula():
    assert sbr.asymmetry_index(2.0, 1.0) == pytest.approx(200 / 3)  # 200 |L - R| / (L + R)
    assert sbr.asymmetry_index(1.0, 2.0) == pytest.approx(200 / 3)
    assert sbr.asymmetry_index(1.5, 1.5) == 0.0
    np.testing.assert_allclose(sbr.asymmetry_index(np.array([3.0, 0.0]), np.array([1.0, 0.0])), [100.0, 0.0])


def test_threshold_classifier_maximises_youden_j():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(2.0, 0.4, 60), rng.normal(0.9, 0.4, 140)])
    y = np.concatenate([np.zeros(60, int), np.ones(140, int)])
    clf = sbr.SBRThresholdClassifier().fit(x, y)
    # Brute force over every cut between sorted values: PD when SBR <= cut.
    xs = np.sort(x)
    cuts = (xs[:-1] + xs[1:]) / 2
    j = [(x[y == 1] <= c).mean() + (x[y == 0] > c).mean() - 1 for c in cuts]
    pred = clf.predict(x)
    assert (pred[y == 1]).mean() + (1 - pred[y == 0]).mean() - 1 == pytest.approx(max(j))
    assert np.all(clf.pd_score(x) == -x) and set(np.unique(pred)) == {0, 1}
    report = clf.report(x, y)
    assert report["accuracy"] == pytest.approx((pred == y).mean())
    # Perfectly separable data: the threshold lies between the classes.
    sep = sbr.SBRThresholdClassifier().fit([2.0, 2.2, 1.8, 0.5, 0.7], [0, 0, 0, 1, 1])
    assert 0.7 < sep.threshold < 1.8
    with pytest.raises(ValueError, match="both classes"):
        sbr.SBRThresholdClassifier().fit([1.0, 2.0], [1, 1])
    with pytest.raises(RuntimeError, match="fit"):
        sbr.SBRThresholdClassifier().predict([1.0])


def _write(path, vol, affine):
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), str(path))


def test_nifti_loader_uses_the_file_affine(tmp_path):
    # A RAS (x not flipped) 2 mm grid: the template ROIs are evaluated through this file's own affine.
    ras = np.array([[2.0, 0, 0, -90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    vol, expected = _piecewise_volume(MNI_2MM_SHAPE, ras)
    _write(tmp_path / "ras.nii.gz", vol, ras)
    out = sbr.sbr_from_file(tmp_path / "ras.nii.gz")
    assert out["putamen_L"] == pytest.approx(expected["putamen_L"], rel=1e-5)
    assert out["caudate_R"] == pytest.approx(expected["caudate_R"], rel=1e-5)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        sbr.sbr_from_file(tmp_path / "missing.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        sbr.sbr_from_file(tmp_path / "broken.nii.gz")


def _scaled_volume(base: np.ndarray, rois: dict, putamen_factor_l: float, putamen_factor_r: float) -> np.ndarray:
    vol = base.copy()
    for side, f in (("L", putamen_factor_l), ("R", putamen_factor_r)):
        vol[rois[f"putamen_{side}"]] = 1 + (vol[rois[f"putamen_{side}"]] - 1) * f
    return vol


def test_evaluate_sbr_baseline_on_a_datalist(tmp_path):
    rois = template_rois(MNI_2MM_SHAPE, MNI_2MM_AFFINE)
    base = np.ones(MNI_2MM_SHAPE, dtype=np.float32)
    base[rois["caudate_L"] | rois["caudate_R"]] = 6.0
    base[rois["putamen_L"] | rois["putamen_R"]] = 4.0  # healthy putamen SBR 3, so SBR = 3 f below
    (tmp_path / "images").mkdir()
    # Training: HC with intact putamen, PD with the left putamen reduced; test: one PD is too mild to detect.
    factors = {"training": [(1.0, 1.0, 0), (0.9, 1.0, 0), (0.3, 0.8, 1), (0.2, 0.5, 1)]}
    factors["test"] = [(1.0, 0.95, 0), (0.95, 0.95, 1), (0.25, 0.9, 1)]
    datalist = {}
    for split, items in factors.items():
        datalist[split] = []
        for i, (fl, fr, label) in enumerate(items):
            rel = f"images/{split}_{i}.nii.gz"
            _write(tmp_path / rel, _scaled_volume(base, rois, fl, fr), MNI_2MM_AFFINE)
            datalist[split].append({"image": rel, "label": label})
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    result = sbr.evaluate_sbr_baseline(tmp_path / "datalist.json", "training", "test")
    assert result["fit_split"] == "training" and result["eval_split"] == "test"
    # Training lowest-putamen SBRs: HC 3.0, 2.7; PD 0.9, 0.6. J = 1 only between 0.9 and 2.7: the midpoint 1.8.
    assert result["threshold"] == pytest.approx(1.8)
    m = result["metrics"]
    assert m["n"] == 3 and m["confusion_matrix"] == [[1, 0], [1, 1]] and m["accuracy"] == pytest.approx(2 / 3)
    # CLI: same result written to --out; a missing image is reported by name.
    assert sbr.main(["--datalist", str(tmp_path / "datalist.json"), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["threshold"] == pytest.approx(result["threshold"])
    (tmp_path / "images" / "test_1.nii.gz").unlink()
    with pytest.raises(InputError, match="test_1.nii.gz"):
        sbr.evaluate_sbr_baseline(tmp_path / "datalist.json")
    with pytest.raises(InputError, match="no list named 'validation'"):
        sbr.evaluate_sbr_baseline(tmp_path / "datalist.json", eval_split="validation")


def test_threshold_fitted_on_another_datalist_scores_an_external_test_set(tmp_path):
    rois = template_rois(MNI_2MM_SHAPE, MNI_2MM_AFFINE)
    base = np.ones(MNI_2MM_SHAPE, dtype=np.float32)
    base[rois["caudate_L"] | rois["caudate_R"]] = 6.0
    base[rois["putamen_L"] | rois["putamen_R"]] = 4.0  # healthy putamen SBR 3, so SBR = 3 f below

    def write_set(folder, lists):
        (folder / "images").mkdir(parents=True)
        datalist = {}
        for split, items in lists.items():
            datalist[split] = []
            for i, (fl, fr, label) in enumerate(items):
                rel = f"images/{split}_{i}.nii.gz"
                _write(folder / rel, _scaled_volume(base, rois, fl, fr), MNI_2MM_AFFINE)
                datalist[split].append({"image": rel, "label": label})
        (folder / "datalist.json").write_text(json.dumps(datalist))
        return folder / "datalist.json"

    # Fit set: lowest-putamen SBRs HC 3.0, 2.4 and PD 1.2, 0.6, so Youden's J = 1 between 1.2 and 2.4 (midpoint 1.8).
    fit = write_set(tmp_path / "bench", {"training": [(1.0, 1.0, 0), (0.8, 0.9, 0), (0.4, 0.8, 1), (0.2, 0.5, 1)]})
    # External set, all in test: lowest SBRs HC 2.1 (kept) and 1.5 (lost: below 1.8), PD 0.9.
    ext = write_set(
        tmp_path / "ext", {"training": [], "validation": [], "test": [(0.7, 0.8, 0), (0.5, 0.6, 0), (0.3, 0.3, 1)]}
    )
    result = sbr.evaluate_sbr_baseline(ext, fit_datalist=fit)
    assert result["threshold"] == pytest.approx(1.8) and result["fit_datalist"] == str(fit)
    assert result["metrics"]["confusion_matrix"] == [[1, 1], [0, 1]]
    assert result["metrics"]["accuracy"] == pytest.approx(2 / 3)
    # Without a fit datalist the empty training list is reported with the remedy.
    with pytest.raises(ValueError, match="'training' list .* is empty.*--fit-datalist"):
        sbr.evaluate_sbr_baseline(ext)
    assert sbr.main(["--datalist", str(ext)]) == 2
    out = tmp_path / "r.json"
    assert sbr.main(["--datalist", str(ext), "--fit-datalist", str(fit), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["accuracy"] == pytest.approx(2 / 3)
    # The summary pools the external set's only non-empty list.
    summary = sbr.summarize_sbr(ext)
    assert summary["n"] == 3 and summary["n_hc"] == 2 and summary["splits"] == ["training", "validation", "test"]
    assert summary["groups"]["HC"]["lowest_putamen"][0] == pytest.approx((2.1 + 1.5) / 2, rel=1e-4)
    assert summary["pd_reduction"]["lowest_putamen"] == pytest.approx(1 - 0.9 / 1.8, rel=1e-3)


def test_summarize_features_checks_its_inputs():
    feats = [dict.fromkeys(sbr.SBR_FEATURES, 1.0) for _ in range(2)]
    with pytest.raises(ValueError, match="same length"):
        sbr.summarize_features([{"label": 0}], feats)
    with pytest.raises(ValueError, match="no scans"):
        sbr.summarize_features([], [])
    one_class = sbr.summarize_features([{"label": 1}, {"label": 1}], feats)
    assert set(one_class["groups"]) == {"PD"} and "threshold_in_sample" not in one_class
