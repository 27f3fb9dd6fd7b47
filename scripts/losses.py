# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Relational (graph) knowledge-distillation losses between a 3D teacher and a 2D student.

The student and teacher embeddings may have different widths (e.g. 1536 vs 512): the losses never compare
embeddings directly, only the ``B × B`` similarity graphs that each network induces on the same batch.

* :func:`graph_matrix`: the ``B × B`` similarity graph of a batch of row vectors.
* :class:`RelationalGraphLoss`: mean squared difference of the student and teacher graphs. Applied to the
  pooled embeddings it is the feature-graph term ``L_fg``; applied to the temperature-scaled
  log-probabilities ``log_softmax(z / T)`` it is the logit-graph term ``L_lg``.
* :class:`DecorrelationLoss`: pulls the student graph towards the identity.
* :class:`HintonKDLoss`: the classic soft-target KL divergence, ``T²``-scaled.
* :class:`DistillationLoss`: the weighted total ``λ_cls·CE + λ_fg·L_fg + λ_lg·L_lg + λ_m·M`` with every term
  reported separately for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["KERNELS", "graph_matrix", "RelationalGraphLoss", "DecorrelationLoss", "HintonKDLoss", "DistillationLoss"]

KERNELS = ("cosine", "dot", "rbf", "knn")
"""Similarity kernels accepted by :func:`graph_matrix`."""


def _check_graph_args(kernel: str, k: int, eps: float) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"Unknown kernel {kernel!r}; expected one of {list(KERNELS)}.")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}.")


def _check_rows(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2D (B, D), got shape {tuple(x.shape)}.")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must contain at least one row, got shape {tuple(x.shape)}.")


def _safe_row_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``max(‖x_i‖₂, eps)`` as ``(B, 1)``, with a finite (zero) gradient for all-zero rows."""
    sq = x.pow(2).sum(dim=1, keepdim=True)
    return sq.clamp(min=eps * eps).sqrt()


def graph_matrix(x: torch.Tensor, kernel: str = "cosine", k: int = 5, eps: float = 1e-8) -> torch.Tensor:
    """
    ``B × B`` similarity graph of a batch of row vectors.

    Rows are first L2-normalised with a floor on the norm, ``x̂_i = x_i / max(‖x_i‖₂, eps)``, so an
    all-zero row (e.g. a dead ReLU embedding) becomes the zero vector instead of NaN. Kernels:

    * ``"cosine"``: :math:`S = \\hat X \\hat X^\\top`, the cosine similarities, in ``[-1, 1]`` with a unit
      diagonal (0 on the diagonal for an all-zero row).
    * ``"dot"``: the raw Gram matrix scaled by its largest absolute entry,
      :math:`S = X X^\\top / \\max(\\max_{ij} |X X^\\top|_{ij}, \\epsilon^2)`. Unlike ``"cosine"`` it keeps the
      relative norms of the rows (a short row has small similarities to everything); it is invariant to a
      common scaling of all rows but not to rescaling one row. By Cauchy-Schwarz the largest absolute entry
      is :math:`\\max_i \\lVert x_i \\rVert^2`, reached on the diagonal, so ``S`` lies in ``[-1, 1]``.
    * ``"rbf"``: :math:`S_{ij} = \\exp(-d_{ij}^2 / 2\\sigma^2)` with :math:`d_{ij} = \\lVert \\hat x_i - \\hat x_j
      \\rVert_2`. The bandwidth is adaptive: :math:`\\sigma = \\max(\\frac{1}{B}\\sum_i d_{i,(k)}, \\epsilon)` where
      :math:`d_{i,(k)}` is the distance from row ``i`` to its k-th nearest row counting row ``i`` itself
      (so the (k-1)-th other row); when ``B <= k`` the farthest row is used. Unit diagonal, values in
      ``(0, 1]``.
    * ``"knn"``: a differentiable k-nearest-neighbour graph,
      :math:`S_{ij} = \\hat x_i \\cdot \\hat x_j` if ``j`` is one of the ``min(k, B - 1)`` rows closest to row
      ``i`` (Euclidean distance between normalised rows, i.e. highest cosine similarity; row ``i`` itself
      excluded), else 0. The graph is not symmetric and has a zero diagonal. The neighbour selection is
      piecewise constant, so gradients flow only through the kept cosine similarities.

    Args:
        x: embeddings ``(B, D)``.
        kernel: one of :data:`KERNELS`.
        k: neighbourhood size for ``"rbf"`` and ``"knn"``.
        eps: floor on norms and on ``sigma``.

    Returns:
        ``(B, B)`` tensor with the dtype and device of ``x``. Values and gradients are finite for all-zero
        rows and for ``B = 1``.

    Raises:
        ValueError: ``x`` is not 2D or empty, unknown ``kernel``, ``k < 1`` or ``eps <= 0``.
    """
    _check_graph_args(kernel, k, eps)
    _check_rows(x, "x")
    batch = x.shape[0]
    if kernel == "dot":
        scale = _safe_row_norm(x, eps).max()
        xs = x / scale
        return xs @ xs.t()
    xn = x / _safe_row_norm(x, eps)
    if kernel == "cosine":
        return xn @ xn.t()
    # squared Euclidean distances from explicit differences: exactly 0 for identical rows (no cancellation).
    d2 = (xn.unsqueeze(1) - xn.unsqueeze(0)).pow(2).sum(dim=-1)
    if kernel == "rbf":
        dist = d2.clamp(min=eps * eps).sqrt()  # floored so that sqrt has a finite gradient at d = 0
        kth = min(k, batch)
        kth_dist = dist.topk(kth, dim=1, largest=False).values[:, -1]
        sigma = kth_dist.mean().clamp(min=eps)
        return torch.exp(-d2 / (2.0 * sigma * sigma))
    # knn
    cos = xn @ xn.t()
    n_neighbours = min(k, batch - 1)
    mask = torch.zeros_like(cos)
    if n_neighbours > 0:
        eye = torch.eye(batch, dtype=torch.bool, device=x.device)
        ranking = d2.detach().masked_fill(eye, float("inf"))
        idx = ranking.topk(n_neighbours, dim=1, largest=False).indices
        mask.scatter_(1, idx, 1.0)
    return cos * mask


class RelationalGraphLoss(nn.Module):
    """
    Relational (graph) distillation loss: mean squared difference of the batch similarity graphs.

    .. math::

        G(A, B) = \\frac{1}{B^2} \\sum_{i,j} \\big(S(A)_{ij} - S(B)_{ij}\\big)^2

    where ``S`` is :func:`graph_matrix` with the chosen kernel. This is the element mean over the ``B²``
    entries (not a sum, not a squared Frobenius norm). The teacher input is detached: gradients only reach
    the student. Used as ``L_fg = G(f_s, f_t)`` on pooled embeddings and as
    ``L_lg = G(log_softmax(z_s / T), log_softmax(z_t / T))`` on temperature-scaled log-probabilities.

    Args:
        kernel: one of :data:`KERNELS`.
        k: neighbourhood size for the ``"rbf"`` and ``"knn"`` kernels.
        eps: numerical floor (see :func:`graph_matrix`).

    Shapes:
        ``student``: ``(B, Ds)``; ``teacher``: ``(B, Dt)`` (``Ds`` and ``Dt`` may differ); output: scalar.
    """

    def __init__(self, kernel: str = "cosine", k: int = 5, eps: float = 1e-8) -> None:
        super().__init__()
        _check_graph_args(kernel, k, eps)
        self.kernel = kernel
        self.k = k
        self.eps = eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student rows ``(B, Ds)``.
            teacher: teacher rows ``(B, Dt)`` for the same batch in the same order.

        Returns:
            Scalar loss.

        Raises:
            ValueError: an input is not 2D, or the batch sizes differ.
        """
        _check_rows(student, "student")
        _check_rows(teacher, "teacher")
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"student and teacher must have the same batch size, got {student.shape[0]} and {teacher.shape[0]}."
            )
        s_student = graph_matrix(student, self.kernel, self.k, self.eps)
        s_teacher = graph_matrix(teacher.detach().to(student.dtype), self.kernel, self.k, self.eps)
        return (s_student - s_teacher).pow(2).mean()


class DecorrelationLoss(nn.Module):
    """
    Decorrelation (metric) regulariser: pulls the student's similarity graph towards the identity.

    .. math::

        M(X) = \\frac{1}{B^2} \\sum_{i,j} \\big(S(X)_{ij} - \\delta_{ij}\\big)^2

    With the cosine kernel the diagonal is 1 for every non-zero row, so ``M`` is the mean squared
    off-diagonal similarity: it pushes the embeddings of different samples towards orthogonality.

    Args:
        kernel: one of :data:`KERNELS`.
        k: neighbourhood size for the ``"rbf"`` and ``"knn"`` kernels.
        eps: numerical floor (see :func:`graph_matrix`).

    Shapes:
        ``x``: ``(B, D)``; output: scalar.
    """

    def __init__(self, kernel: str = "cosine", k: int = 5, eps: float = 1e-8) -> None:
        super().__init__()
        _check_graph_args(kernel, k, eps)
        self.kernel = kernel
        self.k = k
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: embeddings ``(B, D)``.

        Returns:
            Scalar loss.
        """
        s = graph_matrix(x, self.kernel, self.k, self.eps)
        eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
        return (s - eye).pow(2).mean()


class HintonKDLoss(nn.Module):
    """
    Soft-target knowledge distillation (Hinton et al., 2015).

    .. math::

        L = \\frac{T^2}{B} \\sum_{i=1}^{B} \\sum_{c} p^t_{ic} \\big(\\log p^t_{ic} - \\log p^s_{ic}\\big), \\qquad
        p^t = \\mathrm{softmax}(z_t / T), \\ p^s = \\mathrm{softmax}(z_s / T)

    i.e. ``T² · KL(p_t ‖ p_s)`` averaged over the batch ("batchmean"). The ``T²`` factor keeps the gradient
    magnitude comparable to the cross-entropy term across temperatures. The teacher logits are detached.

    Args:
        temperature: ``T > 0``.

    Shapes:
        ``student_logits``, ``teacher_logits``: ``(B, C)``; output: scalar.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits: raw student logits ``(B, C)``.
            teacher_logits: raw teacher logits ``(B, C)``.

        Returns:
            Scalar loss.

        Raises:
            ValueError: inputs are not 2D or their shapes differ.
        """
        _check_rows(student_logits, "student_logits")
        _check_rows(teacher_logits, "teacher_logits")
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                "student_logits and teacher_logits must have the same shape (B, C), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
            )
        t = self.temperature
        log_p_s = F.log_softmax(student_logits / t, dim=1)
        log_p_t = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss(nn.Module):
    """
    Total training loss of the 2D student: cross-entropy plus the distillation terms.

    ``mode="graph"`` (relational distillation):

    .. math::

        L = \\lambda_{cls} \\, \\mathrm{CE}(z_s, y) + \\lambda_{fg} \\, G(f_s, f_t)
            + \\lambda_{lg} \\, G(\\log \\mathrm{softmax}(z_s/T), \\log \\mathrm{softmax}(z_t/T))
            + \\lambda_m \\, M(f_s)

    ``mode="hinton"`` replaces the logit-graph term by :class:`HintonKDLoss`,
    :math:`\\lambda_{lg} \\, T^2 \\, \\mathrm{KL}(p_t \\Vert p_s)`; the feature-graph and decorrelation terms stay
    available through their weights. ``G`` is :class:`RelationalGraphLoss`, ``M`` is
    :class:`DecorrelationLoss`, ``f`` are pooled embeddings and ``z`` raw logits. Cross-entropy is computed
    on the raw logits (``F.cross_entropy`` applies the only softmax).

    When both teacher outputs are ``None`` (distillation off) only ``λ_cls·CE`` is used. A term whose
    weight is 0 is not computed. The reference setting of the relational method is ``fg_weight =
    lg_weight = 5``, ``temperature = 5``, cosine kernel, with ``decor_weight = 1`` to include the
    decorrelation regulariser on the student embedding.

    Args:
        cls_weight: ``λ_cls``.
        fg_weight: ``λ_fg``, feature-graph weight.
        lg_weight: ``λ_lg``, logit-graph (``"graph"``) or soft-target KL (``"hinton"``) weight.
        decor_weight: ``λ_m``, decorrelation weight (applied only while distilling).
        temperature: ``T`` for the logit term.
        kernel: graph kernel, one of :data:`KERNELS`.
        k: neighbourhood size for the ``"rbf"`` / ``"knn"`` kernels.
        mode: ``"graph"`` or ``"hinton"``.
        eps: numerical floor of the graph kernels.

    Shapes (``forward``):
        ``student_logits`` ``(B, C)``, ``student_embedding`` ``(B, Ds)``, ``target`` ``(B,)`` or ``(B, 1)`` integer
        class indices (a floating tensor holding whole numbers is accepted), ``teacher_logits`` ``(B, C)`` or
        ``None``, ``teacher_embedding`` ``(B, Dt)`` or ``None``.

    Returns (``forward``):
        dict with ``"loss"`` (scalar, differentiable) and the unweighted terms ``"ce"``, ``"fg"``, ``"lg"``,
        ``"decor"`` as detached scalar tensors (0 for a term that was not computed), so that
        ``loss == cls_weight·ce + fg_weight·fg + lg_weight·lg + decor_weight·decor``.
    """

    TERMS = ("ce", "fg", "lg", "decor")

    def __init__(
        self,
        cls_weight: float = 1.0,
        fg_weight: float = 5.0,
        lg_weight: float = 5.0,
        decor_weight: float = 0.0,
        temperature: float = 5.0,
        kernel: str = "cosine",
        k: int = 5,
        mode: str = "graph",
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        for name, value in (
            ("cls_weight", cls_weight),
            ("fg_weight", fg_weight),
            ("lg_weight", lg_weight),
            ("decor_weight", decor_weight),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}.")
        if mode not in ("graph", "hinton"):
            raise ValueError(f"mode must be 'graph' or 'hinton', got {mode!r}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        self.cls_weight = float(cls_weight)
        self.fg_weight = float(fg_weight)
        self.lg_weight = float(lg_weight)
        self.decor_weight = float(decor_weight)
        self.temperature = float(temperature)
        self.mode = mode
        self.graph = RelationalGraphLoss(kernel=kernel, k=k, eps=eps)
        self.decorrelation = DecorrelationLoss(kernel=kernel, k=k, eps=eps)
        self.hinton = HintonKDLoss(temperature=temperature)

    def _target(self, target: torch.Tensor, batch: int) -> torch.Tensor:
        if target.dim() == 2 and target.shape[1] == 1:
            target = target[:, 0]
        if target.dim() != 1 or target.shape[0] != batch:
            raise ValueError(f"target must have shape ({batch},) or ({batch}, 1), got {tuple(target.shape)}.")
        if target.is_floating_point():
            if not torch.equal(target, target.round()):
                raise ValueError("target must hold integer class indices, got non-integer values.")
        elif target.dtype == torch.bool:
            raise ValueError("target must hold integer class indices, got a bool tensor.")
        return target.long()

    def forward(
        self,
        student_logits: torch.Tensor,
        student_embedding: torch.Tensor,
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        teacher_embedding: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student_logits: raw student logits ``(B, C)``.
            student_embedding: student embedding ``(B, Ds)`` from the network that produced the logits.
            target: class indices ``(B,)`` or ``(B, 1)``.
            teacher_logits: raw teacher logits ``(B, C)``, or ``None``.
            teacher_embedding: teacher embedding ``(B, Dt)``, or ``None``.

        Returns:
            ``{"loss", "ce", "fg", "lg", "decor"}`` (see the class docstring).

        Raises:
            ValueError: a tensor has the wrong number of dimensions, batch sizes or class counts differ, the
                target is not integer-valued, or a distillation term with a non-zero weight is missing the
                teacher output it needs while the other teacher output is given.
        """
        _check_rows(student_logits, "student_logits")
        _check_rows(student_embedding, "student_embedding")
        batch = student_logits.shape[0]
        if student_embedding.shape[0] != batch:
            raise ValueError(
                f"student_embedding batch size {student_embedding.shape[0]} differs from student_logits {batch}."
            )
        target = self._target(target, batch)
        distil = teacher_logits is not None or teacher_embedding is not None
        if teacher_logits is not None:
            _check_rows(teacher_logits, "teacher_logits")
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(
                    f"teacher_logits shape {tuple(teacher_logits.shape)} differs from student_logits "
                    f"{tuple(student_logits.shape)}."
                )
        if teacher_embedding is not None:
            _check_rows(teacher_embedding, "teacher_embedding")
            if teacher_embedding.shape[0] != batch:
                raise ValueError(
                    f"teacher_embedding batch size {teacher_embedding.shape[0]} differs from student batch {batch}."
                )
        if distil and self.fg_weight > 0 and teacher_embedding is None:
            raise ValueError(f"fg_weight={self.fg_weight} needs teacher_embedding, got None.")
        if distil and self.lg_weight > 0 and teacher_logits is None:
            raise ValueError(f"lg_weight={self.lg_weight} needs teacher_logits, got None.")

        zero = student_logits.new_zeros(())
        terms: dict[str, torch.Tensor] = {name: zero for name in self.TERMS}
        total = zero
        if self.cls_weight > 0:
            terms["ce"] = F.cross_entropy(student_logits, target)
            total = total + self.cls_weight * terms["ce"]
        if distil:
            if self.fg_weight > 0 and teacher_embedding is not None:
                terms["fg"] = self.graph(student_embedding, teacher_embedding)
                total = total + self.fg_weight * terms["fg"]
            if self.lg_weight > 0 and teacher_logits is not None:
                if self.mode == "graph":
                    t = self.temperature
                    terms["lg"] = self.graph(
                        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1)
                    )
                else:
                    terms["lg"] = self.hinton(student_logits, teacher_logits)
                total = total + self.lg_weight * terms["lg"]
            if self.decor_weight > 0:
                terms["decor"] = self.decorrelation(student_embedding)
                total = total + self.decor_weight * terms["decor"]
        out = {"loss": total}
        out.update({name: value.detach() for name, value in terms.items()})
        return out
