# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Teacher / student networks: shapes, embedding taps, weight sharing of joint fusion, TorchScript export."""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch
from monai.networks.nets import DenseNet121, ResNet, resnet18
from scripts.networks import BACKBONES, SharedChannelEncoder, Student2D, Teacher3D, build_encoder
from torch import nn

pytestmark = pytest.mark.usefixtures("single_thread")


VOL = (2, 1, 32, 32, 32)  # smallest comfortable size: the stem + max pool + 3 stride-2 stages divide by 32
IMG = 32


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("backbone", "dim"), [("resnet10", 512), ("resnet18", 512), ("densenet121", 1024)])
def test_teacher_shapes_and_logits_are_head_of_embedding(backbone, dim):
    torch.manual_seed(0)
    net = Teacher3D(backbone).eval()
    x = torch.randn(*VOL)
    with torch.no_grad():
        logits, emb = net.forward_with_embedding(x)
        plain = net(x)
    assert net.embedding_dim == dim
    assert logits.shape == (2, 2) and emb.shape == (2, dim)
    torch.testing.assert_close(plain, logits, rtol=0, atol=0)
    manual = emb @ net.head.weight.t() + net.head.bias
    torch.testing.assert_close(logits, manual)


def test_teacher_resnet10_matches_monai_reference_network():
    """The default teacher is MONAI ResNet [1,1,1,1], stride-2 7³ stem, max pool, bias-free B shortcuts."""
    torch.manual_seed(0)
    ref = ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        no_max_pool=False,
        shortcut_type="B",
        bias_downsample=False,
        num_classes=2,
    ).eval()
    net = Teacher3D("resnet10").eval()
    assert _n_params(net) == _n_params(ref)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    net.encoder.load_state_dict(state)
    net.head.load_state_dict({"weight": ref.fc.weight, "bias": ref.fc.bias})
    x = torch.randn(*VOL)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))
    assert net.encoder.conv1.stride == (2, 2, 2) and net.encoder.conv1.kernel_size == (7, 7, 7)
    assert all(len(getattr(net.encoder, f"layer{i}")) == 1 for i in range(1, 5))
    assert net.encoder.layer2[0].downsample[0].bias is None


def test_densenet_embedding_is_input_of_last_linear_layer():
    torch.manual_seed(0)
    ref = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    net = Teacher3D("densenet121").eval()
    missing = net.encoder.load_state_dict(
        {k: v for k, v in ref.state_dict().items() if not k.startswith("class_layers.out.")}
    )
    assert not missing.missing_keys and not missing.unexpected_keys
    net.head.load_state_dict(ref.class_layers.out.state_dict())
    x = torch.randn(*VOL)
    captured = {}

    def keep_input(module, inputs, output):
        captured["in"] = inputs[0]

    ref.class_layers.out.register_forward_hook(keep_input)
    with torch.no_grad():
        ref_logits = ref(x)
        logits, emb = net.forward_with_embedding(x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(emb, captured["in"])
    assert (emb >= 0).all()  # taken after the final ReLU


def test_unknown_backbone_lists_valid_choices():
    with pytest.raises(ValueError, match="resnet10.*resnet18.*densenet121"):
        Teacher3D("vgg16")
    with pytest.raises(ValueError, match="Unknown backbone"):
        Student2D("vit", in_channels=1, fusion="early")
    with pytest.raises(ValueError, match="fusion"):
        Student2D(in_channels=3, fusion="late")
    assert set(BACKBONES) == {"resnet10", "resnet18", "densenet121"}


@pytest.mark.parametrize(
    ("backbone", "fusion", "dim"),
    [
        ("resnet18", "early", 512),
        ("resnet18", "joint", 3 * 512),
        ("resnet18", "mean", 512),
        ("densenet121", "early", 1024),
        ("densenet121", "joint", 3 * 1024),
        ("densenet121", "mean", 1024),
    ],
)
def test_student_shapes(backbone, fusion, dim):
    torch.manual_seed(0)
    net = Student2D(backbone, in_channels=3, fusion=fusion).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        logits, emb = net.forward_with_embedding(x)
        plain = net(x)
    assert net.embedding_dim == dim and net.head.in_features == dim
    assert logits.shape == (2, 2) and emb.shape == (2, dim)
    torch.testing.assert_close(plain, logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, emb @ net.head.weight.t() + net.head.bias)


def test_student_early_fusion_matches_monai_resnet18():
    torch.manual_seed(0)
    ref = resnet18(spatial_dims=2, n_input_channels=9, num_classes=2, conv1_t_stride=2, bias_downsample=False)
    ref.eval()
    net = Student2D("resnet18", in_channels=9, fusion="early").eval()
    assert _n_params(net) == _n_params(ref)
    net.encoder.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    net.head.load_state_dict(ref.fc.state_dict())
    x = torch.randn(2, 9, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))


def test_joint_fusion_has_one_shared_encoder():
    single, dim = build_encoder("resnet18", spatial_dims=2, in_channels=1)
    net = Student2D("resnet18", in_channels=3, fusion="joint")
    assert _n_params(net) == _n_params(single) + (3 * dim * 2 + 2)
    n_stems = sum(1 for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (7, 7))
    assert n_stems == 1


def test_joint_fusion_embedding_blocks_are_per_channel_encodings():
    torch.manual_seed(0)
    net = Student2D("resnet18", in_channels=3, fusion="joint").eval()
    x = torch.randn(2, 3, IMG, IMG)
    perm = [2, 0, 1]
    with torch.no_grad():
        emb = net.embed(x)
        emb_perm = net.embed(x[:, perm])
        blocks = [net.encoder.encoder(x[:, k : k + 1]) for k in range(3)]
    torch.testing.assert_close(emb, torch.cat(blocks, dim=1))
    torch.testing.assert_close(emb_perm, torch.cat([blocks[k] for k in perm], dim=1))
    assert not torch.allclose(emb_perm, emb)


def test_mean_fusion_averages_per_channel_encodings():
    torch.manual_seed(0)
    net = Student2D("resnet18", in_channels=3, fusion="mean").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        emb = net.embed(x)
        blocks = [net.encoder.encoder(x[:, k : k + 1]) for k in range(3)]
    torch.testing.assert_close(emb, (blocks[0] + blocks[1] + blocks[2]) / 3)


def test_gradient_of_one_joint_branch_reaches_the_shared_weights():
    torch.manual_seed(0)
    net = Student2D("resnet18", in_channels=3, fusion="joint").eval()
    x = torch.randn(2, 3, IMG, IMG)
    net.embed(x)[:, 512:1024].sum().backward()  # block of channel 1 only
    grad_joint = net.encoder.encoder.conv1.weight.grad.clone()
    net.zero_grad()
    net.encoder.encoder(x[:, 1:2]).sum().backward()
    grad_single = net.encoder.encoder.conv1.weight.grad
    assert grad_joint.abs().sum() > 0
    torch.testing.assert_close(grad_joint, grad_single)


@pytest.mark.parametrize(
    "make",
    [lambda: Teacher3D("resnet10"), lambda: Student2D(in_channels=3, fusion="early")],
    ids=["teacher", "student_early"],
)
def test_embedding_is_not_detached(make):
    """A loss on the embedding alone trains the encoder whose output the head classifies."""
    torch.manual_seed(0)
    net = make()
    shape = VOL if isinstance(net, Teacher3D) else (2, 3, IMG, IMG)
    logits, emb = net.forward_with_embedding(torch.randn(*shape))
    assert emb.requires_grad
    # the logits depend on exactly this tensor
    (g,) = torch.autograd.grad(logits.sum(), emb, retain_graph=True)
    torch.testing.assert_close(g, net.head.weight.sum(0).expand_as(emb))
    emb.pow(2).mean().backward()
    assert net.encoder.conv1.weight.grad is not None and net.encoder.conv1.weight.grad.abs().sum() > 0
    assert net.head.weight.grad is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: Teacher3D("resnet10"),
        lambda: Student2D("resnet18", in_channels=3, fusion="joint"),
        lambda: Student2D("resnet18", in_channels=2, fusion="mean"),
    ],
    ids=["teacher", "student_joint", "student_mean"],
)
def test_torchscript_round_trip(make):
    torch.manual_seed(0)
    net = make().eval()
    shape = VOL if isinstance(net, Teacher3D) else (2, net.in_channels, IMG, IMG)
    x = torch.randn(*shape)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        ref_logits, ref_emb = net.forward_with_embedding(x)
        torch.testing.assert_close(loaded(x), ref_logits)
        logits, emb = loaded.forward_with_embedding(x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(emb, ref_emb)


def test_shared_encoder_rejects_wrong_channel_count():
    net = Student2D("resnet18", in_channels=3, fusion="joint").eval()
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\)"):
        net(torch.randn(1, 9, IMG, IMG))
    with pytest.raises(ValueError, match="reduction"):
        SharedChannelEncoder(nn.Identity(), 4, 2, reduction="max")


def test_student_defaults_come_from_the_projection_spec(monkeypatch):
    calls = []

    def fake_spec(projection, num_slices, gap):
        calls.append((projection, num_slices, gap))
        return types.SimpleNamespace(in_channels=4, fusion="joint")

    fake = types.ModuleType("scripts.projections")
    fake.projection_spec = fake_spec
    monkeypatch.setitem(sys.modules, "scripts.projections", fake)
    net = Student2D(projection="some_projection", num_slices=4, gap=1)
    assert calls == [("some_projection", 4, 1)]
    assert (net.in_channels, net.fusion, net.embedding_dim) == (4, "joint", 4 * 512)
    override = Student2D(projection="some_projection", num_slices=4, gap=1, fusion="early")
    assert (override.in_channels, override.fusion, override.embedding_dim) == (4, "early", 512)
    calls.clear()
    Student2D(projection="some_projection", in_channels=1, fusion="early")
    assert calls == []  # fully explicit: the projection module is not consulted


def test_student_built_from_a_real_projection_name():
    from scripts.projections import projection_spec

    spec = projection_spec("joint_fusion_slices", 3, 0)
    net = Student2D(projection="joint_fusion_slices", num_slices=3, gap=0).eval()
    assert net.in_channels == spec.in_channels and net.fusion == spec.fusion
    with torch.no_grad():
        logits, emb = net.forward_with_embedding(torch.randn(2, spec.in_channels, IMG, IMG))
    assert logits.shape == (2, 2)
    per_branch = 512 * (spec.in_channels if spec.fusion == "joint" else 1)
    assert emb.shape == (2, per_branch)
