# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Partial resampling for inference: the same student input as the full chain, for every projection."""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose
from scripts.fast_inference import PartialPreprocessing, grid_extrema, planes_read_by, resample_planes
from scripts.projections import PROJECTIONS
from torch.nn import functional as nnf

SLICE_BASED = {p for p in PROJECTIONS if not p.startswith(("dynamic_image", "entropy"))}


def _chain(**settings):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.update(settings)
    return list(parser.get_parsed_content("volume_transforms")) + [parser.get_parsed_content("projection_transform")]


@pytest.fixture(scope="module")
def scans(tiny_phantom_dataset):
    return sorted(str(p) for p in (tiny_phantom_dataset.parent / "images").glob("*.nii.gz"))[:2]


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("centre", [30, [31, 27, 33], "template"], ids=["one-centre", "per-view", "template"])
def test_partial_path_gives_the_full_chain_student_input(scans, projection, centre, single_thread):
    chain = _chain(projection=projection, slice_centre=centre)
    full, partial = Compose(chain), PartialPreprocessing(chain)
    assert partial.partial == (projection in SLICE_BASED)  # whole-stack projections need the whole volume
    for path in scans:
        expected, got = full({"image": path})["image"], partial({"image": path})["image"]
        assert isinstance(got, MetaTensor) and got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got.as_tensor(), expected.as_tensor(), atol=2e-6, rtol=0)
        assert set(got.meta) == set(expected.meta) and got.meta["projection"] == projection
        assert got.meta["filename_or_obj"] == expected.meta["filename_or_obj"]
        torch.testing.assert_close(got.affine, expected.affine)


def test_automatic_centre_and_other_normalisations_run_the_full_chain(scans):
    for settings in ({"slice_centre": "auto"}, {"slice_centre": 30, "intensity": "zscore"}):
        chain = _chain(projection="early_fusion_slices", **settings)
        partial = PartialPreprocessing(chain)
        assert not partial.partial and partial.planes is None
        torch.testing.assert_close(partial({"image": scans[0]})["image"], Compose(chain)({"image": scans[0]})["image"])
    assert not PartialPreprocessing(_chain(projection="early_fusion_slices", slice_centre=30), enabled=False).partial


def test_planes_read_by_each_projection():
    planes = {p: planes_read_by(_chain(projection=p, slice_centre=30)[-1], (64, 64, 64)) for p in PROJECTIONS}
    assert planes["early_fusion_slices"] == {2: [29, 30, 31]}  # three axial slices
    assert planes["single_slice"] == {2: [30]}
    assert planes["early_fusion_views"] == {2: [30], 1: [30], 0: [30]}
    assert planes["dynamic_image"] is None and planes["entropy_views"] is None
    assert planes_read_by(_chain(projection="early_fusion_slices", slice_centre=63)[-1], (64, 64, 64)) is None
    # the default template centre: the template striatum's centre on the MNI 64³ grid (axial 27, as the study's)
    template = _chain(projection="early_fusion_views", slice_centre="template")[-1]
    assert planes_read_by(template, (64, 64, 64)) == {2: [27], 1: [37], 0: [31]}


def test_template_centre_off_the_mni_grid_falls_back_to_the_full_chain_error(tmp_path):
    from conftest import write_nifti
    from scripts.errors import find_input_error

    # a volume whose grid does not hold the template striatum (identity affine, far from MNI space)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])).numpy()
    affine[:3, 3] = 1000.0  # the whole field of view lies 1 m away from the MNI origin
    path = write_nifti(tmp_path / "far.nii.gz", torch.rand(20, 20, 20).numpy(), affine=affine)
    # past the input checks (asked for), the template centre itself finds no striatum on this grid
    chain = _chain(projection="early_fusion_slices", slice_centre="template", allow_nonstandard_input=True)
    partial = PartialPreprocessing(chain)
    assert partial.partial
    errors = []
    for transform in (Compose(chain), partial):
        with pytest.raises(Exception) as err:
            transform({"image": str(path)})
        errors.append(str(find_input_error(err.value)))
    assert errors[0] == errors[1] and str(path) in errors[0] and "MNI space" in errors[0]


@pytest.mark.parametrize("shape", [(23, 29, 19), (9, 12, 10)], ids=["downsample", "upsample"])
def test_resampled_planes_and_grid_extrema_match_the_whole_grid(shape):
    g = torch.Generator().manual_seed(0)
    volume = torch.rand(shape, generator=g) ** 4  # a few hot voxels, as in a DaTscan
    size = (16, 16, 16)
    grid = nnf.interpolate(volume[None, None], size=size, mode="trilinear", align_corners=True)[0, 0]
    for axis in range(3):
        planes = resample_planes(volume, axis, [0, 7, 15], size)
        torch.testing.assert_close(planes, grid.movedim(axis, 0)[[0, 7, 15]], atol=1e-6, rtol=0)
    planes = resample_planes(volume, 2, [7, 8], size)
    low, high = grid_extrema(volume, size, float(planes.min()), float(planes.max()))
    assert low == pytest.approx(float(grid.min()), abs=1e-6) and high == pytest.approx(float(grid.max()), abs=1e-6)
    assert grid_extrema(volume, size, float(planes.min()), float(planes.max()), max_candidates=1) is None
