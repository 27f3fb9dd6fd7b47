# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Relational graph, decorrelation, soft-target and total distillation losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scripts.losses import KERNELS, DecorrelationLoss, DistillationLoss, HintonKDLoss, RelationalGraphLoss, graph_matrix

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- straightforward numpy references
def np_normalise(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        out[i] = row / max(math.sqrt(float(np.sum(row * row))), eps)
    return out


def np_graph(x: np.ndarray, kernel: str, k: int = 5, eps: float = 1e-8) -> np.ndarray:
    x = x.astype(np.float64)
    b = x.shape[0]
    if kernel == "dot":
        gram = x @ x.T
        return gram / max(np.abs(gram).max(), eps * eps)
    xn = np_normalise(x, eps)
    cos = xn @ xn.T
    if kernel == "cosine":
        return cos
    dist = np.array([[np.linalg.norm(xn[i] - xn[j]) for j in range(b)] for i in range(b)])
    if kernel == "rbf":
        kth = [sorted(dist[i])[min(k, b) - 1] for i in range(b)]  # k-th nearest counting the row itself
        sigma = max(float(np.mean(kth)), eps)
        return np.exp(-(dist**2) / (2 * sigma**2))
    out = np.zeros((b, b))
    for i in range(b):
        others = sorted((dist[i, j], j) for j in range(b) if j != i)
        for _, j in others[: min(k, b - 1)]:
            out[i, j] = cos[i, j]
    return out


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_graph_loss(a: np.ndarray, b: np.ndarray, kernel: str = "cosine", k: int = 5) -> float:
    return float(np.mean((np_graph(a, kernel, k) - np_graph(b, kernel, k)) ** 2))


# ---------------------------------------------------------------- graph_matrix
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_graph_matrix_matches_numpy(kernel, batch):
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, 6))
    got = graph_matrix(torch.tensor(x, dtype=torch.float64), kernel=kernel, k=4).numpy()
    np.testing.assert_allclose(got, np_graph(x, kernel, k=4), rtol=1e-10, atol=1e-12)


def test_graph_matrix_known_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    s = 1 / math.sqrt(2)
    expected_cos = torch.tensor([[1.0, 0.0, s], [0.0, 1.0, s], [s, s, 1.0]])
    torch.testing.assert_close(graph_matrix(x, "cosine"), expected_cos)
    # dot: raw Gram [[1,0,3],[0,4,6],[3,6,18]] divided by its largest entry 18
    expected_dot = torch.tensor([[1.0, 0.0, 3.0], [0.0, 4.0, 6.0], [3.0, 6.0, 18.0]]) / 18
    torch.testing.assert_close(graph_matrix(x, "dot"), expected_dot)
    # knn with k=1: each row keeps only its most similar other row
    knn = graph_matrix(x, "knn", k=1)
    assert (knn != 0).sum(dim=1).tolist() == [1, 1, 1]
    torch.testing.assert_close(knn.diagonal(), torch.zeros(3))


def test_graph_matrix_batch_of_one():
    x = torch.tensor([[0.3, -2.0, 1.0]])
    assert graph_matrix(x, "cosine").item() == pytest.approx(1.0)
    assert graph_matrix(x, "dot").item() == pytest.approx(1.0)
    assert graph_matrix(x, "rbf").item() == pytest.approx(1.0)
    assert graph_matrix(x, "knn").item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", ["one_zero_row", "all_zero", "single_zero_row"])
def test_graph_matrix_finite_for_zero_rows(kernel, rows):
    if rows == "one_zero_row":
        x = torch.randn(4, 5)
        x[2] = 0.0
    elif rows == "all_zero":
        x = torch.zeros(4, 5)
    else:
        x = torch.zeros(1, 5)
    x.requires_grad_(True)
    s = graph_matrix(x, kernel=kernel, k=2)
    assert torch.isfinite(s).all()
    (s * torch.randn_like(s)).sum().backward()
    assert torch.isfinite(x.grad).all()
    if kernel == "cosine" and rows == "one_zero_row":
        assert s[2].abs().max().item() == 0 and s[0, 0].item() == pytest.approx(1.0)


def test_graph_matrix_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel"):
        graph_matrix(torch.randn(3, 2), kernel="laplace")
    with pytest.raises(ValueError, match=r"2D \(B, D\)"):
        graph_matrix(torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match="k must"):
        graph_matrix(torch.randn(3, 2), kernel="rbf", k=0)


# ---------------------------------------------------------------- RelationalGraphLoss
@pytest.mark.parametrize("kernel", KERNELS)
def test_graph_loss_is_zero_for_identical_embeddings(kernel):
    x = torch.randn(6, 10)
    assert RelationalGraphLoss(kernel, k=3)(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kernel", ["cosine", "rbf", "knn"])
def test_graph_loss_invariant_to_scaling_rows(kernel):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 4)
    scale = torch.rand(6, 1) * 10 + 0.1
    loss = RelationalGraphLoss(kernel, k=3)
    torch.testing.assert_close(loss(student * scale, teacher), loss(student, teacher))
    torch.testing.assert_close(loss(student, 1e3 * teacher), loss(student, teacher))


def test_dot_kernel_invariant_to_global_scale_but_not_per_row():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 4)
    loss = RelationalGraphLoss("dot")
    torch.testing.assert_close(loss(7.5 * student, teacher), loss(student, teacher))
    scale = torch.linspace(0.1, 3.0, 6)[:, None]
    assert not torch.allclose(loss(student * scale, teacher), loss(student, teacher))


@pytest.mark.parametrize("kernel", KERNELS)
def test_graph_loss_matches_numpy_with_different_widths(kernel):
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(7, 12)), rng.normal(size=(7, 3))
    got = RelationalGraphLoss(kernel, k=3)(torch.tensor(student), torch.tensor(teacher)).item()
    assert got == pytest.approx(np_graph_loss(student, teacher, kernel, k=3), rel=1e-9)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradient_step_on_student_reduces_graph_loss(kernel):
    torch.manual_seed(0)
    student = torch.randn(8, 6, requires_grad=True)
    teacher = torch.randn(8, 3, requires_grad=True)
    loss_fn = RelationalGraphLoss(kernel, k=3)
    before = loss_fn(student, teacher)
    before.backward()
    assert teacher.grad is None  # the teacher side is detached
    with torch.no_grad():
        after = loss_fn(student - 1e-2 * student.grad, teacher)
    assert before.item() > 0
    assert after.item() < before.item()


def test_graph_loss_finite_for_zero_embeddings_and_batch_of_one():
    g = torch.Generator().manual_seed(7)
    student = torch.zeros(4, 5, requires_grad=True)
    teacher = torch.relu(-torch.rand(4, 3, generator=g))  # all-zero "dead ReLU" teacher embedding
    loss = RelationalGraphLoss()(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # a batch of one has a 1x1 graph on both sides: the loss is zero up to rounding (it was 3.6e-15 on one machine)
    one = torch.randn(1, 5, generator=g).requires_grad_(True)
    loss1 = RelationalGraphLoss()(one, torch.randn(1, 3, generator=g))
    loss1.backward()
    assert loss1.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(one.grad).all()


def test_graph_loss_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="same batch size"):
        RelationalGraphLoss()(torch.randn(4, 5), torch.randn(3, 5))


# ---------------------------------------------------------------- DecorrelationLoss
def test_decorrelation_loss_matches_numpy_and_is_zero_for_orthogonal_rows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 4))
    expected = float(np.mean((np_graph(x, "cosine") - np.eye(5)) ** 2))
    assert DecorrelationLoss()(torch.tensor(x)).item() == pytest.approx(expected, rel=1e-10)
    orthogonal = torch.eye(4)[:3] * torch.tensor([[2.0], [0.5], [9.0]])
    assert DecorrelationLoss()(orthogonal).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- HintonKDLoss
def test_hinton_kd_matches_manual_computation():
    rng = np.random.default_rng(3)
    zs, zt = rng.normal(size=(5, 3)) * 3, rng.normal(size=(5, 3)) * 3
    t = 4.0
    log_ps, log_pt = np_log_softmax(zs / t), np_log_softmax(zt / t)
    expected = t * t * float(np.sum(np.exp(log_pt) * (log_pt - log_ps))) / 5
    got = HintonKDLoss(temperature=t)(torch.tensor(zs), torch.tensor(zt)).item()
    assert got == pytest.approx(expected, rel=1e-10)
    assert HintonKDLoss()(torch.tensor(zs), torch.tensor(zs)).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        HintonKDLoss()(torch.randn(5, 3), torch.randn(5, 2))


# ---------------------------------------------------------------- DistillationLoss
def _batch(b: int = 6, c: int = 2, ds: int = 9, dt: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g, dtype=torch.float64, requires_grad=True)
    fs = torch.randn(b, ds, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(b, c, generator=g, dtype=torch.float64)
    ft = torch.relu(torch.randn(b, dt, generator=g, dtype=torch.float64))
    y = torch.randint(0, c, (b,), generator=g)
    return zs, fs, y, zt, ft


def _np_ce(z: torch.Tensor, y: torch.Tensor) -> float:
    log_p = np_log_softmax(z.detach().numpy())
    return float(-np.mean(log_p[np.arange(len(y)), y.numpy()]))


def test_distillation_graph_mode_terms_and_total():
    zs, fs, y, zt, ft = _batch()
    loss_fn = DistillationLoss(cls_weight=1.0, fg_weight=5.0, lg_weight=2.0, decor_weight=0.5, temperature=5.0)
    out = loss_fn(zs, fs, y, zt, ft)
    z_np, t = zs.detach().numpy(), 5.0
    expected = {
        "ce": _np_ce(zs, y),
        "fg": np_graph_loss(fs.detach().numpy(), ft.numpy()),
        "lg": np_graph_loss(np_log_softmax(z_np / t), np_log_softmax(zt.numpy() / t)),
        "decor": float(np.mean((np_graph(fs.detach().numpy(), "cosine") - np.eye(6)) ** 2)),
    }
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, rel=1e-9), name
        assert not out[name].requires_grad
    total = 1.0 * expected["ce"] + 5.0 * expected["fg"] + 2.0 * expected["lg"] + 0.5 * expected["decor"]
    assert out["loss"].item() == pytest.approx(total, rel=1e-9)
    out["loss"].backward()
    assert torch.isfinite(zs.grad).all() and fs.grad.abs().sum() > 0


def test_distillation_hinton_mode_uses_soft_target_kl():
    zs, fs, y, zt, ft = _batch(seed=1)
    out = DistillationLoss(fg_weight=1.0, lg_weight=3.0, temperature=2.0, mode="hinton")(zs, fs, y, zt, ft)
    log_ps, log_pt = np_log_softmax(zs.detach().numpy() / 2), np_log_softmax(zt.numpy() / 2)
    kd = 4.0 * float(np.sum(np.exp(log_pt) * (log_pt - log_ps))) / 6
    assert out["lg"].item() == pytest.approx(kd, rel=1e-9)
    fg = np_graph_loss(fs.detach().numpy(), ft.numpy())
    assert out["loss"].item() == pytest.approx(_np_ce(zs, y) + fg + 3.0 * kd, rel=1e-9)


def test_distillation_without_teacher_is_cross_entropy_on_raw_logits():
    zs, fs, y, _, _ = _batch(seed=2)
    out = DistillationLoss(cls_weight=2.0, decor_weight=1.0)(zs, fs, y)
    ce = _np_ce(zs, y)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["loss"].item() == pytest.approx(2.0 * ce, rel=1e-10)
    assert out["fg"].item() == out["lg"].item() == out["decor"].item() == 0.0
    # a second softmax would change the value: CE on probabilities is not what is computed
    assert _np_ce(torch.softmax(zs, dim=1), y) != pytest.approx(ce, rel=1e-3)


def test_distillation_skips_terms_with_zero_weight(monkeypatch):
    zs, fs, y, zt, ft = _batch(seed=3)
    loss_fn = DistillationLoss(fg_weight=0.0, lg_weight=1.0)

    def forbidden(*args, **kwargs):
        raise AssertionError("a zero-weight term was computed")

    monkeypatch.setattr(loss_fn.decorrelation, "forward", forbidden)
    calls = []
    original = loss_fn.graph.forward
    monkeypatch.setattr(loss_fn.graph, "forward", lambda s, t: calls.append(s.shape) or original(s, t))
    out = loss_fn(zs, fs, y, zt, ft)
    assert calls == [torch.Size([6, 2])]  # only the logit graph
    assert out["fg"].item() == 0.0 and out["decor"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["lg"].item(), rel=1e-12)


def test_distillation_accepts_column_and_integral_float_targets():
    zs, fs, y, zt, ft = _batch(seed=4)
    loss_fn = DistillationLoss()
    ref = loss_fn(zs, fs, y, zt, ft)["loss"]
    torch.testing.assert_close(loss_fn(zs, fs, y[:, None], zt, ft)["loss"], ref)
    torch.testing.assert_close(loss_fn(zs, fs, y.double()[:, None], zt, ft)["loss"], ref)


def test_distillation_validates_shapes():
    zs, fs, y, zt, ft = _batch()
    loss_fn = DistillationLoss()
    with pytest.raises(ValueError, match="student_logits must be 2D"):
        loss_fn(zs[:, 0], fs, y, zt, ft)
    with pytest.raises(ValueError, match="student_embedding batch size"):
        loss_fn(zs, fs[:4], y, zt, ft)
    with pytest.raises(ValueError, match="target must have shape"):
        loss_fn(zs, fs, y[:3], zt, ft)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        loss_fn(zs, fs, y, torch.randn(6, 3), ft)
    with pytest.raises(ValueError, match="teacher_embedding batch size"):
        loss_fn(zs, fs, y, zt, ft[:5])
    with pytest.raises(ValueError, match="needs teacher_embedding"):
        loss_fn(zs, fs, y, zt, None)
    with pytest.raises(ValueError, match="integer class indices"):
        loss_fn(zs, fs, y.double() + 0.5, zt, ft)
    with pytest.raises(ValueError, match="mode"):
        DistillationLoss(mode="peng")
