# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Tests of the 3D → 2D projections (scripts/projections.py).

Every projection is compared with a direct numpy computation (explicit slicing and loops) on small volumes of
known structure: ramps, bright blobs, slices with known histograms and random volumes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor, list_data_collate
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resize
from scripts.projections import (
    PROJECTIONS,
    VIEWS,
    AdjacentSlices,
    AdjacentSlicesd,
    DynamicImage,
    EntropyProjection,
    Projection,
    Projectiond,
    find_slice_centre,
    plane_affine,
    projection_spec,
    rank_pooling_coefficients,
    slice_entropy,
)

RNG = np.random.default_rng(1234)


def _random_volume(shape=(9, 9, 9), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 255.0, size=(1, *shape)).astype(np.float32)


def _slice(vol: np.ndarray, view: str, t: int) -> np.ndarray:
    """Slice ``t`` of a ``(1, X, Y, Z)`` volume, written out per view."""
    if view == "axial":
        return vol[0, :, :, t]
    if view == "coronal":
        return vol[0, :, t, :]
    return vol[0, t, :, :]


def _num_slices(vol: np.ndarray, view: str) -> int:
    return vol.shape[{"axial": 3, "coronal": 2, "sagittal": 1}[view]]


def _blob_volume(centre_xyz, shape=(24, 24, 24), seed=0, sigma=1.5, amplitude=4.0) -> np.ndarray:
    """Noisy 'brain' ellipsoid of uptake 1 with a bright Gaussian blob at ``centre_xyz``."""
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    c = (np.asarray(shape) - 1) / 2
    brain = ((x - c[0]) / (0.45 * shape[0])) ** 2 + ((y - c[1]) / (0.45 * shape[1])) ** 2
    brain = (brain + ((z - c[2]) / (0.45 * shape[2])) ** 2) <= 1
    vol = 0.15 + 0.85 * brain
    for cx, cy, cz in np.atleast_2d(centre_xyz):
        vol = vol + amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    vol = vol + np.random.default_rng(seed).normal(0.0, 0.1, size=shape)
    return vol[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Slice geometry
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "view, expected_hw", [("axial", (5, 6)), ("coronal", (5, 7)), ("sagittal", (6, 7))], ids=lambda v: str(v)
)
def test_slice_planes_keep_the_stored_axis_order(view, expected_hw):
    vol = _random_volume((5, 6, 7))
    c = 2
    out = AdjacentSlices(view, centre=c, num_slices=1)(vol)
    assert out.shape == (1, *expected_hw)
    np.testing.assert_array_equal(out[0], _slice(vol, view, c))


@pytest.mark.parametrize("view", VIEWS)
def test_adjacent_slices_are_channels_in_increasing_index_order(view):
    # ramp along the view axis: slice t is filled with t, so channel j must be constant c - h + j
    vol = np.zeros((1, 7, 8, 9), dtype=np.float32)
    axis = {"axial": 3, "coronal": 2, "sagittal": 1}[view]
    shape = [1, 1, 1, 1]
    shape[axis] = vol.shape[axis]
    vol = vol + np.arange(vol.shape[axis], dtype=np.float32).reshape(shape)
    c, k = 4, 5
    out = Projection("early_fusion_slices", view=view, centre=c, num_slices=k)(vol)
    assert out.shape[0] == k
    for j in range(k):
        assert np.all(out[j] == c - k // 2 + j)
    joint = Projection("joint_fusion_slices", view=view, centre=c, num_slices=k)(vol)
    np.testing.assert_array_equal(joint, out)


def test_single_slice_with_gap_gives_the_2g_plus_1_slices_around_the_centre():
    vol = _random_volume((8, 8, 10))
    c, g = 5, 2
    out = Projection("single_slice", view="axial", centre=c, gap=g)(vol)
    expected = np.stack([vol[0, :, :, t] for t in range(c - g, c + g + 1)])
    np.testing.assert_array_equal(out, expected)
    single = Projection("single_slice", view="axial", centre=c)(vol)
    np.testing.assert_array_equal(single, vol[0, :, :, c][None])


def test_views_are_stacked_axial_coronal_sagittal_each_at_its_own_centre():
    vol = _random_volume((6, 6, 6))
    centres = {"axial": 2, "coronal": 3, "sagittal": 4}
    expected = np.stack([_slice(vol, v, centres[v]) for v in VIEWS])
    for centre in (centres, [2, 3, 4]):
        out = Projection("early_fusion_views", centre=centre)(vol)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(Projection("joint_fusion_views", centre=centre)(vol), expected)
    # a single int is used for every view
    np.testing.assert_array_equal(
        Projection("early_fusion_views", centre=3)(vol), np.stack([_slice(vol, v, 3) for v in VIEWS])
    )


def test_views_slices_order_is_views_outer_slices_inner():
    vol = _random_volume((7, 7, 7))
    centres = [2, 3, 4]
    k = 3
    out = Projection("early_fusion_views_slices", centre=centres, num_slices=k)(vol)
    expected = []
    for v, c in zip(VIEWS, centres):
        for t in range(c - 1, c + 2):
            expected.append(_slice(vol, v, t))
    np.testing.assert_array_equal(out, np.stack(expected))


# ---------------------------------------------------------------------------------------------------------------
# Automatic centre
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["centroid", "peak"])
def test_auto_centre_finds_a_bright_blob_in_every_view(method):
    blob = (7, 15, 10)  # (x, y, z)
    vol = _blob_volume(blob)
    assert find_slice_centre(vol, "axial", method=method) == 10
    assert find_slice_centre(vol, "coronal", method=method) == 15
    assert find_slice_centre(vol, "sagittal", method=method) == 7
    assert find_slice_centre(vol[0], "axial", method=method) == 10  # (X, Y, Z) is accepted too
    out = Projection("early_fusion_views", centre="auto")(vol)
    np.testing.assert_array_equal(out, np.stack([_slice(vol, "axial", 10), vol[0, :, 15, :], vol[0, 7, :, :]]))


def test_auto_centre_of_two_symmetric_hemispheres():
    # two equal blobs at x = 6 and x = 16: the centroid is the midline, the peak one of the two blobs
    vol = _blob_volume([(6, 12, 12), (16, 12, 12)], amplitude=5.0)
    assert find_slice_centre(vol, "sagittal", method="centroid") == 11
    assert find_slice_centre(vol, "sagittal", method="peak") in (6, 16)


def test_auto_centre_is_clamped_so_that_all_adjacent_slices_fit():
    vol = _blob_volume((12, 12, 0))
    assert find_slice_centre(vol, "axial", method="peak") < 2  # at the border, without room for 2 neighbours
    out = Projection("early_fusion_slices", view="axial", centre="auto", num_slices=5, centre_method="peak")(vol)
    np.testing.assert_array_equal(out, np.stack([vol[0, :, :, t] for t in range(5)]))


def test_auto_centre_of_a_constant_volume_is_the_middle_slice():
    vol = np.full((1, 6, 8, 11), 3.0, dtype=np.float32)
    assert [find_slice_centre(vol, v) for v in VIEWS] == [5, 3, 2]


def test_auto_centre_follows_a_shifted_scan():
    vol = _blob_volume((11, 12, 9))
    shifted = np.roll(vol, (2, -3, 4), axis=(1, 2, 3))
    assert find_slice_centre(shifted, "axial") == find_slice_centre(vol, "axial") + 4
    assert find_slice_centre(shifted, "coronal") == find_slice_centre(vol, "coronal") - 3
    assert find_slice_centre(shifted, "sagittal") == find_slice_centre(vol, "sagittal") + 2


# ---------------------------------------------------------------------------------------------------------------
# Dynamic image
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", range(1, 8))
def test_rank_pooling_coefficients_match_the_double_sum(num_frames):
    n = num_frames
    for variant, offset in (("canonical", 1), ("reference", 0)):
        expected = []
        for t in range(1, n + 1):
            total = 0.0
            for i in range(t, n + 1):
                total += (2 * i - n - offset) / i
            expected.append(total)
        got = rank_pooling_coefficients(n, variant).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert abs(float(rank_pooling_coefficients(n, "canonical").sum())) < 1e-10
    assert float(rank_pooling_coefficients(n, "reference").sum()) == pytest.approx(n, abs=1e-10)


def test_reference_coefficients_for_64_slices():
    alpha = rank_pooling_coefficients(64, "reference").numpy()
    assert alpha[0] == pytest.approx(-175.6, abs=0.05)
    assert alpha[1] == pytest.approx(-113.6, abs=0.05)
    assert alpha[-1] == pytest.approx(1.0)
    assert rank_pooling_coefficients(64, "canonical").numpy()[-1] == pytest.approx(63 / 64)


def _dynamic_image_loop(vol: np.ndarray, view: str, offset: int) -> np.ndarray:
    n = _num_slices(vol, view)
    di = np.zeros_like(_slice(vol, view, 0), dtype=np.float64)
    for t in range(1, n + 1):
        alpha = sum((2 * i - n - offset) / i for i in range(t, n + 1))
        di += alpha * _slice(vol, view, t - 1).astype(np.float64)
    return (di - di.min()) / (di.max() - di.min())


@pytest.mark.parametrize("view", VIEWS)
def test_dynamic_image_matches_a_direct_loop(view):
    vol = _random_volume((6, 7, 8), seed=3)
    for variant, offset in (("canonical", 1), ("reference", 0)):
        out = Projection("dynamic_image", view=view, dynamic_image_variant=variant)(vol)
        assert out.shape == (1, *_slice(vol, view, 0).shape)
        np.testing.assert_allclose(out[0], _dynamic_image_loop(vol, view, offset), atol=1e-5)
        assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)
    views = _random_volume((6, 6, 6), seed=4)
    out = Projection("dynamic_image_views", dynamic_image_variant="reference")(views)
    np.testing.assert_allclose(out, np.stack([_dynamic_image_loop(views, v, 0) for v in VIEWS]), atol=1e-5)


def test_dynamic_image_of_a_linear_ramp_is_its_slope_map():
    # V_t(h, w) = t * P(h, w) + Q(h, w): with canonical coefficients (sum 0) the Q term cancels and
    # DI = (sum_t alpha_t t) P with a positive factor, so the rescaled DI is the rescaled slope map P.
    p = RNG.uniform(0.5, 2.0, size=(5, 6))
    q = RNG.uniform(0.0, 100.0, size=(5, 6))
    t = np.arange(10, dtype=np.float64)
    vol = (t[None, None, :] * p[:, :, None] + q[:, :, None])[None]
    out = DynamicImage("axial")(vol)
    np.testing.assert_allclose(out[0], (p - p.min()) / (p.max() - p.min()), atol=1e-9)
    assert out.dtype == np.float64


def test_dynamic_image_of_identical_slices_is_zero_without_nan():
    constant = np.full((1, 4, 5, 6), 7.0, dtype=np.float32)
    ramp = np.broadcast_to(np.arange(6, dtype=np.float32), (1, 4, 5, 6)).copy()  # every axial slice constant
    for vol in (constant, ramp, np.zeros_like(constant)):
        for variant in ("canonical", "reference"):
            out = DynamicImage(VIEWS[0], variant)(vol)
            assert np.isfinite(out).all()
            np.testing.assert_array_equal(out, np.zeros((1, 4, 5)))


# ---------------------------------------------------------------------------------------------------------------
# Entropy
# ---------------------------------------------------------------------------------------------------------------


def test_slice_entropy_of_known_histograms():
    vol = np.zeros((1, 4, 4, 3), dtype=np.float32)
    vol[0, :, :, 0] = 0.5  # constant slice: entropy 0
    vol[0, :2, :, 1] = 1.0  # half 0, half 1: two equally likely levels, ln 2
    vol[0, :, :, 2] = np.array([0.0, 1 / 3, 2 / 3, 1.0])[:, None]  # four equal levels, ln 4
    np.testing.assert_allclose(slice_entropy(vol, "axial").numpy(), [0.0, math.log(2), math.log(4)], atol=1e-12)


def _entropy_loop(vol: np.ndarray, view: str, bins: int = 256) -> np.ndarray:
    v = vol.astype(np.float64)
    lo, hi = v.min(), v.max()
    levels = np.minimum(np.floor((v - lo) / (hi - lo) * bins), bins - 1).astype(int)
    num, den = 0.0, 1e-5
    for t in range(_num_slices(vol, view)):
        _, counts = np.unique(_slice(levels, view, t), return_counts=True)
        p = counts / counts.sum()
        h = -np.sum(p * np.log(p))
        num = num + h * _slice(v, view, t)
        den += h
    return num / den


@pytest.mark.parametrize("view", VIEWS)
def test_entropy_projection_matches_a_direct_loop(view):
    vol = _random_volume((6, 7, 8), seed=5)
    vol[0, 0] = 10.0  # one constant sagittal slice
    out = Projection("entropy", view=view)(vol)
    np.testing.assert_allclose(out[0], _entropy_loop(vol, view), rtol=1e-5)
    np.testing.assert_allclose(EntropyProjection(view, bins=8)(vol)[0], _entropy_loop(vol, view, 8), rtol=1e-5)
    cube = _random_volume((6, 6, 6), seed=6)
    out = Projection("entropy_views")(cube)
    np.testing.assert_allclose(out, np.stack([_entropy_loop(cube, v) for v in VIEWS]), rtol=1e-5)


def test_entropy_projection_of_a_constant_volume_is_zero():
    out = Projection("entropy")(np.full((1, 4, 4, 4), 9.0, dtype=np.float32))
    np.testing.assert_array_equal(out, np.zeros((1, 4, 4)))


# ---------------------------------------------------------------------------------------------------------------
# Types, meta data, collation
# ---------------------------------------------------------------------------------------------------------------

_CASES = [(name, {}) for name in PROJECTIONS] + [
    ("single_slice", {"gap": 1}),
    ("early_fusion_slices", {"num_slices": 5}),
    ("early_fusion_views_slices", {"num_slices": 1}),
    ("dynamic_image", {"dynamic_image_variant": "reference", "view": "sagittal"}),
    ("entropy", {"view": "coronal"}),
]


@pytest.mark.parametrize("name, kwargs", _CASES, ids=[f"{n}-{k}" for n, k in _CASES])
def test_numpy_torch_and_metatensor_inputs_agree_and_keep_their_type(name, kwargs):
    vol = _blob_volume((5, 6, 7), shape=(12, 12, 12))
    transform = Projection(name, **kwargs)
    out_np = transform(vol)
    out_t = transform(torch.as_tensor(vol))
    out_m = transform(MetaTensor(torch.as_tensor(vol)))
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    assert type(out_t) is torch.Tensor and out_t.dtype == torch.float32
    assert isinstance(out_m, MetaTensor)
    np.testing.assert_array_equal(out_np, out_t.numpy())
    np.testing.assert_array_equal(out_np, out_m.as_tensor().numpy())
    spec = projection_spec(name, kwargs.get("num_slices", 3), kwargs.get("gap", 0))
    assert out_np.shape == (spec.in_channels, 12, 12)


def test_projection_does_not_modify_or_alias_its_input():
    vol = _random_volume((6, 6, 6))
    before = vol.copy()
    for name in PROJECTIONS:
        out = Projection(name, centre=3)(vol)
        assert not np.shares_memory(out, vol)
    np.testing.assert_array_equal(vol, before)


def test_integer_input_gives_float32():
    vol = (_random_volume((6, 6, 6))).astype(np.uint8)
    out = Projection("single_slice", centre=2)(vol)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], vol[0, :, :, 2].astype(np.float32))


def _meta_volume(filename: str, seed: int = 0) -> MetaTensor:
    affine = torch.tensor(
        [[2.0, 0, 0, -10.0], [0, 3.0, 0, -20.0], [0, 0, 4.0, -30.0], [0, 0, 0, 1]], dtype=torch.float64
    )
    meta = {"filename_or_obj": filename, "spatial_shape": np.array([8, 8, 8]), "pixdim": np.ones(8)}
    return MetaTensor(torch.as_tensor(_blob_volume((3, 4, 5), shape=(8, 8, 8), seed=seed)), affine=affine, meta=meta)


@pytest.mark.parametrize(
    "view, expected",
    [
        ("axial", [[2.0, 0, -10.0], [0, 3.0, -20.0], [0, 0, 1]]),
        ("coronal", [[2.0, 0, -10.0], [0, 4.0, -30.0], [0, 0, 1]]),
        ("sagittal", [[3.0, 0, -20.0], [0, 4.0, -30.0], [0, 0, 1]]),
    ],
)
def test_metatensor_output_keeps_meta_drops_spatial_shape_and_gets_the_plane_affine(view, expected):
    img = _meta_volume("scan_a.nii.gz")
    out = Projection("early_fusion_slices", view=view, centre=3)(img)
    assert out.meta["filename_or_obj"] == "scan_a.nii.gz"
    assert "spatial_shape" not in out.meta
    assert out.meta["projection"] == "early_fusion_slices"
    assert out.applied_operations == []
    np.testing.assert_array_equal(out.affine.numpy(), np.array(expected))
    np.testing.assert_array_equal(plane_affine(img.affine, view).numpy(), np.array(expected))
    assert "spatial_shape" in img.meta and img.affine.shape == (4, 4)  # the input is untouched


def test_plane_affine_of_a_permuted_affine_keeps_the_in_plane_world_axes():
    # voxel axes (i, j, k) -> world (y, z, x): slicing along k (axial) moves along world x
    a = np.array([[0, 0, 5.0, 1.0], [2.0, 0, 0, 2.0], [0, 3.0, 0, 3.0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(plane_affine(a, "axial").numpy(), [[2.0, 0, 2.0], [0, 3.0, 3.0], [0, 0, 1]])


def test_batches_of_projections_collate_with_list_data_collate_and_dataloader():
    items = [{"image": _meta_volume(f"scan_{i}.nii.gz", seed=i), "label": i % 2} for i in range(4)]
    transform = Compose([Projectiond(keys="image", projection="early_fusion_views_slices", num_slices=3)])
    batch = list_data_collate([transform(d) for d in items])
    image = batch["image"]
    assert isinstance(image, MetaTensor) and image.shape == (4, 9, 8, 8)
    assert image.affine.shape == (4, 3, 3)
    assert list(image.meta["filename_or_obj"]) == [f"scan_{i}.nii.gz" for i in range(4)]
    assert list(image.meta["projection"]) == ["early_fusion_views_slices"] * 4
    assert "spatial_shape" not in image.meta
    torch.testing.assert_close(batch["label"], torch.tensor([0, 1, 0, 1]))

    loader = DataLoader(Dataset(items, transform=transform), batch_size=2, num_workers=0)
    batches = list(loader)
    assert [tuple(b["image"].shape) for b in batches] == [(2, 9, 8, 8)] * 2
    assert all(b["image"].affine.shape == (2, 3, 3) for b in batches)


def test_projected_image_works_with_a_2d_spatial_transform():
    out = Projection("single_slice", view="axial", centre=4)(_meta_volume("scan.nii.gz"))
    resized = Resize(spatial_size=(4, 4), mode="bilinear")(out)
    assert resized.shape == (1, 4, 4)
    assert resized.affine.shape == (3, 3)
    # halving the grid doubles the pixel spacing of the plane (2 mm x 3 mm -> 4 mm x 6 mm)
    np.testing.assert_allclose(np.diag(resized.affine.numpy())[:2], [4.0, 6.0])


def test_projectiond_with_missing_keys():
    d = {"image": _random_volume((6, 6, 6)), "other": 1}
    out = Projectiond(keys=["image", "mask"], projection="entropy", allow_missing_keys=True)(d)
    assert out["image"].shape == (1, 6, 6) and out["other"] == 1
    with pytest.raises(KeyError):
        Projectiond(keys=["image", "mask"], projection="entropy")(d)
    sliced = AdjacentSlicesd(keys="image", view=("coronal", "axial"), centre=2, num_slices=3)(d)["image"]
    np.testing.assert_array_equal(
        sliced, np.stack([d["image"][0, :, t, :] for t in (1, 2, 3)] + [d["image"][0, :, :, t] for t in (1, 2, 3)])
    )


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


def test_projection_spec_contract():
    expected = {
        "single_slice": (1, "early"),
        "early_fusion_slices": (5, "early"),
        "early_fusion_views": (3, "early"),
        "early_fusion_views_slices": (15, "early"),
        "joint_fusion_slices": (5, "joint"),
        "joint_fusion_views": (3, "joint"),
        "dynamic_image": (1, "early"),
        "dynamic_image_views": (3, "early"),
        "entropy": (1, "early"),
        "entropy_views": (3, "early"),
    }
    assert set(PROJECTIONS) == set(expected)
    for name, (channels, fusion) in expected.items():
        spec = projection_spec(name, num_slices=5)
        assert (spec.name, spec.in_channels, spec.fusion) == (name, channels, fusion)
    assert projection_spec("single_slice", gap=2) == projection_spec("single_slice", 3, 2)
    assert (projection_spec("single_slice", gap=2).in_channels, projection_spec("single_slice", gap=2).fusion) == (
        5,
        "mean",
    )


@pytest.mark.parametrize("num_slices, gap", [(1, 0), (3, 1), (5, 2)])
def test_projection_spec_channels_equal_the_output_channels(num_slices, gap):
    vol = torch.as_tensor(_random_volume((11, 11, 11)))
    for name in PROJECTIONS:
        out = Projectiond("image", name, num_slices=num_slices, gap=gap)({"image": vol})["image"]
        assert out.shape[0] == projection_spec(name, num_slices, gap).in_channels, name


# ---------------------------------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_projection_lists_the_valid_names():
    for call in (lambda: projection_spec("midslice"), lambda: Projection("midslice"), lambda: Projectiond("x", "2D+e")):
        with pytest.raises(ValueError, match="early_fusion_views_slices") as err:
            call()
        assert all(name in str(err.value) for name in PROJECTIONS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"view": "saggital"}, "unknown view 'saggital'"),
        ({"num_slices": 4}, "num_slices must be odd"),
        ({"num_slices": 0}, "num_slices must be an odd integer >= 1"),
        ({"gap": -1}, "gap must be an integer >= 0"),
        ({"centre": "middle"}, "'auto'"),
        ({"centre": -2}, "non-negative"),
        ({"centre": [1, 2]}, "one centre per view"),
        ({"centre": {"axial": 3}}, "missing"),
        ({"dynamic_image_variant": "hbilen"}, "canonical, reference"),
        ({"centre_method": "max"}, "centroid, peak"),
        ({"bins": 1}, "bins"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Projection("single_slice", **kwargs)


def test_centre_outside_the_volume_names_the_index_and_the_size():
    vol = _random_volume((6, 6, 6))
    with pytest.raises(ValueError, match=r"centre 9 for the axial view.*6 slices along z"):
        Projection("single_slice", centre=9)(vol)
    with pytest.raises(ValueError, match=r"centre 0 .*needs slices -1..1.*must be in 1..4"):
        Projection("early_fusion_slices", view="coronal", centre=0, num_slices=3)(vol)
    with pytest.raises(ValueError, match=r"7 adjacent slices .* has only 6"):
        Projection("early_fusion_slices", num_slices=7)(vol)


def test_multi_view_projections_require_a_cubic_grid():
    vol = _random_volume((6, 6, 5))
    for name in ("early_fusion_views", "joint_fusion_views", "early_fusion_views_slices", "entropy_views"):
        with pytest.raises(ValueError, match=r"cubic grid.*\(6, 6, 5\)"):
            Projection(name, centre=2)(vol)
    with pytest.raises(ValueError, match="cubic grid"):
        DynamicImage(VIEWS)(vol)
    assert Projection("dynamic_image")(vol).shape == (1, 6, 6)  # single views work on any grid


@pytest.mark.parametrize("shape", [(6, 6, 6), (2, 6, 6, 6), (1, 6, 6), (1, 1, 6, 6, 6)])
def test_input_must_be_a_single_channel_3d_volume(shape):
    with pytest.raises(ValueError, match=r"\(1, X, Y, Z\)"):
        Projection("entropy")(np.zeros(shape, dtype=np.float32))


def test_projection_of_loaded_nifti_scans_collates(tmp_path):
    nib = pytest.importorskip("nibabel")

    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    items = []
    for i in range(2):
        path = tmp_path / f"scan_{i}.nii.gz"
        nib.save(nib.Nifti1Image(_blob_volume((3, 4, 5), shape=(8, 8, 8), seed=i)[0], affine), str(path))
        items.append({"image": str(path), "label": i})
    transform = Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            Projectiond("image", "dynamic_image_views"),
        ]
    )
    batch = next(iter(DataLoader(Dataset(items, transform=transform), batch_size=2, num_workers=0)))
    image = batch["image"]
    assert isinstance(image, MetaTensor) and image.shape == (2, 3, 8, 8)
    assert image.affine.shape == (2, 3, 3)
    assert [p.rsplit("/", 1)[-1] for p in image.meta["filename_or_obj"]] == ["scan_0.nii.gz", "scan_1.nii.gz"]
    assert "spatial_shape" not in image.meta


# ---------------------------------------------------------------------------------------------------------------
# Template centre
# ---------------------------------------------------------------------------------------------------------------


def test_template_centre_is_the_centre_of_the_template_striatum_on_the_working_grid():
    from scripts.anatomy import template_rois
    from scripts.projections import template_centre, template_grid_affine

    affine = template_grid_affine((64, 64, 64))
    striatum = template_rois((64, 64, 64), affine)["striatum"]
    for view, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        present = np.flatnonzero(striatum.any(axis=tuple(a for a in range(3) if a != axis)))
        assert template_centre((64, 64, 64), view) == (present[0] + present[-1]) // 2
    # the atlas-based centre of the original study: axial slice 27 of 64 (striatum slices 21..33)
    assert [template_centre((64, 64, 64), v) for v in VIEWS] == [27, 37, 31]


def test_template_centre_is_the_same_for_every_scan(tiny_phantom_dataset):
    """Every phantom scan (different subjects, poses, classes) gets the same slices; ``auto`` does not."""
    import json

    from conftest import config_preprocessing

    preprocess = config_preprocessing(spatial_size=(32, 32, 32))
    root = tiny_phantom_dataset.parent
    entries = [e for split in ("training", "test") for e in json.loads(tiny_phantom_dataset.read_text())[split]][:12]
    template, auto = AdjacentSlices(VIEWS, centre="template", num_slices=3), AdjacentSlices(VIEWS, centre="auto")
    centres = {"template": set(), "auto": set()}
    for entry in entries:
        image = preprocess({"image": str(root / entry["image"])})["image"]
        centres["template"].add(tuple(template.centres(image).values()))
        centres["auto"].add(tuple(auto.centres(image).values()))
        out = template(image)
        assert out.meta["slice_centre"] == template.centres(image)  # the centres used travel with the image
    assert len(centres["template"]) == 1 and len(centres["auto"]) > 1


def test_a_hot_spot_outside_the_striatum_moves_auto_but_not_template():
    from scripts.projections import template_grid_affine

    affine = torch.as_tensor(template_grid_affine((32, 32, 32)))
    vol = _blob_volume([(10, 19, 13), (21, 19, 13)], shape=(32, 32, 32), amplitude=3.0)
    hot = _blob_volume([(10, 19, 13), (21, 19, 13), (16, 8, 26)], shape=(32, 32, 32), amplitude=3.0)
    hot[0, 14:19, 6:11, 24:29] += 8.0  # a bright artefact high and posterior
    for name, centre in (("template", "template"), ("auto", "auto")):
        slicer = AdjacentSlices("axial", centre=centre)
        a = slicer.centres(MetaTensor(torch.as_tensor(vol), affine=affine))
        b = slicer.centres(MetaTensor(torch.as_tensor(hot), affine=affine))
        assert (a == b) == (name == "template"), (name, a, b)


def test_template_centre_of_a_scan_outside_mni_space_says_so():
    from scripts.errors import InputError

    far = torch.eye(4, dtype=torch.float64)
    far[:3, 3] = 1000.0  # the grid lies far from the template striatum
    image = MetaTensor(torch.zeros(1, 16, 16, 16), affine=far, meta={"filename_or_obj": "scan.nii.gz"})
    with pytest.raises(InputError, match=r"scan.nii.gz: the template striatum .* MNI space"):
        AdjacentSlices("axial", centre="template")(image)


def test_configs_use_the_template_centre_by_default():
    import json

    from conftest import BUNDLE_ROOT

    config = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())
    assert config["slice_centre"] == "template"
    assert config["projection_transform"]["dynamic_image_variant"] == "@dynamic_image_variant"
    with pytest.raises(ValueError, match="'template' or 'auto'"):
        Projection("single_slice", centre="middle")
