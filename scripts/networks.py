# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""3D teacher and 2D student classifiers that expose the pooled embedding used for knowledge distillation.

Every network here is an :class:`EmbeddingClassifier`: an ``encoder`` that maps an image batch to a pooled
``(B, D)`` embedding followed by one linear ``head`` ``D -> num_classes``.

* ``forward(x)`` returns the raw logits ``(B, num_classes)`` (no softmax). This is the entry point of MONAI
  engines, inferers, TorchScript export and MONAI Label, and it is scriptable with ``torch.jit.script``.
* ``forward_with_embedding(x)`` returns ``(logits, embedding)`` from one forward pass. The embedding is the
  very tensor that the head classifies, so a loss on it trains the weights that produce the logits.

Backbones are MONAI networks:

* ``"resnet10"``: ``monai.networks.nets.ResNet`` with basic blocks and layers ``[1, 1, 1, 1]`` (one block per
  stage; the "modified ResNet18" 3D teacher), a 7-voxel stride-2 stem convolution followed by a stride-2 max
  pooling, projection shortcuts without bias. 512-d embedding (post-ReLU, so non-negative).
* ``"resnet18"``: the same stem with layers ``[2, 2, 2, 2]``. 512-d embedding.
* ``"densenet121"``: ``monai.networks.nets.DenseNet121``; the embedding is the output of the final
  ReLU, global average pooling and flattening (the input of the last linear layer). 1024-d embedding.

With the stride-2 stem, the max pooling and three stride-2 stages the spatial size is divided by 32, so
inputs of at least 16 voxels (pixels) per side are needed; 64 per side is the intended size.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

__all__ = [
    "BACKBONES",
    "FUSIONS",
    "build_encoder",
    "EmbeddingClassifier",
    "SharedChannelEncoder",
    "Teacher3D",
    "Student2D",
]

BACKBONES = ("resnet10", "resnet18", "densenet121")
"""Names accepted by :func:`build_encoder` (and by :class:`Teacher3D` / :class:`Student2D`)."""

FUSIONS = ("early", "joint", "mean")
"""Ways :class:`Student2D` combines the input channels (see its docstring)."""

_RESNET_LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2]}


def build_encoder(backbone: str, spatial_dims: int, in_channels: int) -> tuple[nn.Module, int]:
    """
    Build a MONAI backbone without its classification layer.

    Args:
        backbone: one of :data:`BACKBONES`.
        spatial_dims: 2 or 3.
        in_channels: number of input channels of the first convolution.

    Returns:
        ``(encoder, embedding_dim)`` where ``encoder(x)`` maps ``(B, in_channels, *spatial)`` to the pooled
        ``(B, embedding_dim)`` embedding.

    Raises:
        ValueError: unknown ``backbone``, ``spatial_dims`` not in {2, 3} or ``in_channels`` < 1.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {backbone!r}; expected one of {list(BACKBONES)}.")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}.")
    if backbone in _RESNET_LAYERS:
        encoder = ResNet(
            block="basic",
            layers=_RESNET_LAYERS[backbone],
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            no_max_pool=False,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        return encoder, 512
    # densenet121: drop only the final linear layer, keeping ReLU -> global average pool -> flatten.
    densenet = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    densenet.class_layers.out = nn.Identity()
    return densenet, 1024


class EmbeddingClassifier(nn.Module):
    """
    An encoder producing a pooled embedding, followed by a linear classification head.

    .. math::

        e = \\mathrm{encoder}(x) \\in \\mathbb{R}^{B \\times D}, \\qquad z = W e + b \\in \\mathbb{R}^{B \\times C}

    Args:
        encoder: module mapping an input batch to a ``(B, embedding_dim)`` tensor.
        embedding_dim: ``D``, the width of the encoder output.
        num_classes: ``C``, the number of logits (2 for HC vs PD).

    Attributes:
        embedding_dim: ``D``.
        num_classes: ``C``.
        head: the ``nn.Linear(D, C)`` classifier.
    """

    def __init__(self, encoder: nn.Module, embedding_dim: int, num_classes: int = 2) -> None:
        super().__init__()
        if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}.")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        self.encoder = encoder
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.head = nn.Linear(embedding_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, D)`` of an input batch."""
        return self.encoder(x)

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Logits and the embedding they were computed from, in one forward pass.

        Args:
            x: input batch ``(B, C_in, *spatial)``.

        Returns:
            ``(logits (B, num_classes), embedding (B, embedding_dim))``; ``logits = head(embedding)``.
        """
        embedding = self.embed(x)
        return self.head(embedding), embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits ``(B, num_classes)`` (no softmax)."""
        return self.forward_with_embedding(x)[0]


class Teacher3D(EmbeddingClassifier):
    """
    Volumetric classifier used as the distillation teacher.

    Input ``(B, in_channels, H, W, D)`` (64³ z-scored DaTscan volumes in this bundle); output raw logits
    ``(B, num_classes)``. The default ``"resnet10"`` is a MONAI ``ResNet`` with one basic block per stage
    (widths 64-128-256-512), a 7³ stride-2 stem, max pooling and bias-free projection shortcuts: the
    "modified ResNet18" teacher. ``"resnet18"`` uses two blocks per stage, ``"densenet121"`` a MONAI
    DenseNet121. See :func:`build_encoder` for the embedding of each backbone.

    Args:
        backbone: one of :data:`BACKBONES`.
        in_channels: input channels (1 for a single SPECT volume).
        num_classes: number of logits.
        spatial_dims: 3 for volumes (2 builds the same architecture in 2D).
    """

    def __init__(
        self, backbone: str = "resnet10", in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 3
    ) -> None:
        encoder, dim = build_encoder(backbone, spatial_dims=spatial_dims, in_channels=in_channels)
        super().__init__(encoder, dim, num_classes)
        self.backbone = backbone
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims


class SharedChannelEncoder(nn.Module):
    """
    Apply ONE single-channel encoder to every channel of the input and combine the embeddings.

    For an input ``x`` of shape ``(B, K, *spatial)`` and an encoder mapping ``(B, 1, *spatial)`` to
    ``(B, D)``:

    .. math::

        e_k = \\mathrm{encoder}(x_{:, k}), \\quad
        e = [e_1, \\dots, e_K] \\in \\mathbb{R}^{B \\times K D} \\ (\\text{"cat"}) \\quad \\text{or} \\quad
        e = \\tfrac{1}{K} \\sum_k e_k \\in \\mathbb{R}^{B \\times D} \\ (\\text{"mean"})

    The weights are shared: there is one set of parameters however large ``K`` is. In training mode each
    channel is a separate call of the encoder, so batch normalisation uses the statistics of that channel's
    batch (and updates the running statistics once per channel). In evaluation mode (running statistics, no
    dependence between the images of a batch) the ``K`` channels go through the encoder as one batch of
    ``K * B`` single-channel images: the same embeddings from one call instead of ``K`` (``batched=False``
    keeps one call per channel).

    Args:
        encoder: single-channel encoder returning ``(B, D)``.
        embedding_dim: ``D``.
        num_channels: ``K``; the input must have exactly this many channels.
        reduction: ``"cat"`` (concatenate, joint fusion) or ``"mean"`` (average).

    Attributes:
        out_dim: ``K * D`` for ``"cat"``, ``D`` for ``"mean"``.
    """

    def __init__(self, encoder: nn.Module, embedding_dim: int, num_channels: int, reduction: str = "cat") -> None:
        super().__init__()
        if reduction not in ("cat", "mean"):
            raise ValueError(f"reduction must be 'cat' or 'mean', got {reduction!r}.")
        if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}.")
        self.encoder = encoder
        self.num_channels = num_channels
        self.reduction = reduction
        self.batched = True
        self.out_dim = embedding_dim * num_channels if reduction == "cat" else embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.num_channels:
            raise ValueError(
                "SharedChannelEncoder expects input (B, "
                + str(self.num_channels)
                + ", *spatial), got shape "
                + str(list(x.shape))
                + "."
            )
        if self.training or not self.batched:
            embeddings: list[torch.Tensor] = []
            for k in range(self.num_channels):
                embeddings.append(self.encoder(x[:, k : k + 1]))
            if self.reduction == "cat":
                return torch.cat(embeddings, dim=1)
            return torch.stack(embeddings, dim=0).mean(dim=0)
        # evaluation: the K channels as K * B single-channel images through one call of the encoder
        b, k = x.shape[0], x.shape[1]
        e = self.encoder(x.flatten(0, 1).unsqueeze(1)).reshape(b, k, -1)
        return e.reshape(b, -1) if self.reduction == "cat" else e.mean(dim=1)


class Student2D(EmbeddingClassifier):
    """
    2D classifier that sees a 2D projection of the volume; the distillation student.

    Input ``(B, in_channels, H, W)`` (64×64 in this bundle); output raw logits ``(B, num_classes)``.
    The backbone is a MONAI 2D ``"resnet18"`` (512-d embedding, 7×7 stride-2 stem, bias-free projection
    shortcuts) or ``"densenet121"`` (1024-d); ``"resnet10"`` is also accepted. ``fusion`` decides how the
    ``K = in_channels`` input channels are used:

    * ``"early"``: one CNN whose first convolution takes all ``K`` channels; embedding ``(B, D)``.
    * ``"joint"``: joint fusion. The ``K`` channels are ``K`` single-channel images passed through ONE
      shared single-channel CNN; their embeddings are concatenated to ``(B, K·D)`` and one linear layer
      ``K·D -> num_classes`` classifies. The distillation embedding is the concatenation.
    * ``"mean"``: the same shared single-channel CNN per channel, embeddings averaged to ``(B, D)``.

    ``in_channels`` and ``fusion`` default to what ``projection`` produces, as reported by
    ``scripts.projections.projection_spec(projection, num_slices, gap)``; explicit values override it (then
    ``projection`` is only a label and the projection module is not consulted when both are given).

    Args:
        backbone: one of :data:`BACKBONES`.
        projection: name of the 2D projection the student is trained on.
        num_slices: slice count passed to ``projection_spec``.
        gap: slice gap passed to ``projection_spec``.
        in_channels: ``K``; ``None`` takes it from the projection.
        fusion: one of :data:`FUSIONS`; ``None`` takes it from the projection.
        num_classes: number of logits.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        projection: str = "joint_fusion_slices",
        num_slices: int = 3,
        gap: int = 0,
        in_channels: int | None = None,
        fusion: str | None = None,
        num_classes: int = 2,
    ) -> None:
        if in_channels is None or fusion is None:
            from scripts.projections import projection_spec

            spec = projection_spec(projection, num_slices, gap)
            in_channels = int(spec.in_channels) if in_channels is None else in_channels
            fusion = str(spec.fusion) if fusion is None else fusion
        if fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {fusion!r}; expected one of {list(FUSIONS)}.")
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}.")
        if fusion == "early":
            encoder, dim = build_encoder(backbone, spatial_dims=2, in_channels=in_channels)
        else:
            branch, branch_dim = build_encoder(backbone, spatial_dims=2, in_channels=1)
            encoder = SharedChannelEncoder(
                branch, branch_dim, num_channels=in_channels, reduction="cat" if fusion == "joint" else "mean"
            )
            dim = encoder.out_dim
        super().__init__(encoder, dim, num_classes)
        self.backbone = backbone
        self.projection = projection
        self.fusion = fusion
        self.in_channels = in_channels
        self.spatial_dims = 2
