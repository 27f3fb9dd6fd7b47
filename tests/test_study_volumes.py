# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""One preprocessing per study: runs that share a folder preprocess each scan once per transform chain."""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform
from scripts.fast_data import StackedCache, cached_dataset, stacking_problem


class CountedScale(MapTransform):
    """A deterministic "preprocessing" that counts its calls (in this process)."""

    calls = 0

    def __init__(self, factor: float) -> None:
        super().__init__(keys="image")
        self.factor = factor

    def __call__(self, data):
        CountedScale.calls += 1
        d = dict(data)
        image = torch.full((1, 4, 4), float(d["value"]) * self.factor)
        d["image"] = MetaTensor(image, meta={"filename_or_obj": f"scan{d['value']}.nii.gz"})
        return d


def _data():
    return [{"value": i, "label": i % 2} for i in range(5)]


def test_two_runs_read_one_cache_and_a_changed_chain_rebuilds_it(tmp_path):
    shared = tmp_path / "volumes"
    CountedScale.calls = 0
    first = cached_dataset(_data(), Compose([CountedScale(2.0)]), shared_dir=shared)
    assert CountedScale.calls == 5 and len(list(shared.glob("*.pt"))) == 5
    second = cached_dataset(_data(), Compose([CountedScale(2.0)]), shared_dir=shared)  # another cell, same chain
    assert CountedScale.calls == 5  # read from the folder, not preprocessed again
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"]
        # read back with its metadata: the file name keys the teacher-output cache and names the predictions
        assert isinstance(b["image"], MetaTensor) and b["image"].meta["filename_or_obj"] == f"scan{b['value']}.nii.gz"
    changed = cached_dataset(_data(), Compose([CountedScale(3.0)]), shared_dir=shared)  # another chain
    assert CountedScale.calls == 10 and len(list(shared.glob("*.pt"))) == 10
    assert torch.equal(changed[4]["image"], torch.full((1, 4, 4), 12.0))
    # still an in-memory cache the fast path stacks
    assert stacking_problem(second) is None
    assert StackedCache(second).tensors["image"].shape == (5, 1, 4, 4)


def test_a_study_without_shared_volumes_preprocesses_in_each_cell(tmp_path):
    from scripts.study.cells import StudyContext, volumes_dir

    assert volumes_dir(StudyContext(run_dir=tmp_path, datasets={})) == str(tmp_path / "volumes")
    # `--no-shared-volumes` is recorded with the study's settings, so a resumed study keeps the choice
    assert volumes_dir(StudyContext(run_dir=tmp_path, datasets={}, settings={"shared_cache_dir": ""})) == ""
    # nothing shared: the dataset is MONAI's plain in-memory cache, the chain runs in the cell
    CountedScale.calls = 0
    cached_dataset(_data(), Compose([CountedScale(2.0)]), shared_dir="")
    cached_dataset(_data(), Compose([CountedScale(2.0)]), shared_dir="")
    assert CountedScale.calls == 10
