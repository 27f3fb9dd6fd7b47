# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The low-data arm: a validation split that shrinks with the training fraction down to its floor, label noise,
and the matrices that use them."""

from __future__ import annotations

import json

import pytest
from scripts.study import matrix


def _datalist(tmp_path, n_val_subjects: int = 120, n_train_subjects: int = 360):
    def entries(prefix, n):
        return [
            {"image": f"images/{prefix}{i:04d}.nii.gz", "subject": f"{prefix}{i:04d}", "label": int(i % 10 < 7)}
            for i in range(n)
        ]

    path = tmp_path / "datalist.json"
    data = {"training": entries("t", n_train_subjects), "validation": entries("v", n_val_subjects), "test": []}
    (tmp_path / "images").mkdir(exist_ok=True)
    for e in data["training"] + data["validation"]:
        (tmp_path / e["image"]).touch()
    path.write_text(json.dumps(data))
    return str(path)


def test_validation_shrinks_with_the_training_fraction_down_to_the_floor(tmp_path):
    path = _datalist(tmp_path)
    assert len(matrix.validation_subset(path, 1.0)) == 120
    assert len(matrix.validation_subset(path, 0.5)) == 60  # the same share as the training subjects
    assert len(matrix.validation_subset(path, 0.25)) == 30
    floor = matrix.VALIDATION_FLOOR
    for f in (0.1111, 0.0556, 0.01):  # ~40, ~20 and ~4 training scans: the floor holds
        val = matrix.validation_subset(path, f)
        assert floor <= len(val) <= floor + 1
        assert 0 < sum(e["label"] for e in val) < len(val)  # both classes
    # Deterministic, and a split smaller than the floor is kept whole.
    assert matrix.validation_subset(path, 0.0556) == matrix.validation_subset(path, 0.0556)
    assert len(matrix.validation_subset(_datalist(tmp_path, n_val_subjects=10), 0.0556)) == 10
    # The cells of a low-data fraction ask for it (teachers of that fraction too); full-data cells do not.
    kd = matrix.Cell("student", 0, "single_slice", True, "fg+lg", 0.0556, 1.0)
    assert kd.overrides()["validate#datalist"]["fraction"] == 0.0556
    assert kd.overrides()["validate#datalist"]["floor"] == floor
    assert "validate#datalist" in matrix.Cell("teacher", fraction=0.25).overrides()
    assert "validate#datalist" not in matrix.Cell("teacher").overrides()


def test_label_noise_flips_a_share_of_the_training_subjects(tmp_path):
    path = _datalist(tmp_path)
    clean = matrix.training_subset(path, 0.1111, seed=0)
    noisy = matrix.training_subset(path, 0.1111, seed=0, flip=0.05)
    assert len(clean) == len(noisy) == 40
    assert [e["subject"] for e in clean] == [e["subject"] for e in noisy]
    assert sum(a["label"] != b["label"] for a, b in zip(clean, noisy)) == 2
    cell = matrix.Cell("student", 3, "single_slice", False, fraction=0.1111, label_noise=0.05)
    assert cell.name.endswith("-noise0.05-s3") and cell.overrides()["train#datalist"]["flip"] == 0.05
    with pytest.raises(ValueError, match="label noise"):
        matrix.Cell("teacher", label_noise=0.05)


def test_low_data_matrices():
    cells = matrix.build_cells(matrix.preset("lowdata"))
    students = [c for c in cells if c.kind == "student"]
    assert {c.projection for c in students} == {"single_slice"}
    assert {c.fraction for c in students} == {0.0556, 0.1111} and {c.seed for c in students} == set(range(10))
    assert all(c.teacher_fraction == 1.0 for c in students if c.kd)
    assert [c.name for c in cells if c.kind == "teacher"] == ["teacher-f1-minmax-s0"]
    cpu = matrix.build_cells(matrix.preset("cpu"))
    low = [c for c in cpu if c.kind == "student" and c.fraction < 1 and not c.label_noise]
    assert {c.projection for c in low} == {"single_slice", "joint_fusion_slices"}
    assert {c.teacher_fraction for c in low if c.kd} == {1.0, 0.0556, 0.1111}
    assert len({c.seed for c in low}) == 10 and any(c.label_noise == 0.05 for c in cpu)
    # --seeds sets every part's seeds.
    assert {c.seed for c in matrix.build_cells(matrix.preset("cpu", seeds=2))} <= {0, 1, 2}


def test_low_data_cells_train_as_many_steps_and_select_by_roc_auc():
    settings = {"max_epochs": 15, "patience": 15, "batch_size": 16}
    full = matrix.Cell("student", 0, "single_slice", False)
    assert full.schedule(settings) == settings and "selection_metric" not in full.overrides()
    small = matrix.Cell("student", 0, "single_slice", False, fraction=0.1111)
    assert small.schedule(settings) == {"max_epochs": 136, "patience": 136, "batch_size": 16}  # 15 / 0.1111
    assert small.overrides()["selection_metric"] == "auc_ce"
    tiny = matrix.Cell("teacher", fraction=0.01)  # capped
    assert tiny.schedule(settings)["max_epochs"] == 15 * matrix.LOW_DATA_MAX_EPOCH_FACTOR
