# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Saliency maps of the bundle's networks (Grad-CAM, occlusion), for :mod:`scripts.explain` and the reports.

Saliency (MONAI's ``monai.visualize`` tools)
    :class:`GradCAMSaliency` wraps ``monai.visualize.GradCAM`` / ``GradCAMpp`` for the bundle's networks and
    returns one map per input channel, scaled to ``[0, 1]`` by its maximum (zeros when the map is empty):

    ==================  =============================================  =========================================
    network             Grad-CAM target layer (:data:`TARGET_LAYERS`)  map
    ==================  =============================================  =========================================
    Teacher3D           ``encoder.layer2`` (ResNet) /                  ``(1, X, Y, Z)``
                        ``encoder.features.denseblock2`` (DenseNet)
    Student2D, early    ``encoder.layer2`` / ``...denseblock2``        one ``(H, W)`` map, repeated for every
                                                                       channel (the first convolution mixes
                                                                       them, so no layer is per channel)
    Student2D, joint    ``encoder.encoder.layer2`` (the shared branch)  one ``(H, W)`` map per channel
    or mean fusion
    ==================  =============================================  =========================================

    Layer 2 is the stage at 1/8 of the input size (8×8 in 2D, 8³ in 3D for the 64-voxel grid, cells of about
    23–27 mm): the last stage fine enough to separate caudate from putamen; layer 4 is 2×2(×2) at this grid
    size and cannot localise anything. ``target_layer`` overrides the choice. The coarse map is brought back to
    the input grid with :func:`aligned_upsampler`, which keeps each feature cell on the input pixel it is centred
    on (:data:`LAYER_GEOMETRY`); MONAI's default upsampler would shift the maps by half a cell (about 1 cm).

    Joint and mean fusion run the shared branch once per channel, so a hook on the branch would see the last
    channel's activations and the first channel's gradients. The map of channel ``k`` is therefore computed on
    a view of the network (:class:`_ChannelFocus`) that runs the other channels first without gradients and
    channel ``k`` last: the logits are unchanged and the hooks record channel ``k`` only.

    :func:`occlusion_saliency` (``monai.visualize.OcclusionSensitivity``) is the model-agnostic check: the drop of
    the explained class's probability when a patch is occluded, per input channel for 2D inputs. It needs one
    forward pass per patch position, so it is run on a coarse grid (see ``docs/explain.md`` for its cost).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.utils import look_up_option
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity, default_upsampler
from scripts.networks import SharedChannelEncoder
from torch import nn

__all__ = [
    "SALIENCY_METHODS",
    "TARGET_LAYERS",
    "LAYER_GEOMETRY",
    "SaliencyResult",
    "aligned_upsampler",
    "default_target_layer",
    "GradCAMSaliency",
    "occlusion_saliency",
]

SALIENCY_METHODS = ("gradcam", "gradcampp")
"""``"gradcam"``: ``monai.visualize.GradCAM``; ``"gradcampp"``: ``monai.visualize.GradCAMpp``."""

TARGET_LAYERS = {"resnet10": "layer2", "resnet18": "layer2", "densenet121": "features.denseblock2"}
"""Grad-CAM layer of each backbone, relative to the backbone module (the stage at 1/8 of the input size)."""

LAYER_GEOMETRY = {"resnet10": (8, 0.0), "resnet18": (8, 0.0), "densenet121": (8, 2.0)}
"""``(stride, offset)`` of each backbone's :data:`TARGET_LAYERS` output: feature cell ``j`` is centred on input
pixel ``stride · j + offset``. ResNet: the stride-2 stem (k7, p3), max pooling (k3, p1) and the stride-2 first
block of layer 2 keep cell centres on ``8 j``; DenseNet: the 2×2 average pooling of ``transition1`` moves them by
half a cell of its input (2 input pixels)."""


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)


def _scale_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Divide by the maximum (one scale for all channels of the sample); an all-zero map stays zero."""
    top = maps.max()
    return maps / top if bool(top > 0) else torch.zeros_like(maps)


@dataclass
class SaliencyResult:
    """Saliency maps of one input.

    Attributes:
        maps: ``(C, *spatial)`` in ``[0, 1]``, one map per input channel (``C = 1`` for the teacher).
        probabilities: ``(num_classes,)`` softmax of the network's logits.
        class_idx: the class the maps explain.
    """

    maps: torch.Tensor
    probabilities: torch.Tensor
    class_idx: int


def aligned_upsampler(stride: float, offset: float = 0.0) -> Callable[[Sequence[int]], Callable]:
    """Upsampler for ``monai.visualize.GradCAM`` that puts feature cell ``j`` back on input pixel ``stride·j + offset``.

    MONAI's default (``F.interpolate``, ``align_corners=False``) assumes cell ``j`` covers input pixels
    ``stride·j .. stride·(j + 1) − 1`` and so centres it on ``stride·j + (stride − 1) / 2``: for a strided CNN
    whose cells are centred on ``stride·j`` that shifts the whole map by 3.5 pixels (at stride 8) towards higher
    indices: about 1 cm anterior, superior and to the right on the 64³ working grid. Here each output pixel ``p``
    is sampled at feature coordinate ``(p − offset) / stride`` (linear interpolation, border values outside).

    Returns:
        ``upsampler(spatial_size)(x)`` mapping ``(B, C, *n)`` to ``(B, C, *spatial_size)``, as MONAI's CAM classes
        call it.
    """

    def make(spatial_size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def up(x: torch.Tensor) -> torch.Tensor:
            axes = []
            for size, n in zip(spatial_size, x.shape[2:]):
                c = (torch.arange(int(size), dtype=torch.float32, device=x.device) - offset) / stride
                axes.append(2.0 * c / (n - 1) - 1.0 if n > 1 else torch.zeros_like(c))
            mesh = torch.meshgrid(*axes, indexing="ij")
            grid = torch.stack(mesh[::-1], dim=-1)[None].expand(x.shape[0], *mesh[0].shape, len(axes))
            return torch.nn.functional.grid_sample(
                x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
            )

        return up

    return make


def default_target_layer(network: nn.Module) -> str:
    """Grad-CAM target layer name of a :class:`~scripts.networks.Teacher3D` / :class:`~scripts.networks.Student2D`.

    Raises:
        ValueError: when the network has no known ``backbone`` attribute.
    """
    backbone = getattr(network, "backbone", None)
    layer = TARGET_LAYERS.get(backbone) if isinstance(backbone, str) else None
    if layer is None:
        raise ValueError(
            f"no default Grad-CAM layer for {type(network).__name__} with backbone {backbone!r};"
            f" known backbones: {sorted(TARGET_LAYERS)}. Pass target_layer= explicitly."
        )
    if isinstance(getattr(network, "encoder", None), SharedChannelEncoder):
        return f"encoder.encoder.{layer}"
    return f"encoder.{layer}"


class _ChannelFocus(nn.Module):
    """A shared-branch student whose hooks see channel ``channel`` only (see the module docstring).

    ``forward(x)`` equals ``net(x)``: the branch runs on the other channels without gradients, then on channel
    ``channel``, and the embeddings are combined as the network does.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.channel = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc: SharedChannelEncoder = self.net.encoder
        k = self.channel
        with torch.no_grad():
            others = {j: enc.encoder(x[:, j : j + 1]) for j in range(enc.num_channels) if j != k}
        focus = enc.encoder(x[:, k : k + 1])
        embeddings = [focus if j == k else others[j] for j in range(enc.num_channels)]
        if enc.reduction == "cat":
            embedding = torch.cat(embeddings, dim=1)
        else:
            embedding = torch.stack(embeddings, dim=0).mean(dim=0)
        return self.net.head(embedding)


class GradCAMSaliency:
    """Grad-CAM / Grad-CAM++ maps of a bundle network, one per input channel (see the module docstring).

    The hooks are registered once, on the network given; pass a copy when the network is also used elsewhere.

    Args:
        network: a :class:`~scripts.networks.Teacher3D` or :class:`~scripts.networks.Student2D`.
        method: one of :data:`SALIENCY_METHODS`.
        target_layer: layer name relative to ``network`` (default :func:`default_target_layer`).

    Calling it with ``x`` ``(1, C, *spatial)`` (one scan) and optionally ``class_idx`` (default: the predicted
    class) returns a :class:`SaliencyResult` with maps ``(C, *spatial)``: per channel for joint/mean fusion, the
    same map repeated for an early-fusion student, one map for the teacher (``C = 1``).
    """

    def __init__(self, network: nn.Module, method: str = "gradcam", target_layer: str | None = None) -> None:
        method = look_up_option(method, SALIENCY_METHODS)
        cam_type = GradCAM if method == "gradcam" else GradCAMpp
        self.network = network
        self.method = method
        self.target_layer = target_layer or default_target_layer(network)
        self.per_channel = isinstance(getattr(network, "encoder", None), SharedChannelEncoder)
        module: nn.Module = _ChannelFocus(network) if self.per_channel else network
        layer = f"net.{self.target_layer}" if self.per_channel else self.target_layer
        if layer not in dict(module.named_modules()):
            raise ValueError(f"{type(network).__name__} has no layer {self.target_layer!r} for Grad-CAM.")
        self._module = module
        geometry = LAYER_GEOMETRY.get(getattr(network, "backbone", None)) if target_layer is None else None
        upsampler = aligned_upsampler(*geometry) if geometry else default_upsampler
        self.cam = cam_type(nn_module=module, target_layers=layer, upsampler=upsampler, postprocessing=_identity)

    def __call__(self, x: torch.Tensor, class_idx: int | None = None) -> SaliencyResult:
        if x.ndim < 4 or x.shape[0] != 1:
            raise ValueError(f"expected one scan as a (1, C, *spatial) batch, got shape {tuple(x.shape)}.")
        x = torch.as_tensor(x).as_subclass(torch.Tensor).detach().float().clone().requires_grad_(True)
        training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                probabilities = torch.softmax(self.network(x).float(), dim=1)[0]
            cls = int(probabilities.argmax()) if class_idx is None else int(class_idx)
            if not 0 <= cls < probabilities.numel():
                raise ValueError(f"class_idx must be in 0..{probabilities.numel() - 1}, got {class_idx}.")
            if self.per_channel:
                maps = []
                for k in range(x.shape[1]):
                    self._module.channel = k
                    maps.append(self.cam(x, class_idx=cls)[0, 0])
                out = torch.stack(maps, dim=0)
            else:
                cam = self.cam(x, class_idx=cls)[0, 0]
                out = cam.expand(x.shape[1], *cam.shape).clone() if x.ndim == 4 else cam[None]
        finally:
            self.network.train(training)
            self.network.zero_grad(set_to_none=True)
        return SaliencyResult(_scale_to_unit(out.detach().float()), probabilities.detach().cpu(), cls)


class _OneChannelInput(nn.Module):
    """``forward(x_k)`` = ``net(x)`` with channel ``k`` of the fixed input ``x`` replaced by ``x_k``."""

    def __init__(self, net: nn.Module, x: torch.Tensor, k: int) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("x", x)
        self.k = k

    def forward(self, xk: torch.Tensor) -> torch.Tensor:
        x = self.x.expand(xk.shape[0], *self.x.shape[1:]).clone()
        x[:, self.k : self.k + 1] = xk
        return self.net(x)


def occlusion_saliency(
    network: nn.Module,
    x: torch.Tensor,
    class_idx: int | None = None,
    mask_size: int = 8,
    overlap: float = 0.5,
    per_channel: bool = True,
    n_batch: int = 16,
) -> SaliencyResult:
    """Occlusion sensitivity (``monai.visualize.OcclusionSensitivity``, Gaussian occlusion) as a saliency map.

    ``map = relu(p_c(x) − p_c(x occluded around the position))`` scaled to ``[0, 1]``, for class ``c``
    (default: the predicted class). The cost is one forward pass per patch position:
    ``≈ (1 + (S − m) / (m (1 − overlap)))^d`` for ``d`` spatial axes of size ``S`` and mask size ``m``, times the
    number of channels with ``per_channel``.

    Args:
        network: any classifier returning logits.
        x: one scan ``(1, C, *spatial)``.
        class_idx: explained class.
        mask_size: occluded patch size (voxels per side).
        overlap: overlap of neighbouring patches, in ``[0, 1)``.
        per_channel: occlude one input channel at a time (one map per channel); otherwise all channels together
            (one map, repeated).
        n_batch: patches per forward pass.

    Returns:
        a :class:`SaliencyResult` with maps ``(C, *spatial)``.
    """
    x = torch.as_tensor(x).detach().float()
    if x.ndim < 4 or x.shape[0] != 1:
        raise ValueError(f"expected one scan as a (1, C, *spatial) batch, got shape {tuple(x.shape)}.")
    training = network.training
    network.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
            probabilities = torch.softmax(network(x).float(), dim=1)[0]
            cls = int(probabilities.argmax()) if class_idx is None else int(class_idx)
            channels = range(x.shape[1]) if per_channel else [None]
            maps = []
            for k in channels:
                module = network if k is None else _OneChannelInput(network, x, k)
                inp = x if k is None else x[:, k : k + 1]
                # an explicit softmax: MONAI's default activation chooses sigmoid for 1-channel *inputs*
                occ = OcclusionSensitivity(
                    module, mask_size, n_batch, verbose=False, overlap=overlap, activate=_softmax
                )
                sensitivity, _ = occ(inp)
                maps.append(torch.relu(probabilities[cls] - sensitivity[0, cls]).as_tensor().float())
    finally:
        network.train(training)
    out = torch.stack(maps, dim=0)
    if not per_channel:
        out = out.expand(x.shape[1], *out.shape[1:]).clone()
    return SaliencyResult(_scale_to_unit(out), probabilities.cpu(), cls)
