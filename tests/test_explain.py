# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Saliency (Grad-CAM, occlusion), placement in the working grid, attention agreement and faithfulness."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, MNI_AFFINE
from monai.data import MetaTensor
from scripts.explain import (
    LAYER_GEOMETRY,
    SALIENCY_METHODS,
    GradCAMSaliency,
    aligned_upsampler,
    attention_metrics,
    default_target_layer,
    deletion_scores,
    occlusion_saliency,
    place_in_volume,
    projection_planes,
    randomised_copy,
    roi_share,
    sample_planes,
    spearman,
    top_percent_iou,
)
from scripts.networks import Student2D, Teacher3D
from scripts.projections import PROJECTIONS, Projection, projection_spec
from torch import nn

pytestmark = pytest.mark.usefixtures("single_thread")


def _volume(size: int = 32, seed: int = 0) -> MetaTensor:
    """A random channel-first volume with a striatum-like hot spot, as a MetaTensor with a world affine."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(1, size, size, size, generator=g)
    c = size // 2
    v[:, c - 4 : c + 4, c - 2 : c + 5, c - 3 : c + 3] += 3.0
    return MetaTensor(v, affine=torch.as_tensor(MNI_AFFINE))


# ---------------------------------------------------------------------------------------------------------------
# Grad-CAM shapes and ranges
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SALIENCY_METHODS)
def test_gradcam_of_the_teacher_is_one_3d_map_in_unit_range(method):
    torch.manual_seed(0)
    teacher = Teacher3D("resnet10").eval()
    for p in teacher.parameters():  # a frozen teacher (as loaded for distillation) still gets its map
        p.requires_grad_(False)
    cam = GradCAMSaliency(teacher, method)
    assert cam.target_layer == "encoder.layer2" == default_target_layer(teacher)
    result = cam(_volume().as_tensor()[None], class_idx=1)
    assert result.maps.shape == (1, 32, 32, 32)
    assert float(result.maps.min()) >= 0.0 and float(result.maps.max()) == pytest.approx(1.0)
    assert result.class_idx == 1 and result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_gradcam_of_every_student_projection_gives_one_map_per_channel(projection):
    torch.manual_seed(0)
    spec = projection_spec(projection, num_slices=3, gap=1 if projection == "single_slice" else 0)
    student = Student2D("resnet10", projection=projection, gap=1 if projection == "single_slice" else 0).eval()
    image = Projection(projection, gap=1 if projection == "single_slice" else 0)(_volume())
    result = GradCAMSaliency(student)(image.as_tensor()[None])
    assert result.maps.shape == (spec.in_channels, 32, 32)
    assert float(result.maps.min()) >= 0.0 and float(result.maps.max()) <= 1.0 + 1e-6
    assert float(result.maps.max()) in (0.0, pytest.approx(1.0))  # scaled by the maximum (or empty)
    if spec.fusion == "early" and spec.in_channels > 1:  # one map for all channels: the first conv mixes them
        assert torch.equal(result.maps[0], result.maps[-1])


def test_densenet_backbones_have_a_target_layer():
    student = Student2D("densenet121", projection="joint_fusion_slices").eval()
    assert default_target_layer(student) == "encoder.encoder.features.denseblock2"
    assert GradCAMSaliency(student)(torch.rand(1, 3, 32, 32)).maps.shape == (3, 32, 32)


def test_joint_fusion_maps_are_each_channels_own():
    """The shared branch runs once per channel: each channel's map must use that channel's activations and
    gradients. With the head reading only channel 1's embedding, channels 0 and 2 get empty maps and channel 1
    the Grad-CAM computed by hand."""
    torch.manual_seed(0)
    student = Student2D("resnet10", projection="joint_fusion_slices").eval()
    with torch.no_grad():
        student.head.weight[:, :512] = 0
        student.head.weight[:, 1024:] = 0
    x = torch.rand(1, 3, 32, 32)
    result = GradCAMSaliency(student)(x, class_idx=1)
    assert float(result.maps[0].abs().max()) == 0.0 and float(result.maps[2].abs().max()) == 0.0
    assert float(result.maps[1].max()) == pytest.approx(1.0)
    # by hand: layer-2 activations of channel 1 and the gradient of the PD logit with respect to them
    branch = student.encoder.encoder
    acts = {}
    handle = branch.layer2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    embeddings = [branch(x[:, k : k + 1]) for k in range(3)]
    handle.remove()
    logits = student.head(torch.cat(embeddings, dim=1))
    # the hook kept the last call (channel 2): recompute channel 1 with its own graph
    handle = branch.layer2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    e1 = branch(x[:, 1:2])
    handle.remove()
    logits = student.head(torch.cat([embeddings[0].detach(), e1, embeddings[2].detach()], dim=1))
    (grad,) = torch.autograd.grad(logits[0, 1], acts["a"])
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * acts["a"]).sum(1, keepdim=True))
    cam = aligned_upsampler(*LAYER_GEOMETRY["resnet10"])((32, 32))(cam)[0, 0]
    assert torch.allclose(result.maps[1], cam / cam.max(), atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet10", "densenet121"])
def test_maps_are_put_back_where_the_feature_cells_look(backbone):
    """The receptive-field centre of a target-layer cell ``j`` (centroid of ``|d a_j / d x|``) is where the
    upsampler puts it, ``stride · j + offset``; MONAI's default upsampler puts it half a cell further."""
    torch.manual_seed(0)
    net = Student2D(backbone, projection="single_slice").eval()
    stride, offset = LAYER_GEOMETRY[backbone]
    layer = dict(net.named_modules())[default_target_layer(net)]
    acts = {}
    layer.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    errors = []
    for trial in range(3):
        x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(trial)).requires_grad_(True)
        net(x)
        for j in [(3, 4), (2, 5), (4, 3)]:
            (g,) = torch.autograd.grad(acts["a"][0, :, j[0], j[1]].sum(), x, retain_graph=True)
            w = g[0, 0].abs()
            grid = torch.stack(torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij"))
            errors.append((grid * w).flatten(1).sum(1) / w.sum() - stride * torch.tensor(j, dtype=torch.float32))
    measured = torch.stack(errors).mean(0)
    assert torch.all((measured - offset).abs() < 1.5), measured
    if backbone == "resnet10":  # the teacher's backbone: MONAI's default would put the cell 3.5 pixels away
        assert torch.all((measured - (stride - 1) / 2).abs() > 1.5)
    # and the upsampler puts a single cell exactly there
    cell = torch.zeros(1, 1, 8, 8)
    cell[0, 0, 3, 4] = 1.0
    up = aligned_upsampler(stride, offset)((64, 64))(cell)[0, 0]
    peak = divmod(int(up.argmax()), 64)
    assert peak == (int(3 * stride + offset), int(4 * stride + offset))


# ---------------------------------------------------------------------------------------------------------------
# A hand-made network whose decision depends on one known region
# ---------------------------------------------------------------------------------------------------------------


class RegionNet(nn.Module):
    """HC logit = mean uptake inside ``region``, PD logit = its negative; everything outside is ignored.

    ``features`` (a fixed 1x1 convolution) holds the uptake inside and outside the region as two channels: the
    Grad-CAM target layer.
    """

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        dims = region.ndim
        self.register_buffer("gates", torch.stack([region, ~region]).float()[None])
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.features = conv(2, 2, 1, groups=2, bias=False)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[4.0, 0.0], [-4.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([-3.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x.mean(1, keepdim=True) * self.gates)
        return self.head(a.flatten(2).mean(2) * self.gates[0, 0].numel() / self.gates[0, 0].sum())


@pytest.mark.parametrize("dims", [2, 3])
def test_saliency_of_a_handmade_network_lies_in_its_decisive_region(dims):
    size = 32
    region = torch.zeros((size,) * dims, dtype=torch.bool)
    region[(slice(6, 14),) * dims] = True
    net = RegionNet(region).eval()
    x = 0.5 + 0.5 * torch.rand(1, 3 if dims == 2 else 1, *(size,) * dims, generator=torch.Generator().manual_seed(1))
    cam = GradCAMSaliency(net, target_layer="features")(x, class_idx=0)
    assert roi_share(cam.maps, region.expand_as(cam.maps)) == pytest.approx(1.0, abs=0.02)
    occ = occlusion_saliency(net, x, class_idx=0, mask_size=8, overlap=0.5)
    near = torch.zeros_like(region)
    near[(slice(0, 20),) * dims] = True  # the region grown by the occlusion patch (a patch's output fills it)
    assert roi_share(occ.maps, near.expand_as(occ.maps)) > 0.99
    assert roi_share(occ.maps, region.expand_as(occ.maps)) > 0.4
    # deleting along the map removes the evidence faster than deleting at random
    scores = deletion_scores(net, x, cam.maps.expand_as(x[0]), 0, fractions=(0.0, 0.02, 0.05, 0.1, 0.2))
    assert scores["deletion_gap"] > 0.2


# ---------------------------------------------------------------------------------------------------------------
# Placement in the working grid
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_student_maps_are_placed_where_the_projection_took_its_channels(projection):
    volume = _volume()
    image = Projection(projection, centre="auto")(volume)
    planes = projection_planes(image)
    assert planes.shape == (image.shape[0], 2)
    vol = volume[0].as_tensor()
    if (planes[:, 1] >= 0).all():  # slices: the image is the volume on its planes, and goes back there
        assert torch.equal(sample_planes(vol, planes), image.as_tensor())
        placed, support = place_in_volume(image.as_tensor(), planes, vol.shape)
        assert torch.equal(placed[support], vol[support]) and not bool(placed[~support].any())
        expected = torch.zeros(vol.shape, dtype=torch.bool)
        for axis, index in planes.tolist():
            expected.movedim(axis, 0)[index] = True
        assert torch.equal(support, expected)
    else:  # whole-stack channels cover their whole axis
        placed, support = place_in_volume(torch.ones_like(image.as_tensor()), planes, vol.shape)
        assert bool(support.all()) and bool((placed == 1).all())
        assert sample_planes(vol, planes).shape == image.shape


def test_projection_planes_follow_a_fixed_centre_and_are_required():
    image = Projection("early_fusion_views_slices", centre=[10, 12, 14], num_slices=3)(_volume())
    rows = projection_planes(image).tolist()
    assert rows == [[2, 9], [2, 10], [2, 11], [1, 11], [1, 12], [1, 13], [0, 13], [0, 14], [0, 15]]
    with pytest.raises(ValueError, match="projection_planes"):
        projection_planes(torch.zeros(3, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# Agreement metrics on hand-made maps
# ---------------------------------------------------------------------------------------------------------------


def test_agreement_of_identical_and_disjoint_maps():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 16, 16, generator=g)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert top_percent_iou(a, a, 10) == pytest.approx(1.0)
    left, right = torch.zeros(16, 16), torch.zeros(16, 16)
    left[:, :8], right[:, 8:] = 1.0, 1.0
    assert top_percent_iou(left, right, 10) == 0.0
    assert np.isnan(top_percent_iou(left, torch.zeros(16, 16), 10))  # an empty map agrees with nothing
    assert roi_share(left, left > 0) == pytest.approx(1.0) and roi_share(left, right > 0) == 0.0
    assert np.isnan(roi_share(torch.zeros(4), torch.ones(4)))
    assert np.isnan(spearman(torch.ones(10), torch.rand(10)))


def test_attention_metrics_compare_teacher_and_student_on_the_students_planes():
    shape = (32, 32, 32)
    rois = {k: np.zeros(shape, bool) for k in ("caudate_L", "caudate_R", "putamen_L", "putamen_R")}
    rois["caudate_L"][8:12, 10:20, 10:20] = True
    rois["putamen_R"][20:26, 10:20, 10:20] = True
    rois["putamen_post_L"] = np.zeros(shape, bool)
    rois["putamen_post_R"] = rois["putamen_R"] & (np.arange(32)[None, :, None] < 15)
    rois["striatum"] = rois["caudate_L"] | rois["putamen_R"]
    teacher = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * torch.as_tensor(rois["striatum"])
    planes = torch.tensor([[2, 14], [2, 15], [2, 16]])
    same = sample_planes(teacher, planes)
    m = attention_metrics(rois, teacher, same, planes, top_percent=10)
    assert m["spearman_striatum"] == pytest.approx(1.0) and m["top10_iou"] == pytest.approx(1.0)
    assert m["teacher_striatum_share"] == pytest.approx(1.0) and m["student_striatum_share"] == pytest.approx(1.0)
    assert m["student_caudate_share"] + m["student_putamen_share"] == pytest.approx(1.0)
    assert 0 < m["student_striatum_chance"] < 0.2 and 0 < m["teacher_striatum_chance"] < 0.05
    outside = torch.zeros(3, 32, 32)
    outside[:, :4, :4] = 1.0  # all the student's mass outside the striatum, away from the teacher's
    m = attention_metrics(rois, teacher, outside, planes, top_percent=10)
    assert m["student_striatum_share"] == 0.0 and m["top10_iou"] == 0.0


def test_randomised_copy_changes_every_weight_reproducibly():
    torch.manual_seed(0)
    net = Student2D("resnet10", projection="early_fusion_slices")
    a, b = randomised_copy(net, seed=3), randomised_copy(net, seed=3)
    for (name, p), q, r in zip(net.named_parameters(), a.parameters(), b.parameters()):
        assert torch.equal(q, r), name
        if p.ndim > 1:
            assert not torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------------------------
# The split-level evaluation through configs/explain.json
# ---------------------------------------------------------------------------------------------------------------


def test_explain_config_writes_per_scan_and_summary_numbers(tiny_phantom_dataset, tmp_path):
    from monai.bundle import ConfigWorkflow

    torch.manual_seed(0)
    models = tmp_path / "models"
    models.mkdir()
    torch.save(Teacher3D("resnet10").state_dict(), models / "teacher.pt")
    torch.save({"model": Student2D("resnet18").state_dict()}, models / "model.pt")
    torch.save(Student2D("resnet18").state_dict(), models / "model_nokd.pt")
    dataset = tiny_phantom_dataset.parent
    wf = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "explain.json"),
        meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(tmp_path),
        dataset_dir=str(dataset),
        spatial_size=[32, 32, 32],
        run_name="explain",
        occlusion_scans=1,
        deletion_fractions=[0.0, 0.05, 0.2],
    )
    wf.initialize()
    wf.run()
    out = tmp_path / "eval" / "explain"
    test = json.loads((dataset / "datalist.json").read_text())["test"]
    with (out / "attention_per_scan.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(test)
    assert {r["model"] for r in rows} == {"teacher", "kd_student", "nokd_student"}
    student = next(r for r in rows if r["model"] == "kd_student")
    for key in ("spearman_striatum", "top10_iou", "student_putamen_post_share", "deletion_gap", "randomised_spearman"):
        assert key in student
    assert "occlusion_spearman" in student and "occlusion_striatum_share" in rows[0]
    summary = json.loads((out / "attention_summary.json").read_text())
    assert summary["n_scans"] == len(test) and set(summary["models"]) == {"teacher", "kd_student", "nokd_student"}
    assert summary["models"]["teacher"]["teacher_striatum_share"]["n"] == len(test)
    assert "teacher_striatum_share" not in summary["models"]["kd_student"]  # the teacher's numbers are its own
    share = summary["models"]["kd_student"]["student_striatum_share"]["mean"]
    assert share is None or 0.0 <= share <= 1.0
    assert summary["settings"]["target_layers"]["kd_student"] == "encoder.encoder.layer2"


def test_explain_config_names_a_missing_checkpoint(tiny_phantom_dataset, tmp_path):
    from monai.bundle import ConfigWorkflow
    from scripts.errors import find_input_error

    wf = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "explain.json"),
        workflow_type="infer",
        bundle_root=str(tmp_path),
        dataset_dir=str(tiny_phantom_dataset.parent),
        spatial_size=[32, 32, 32],
    )
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    assert str(Path(tmp_path) / "models" / "teacher.pt") in str(find_input_error(err.value))
