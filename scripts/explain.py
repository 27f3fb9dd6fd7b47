# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""What the networks look at: saliency maps, their place in the volume, attention agreement and faithfulness.

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

Placement in the working grid
    A student's input channels are slices (or whole-stack projections) of the 64³ working-grid volume; the
    projection records which in ``meta["projection_planes"]`` (rows ``(axis, index)``, index ``-1`` for a
    whole-stack channel; see :mod:`scripts.projections`). :func:`place_in_volume` puts each channel's map back
    at its slice (whole-stack channels are spread along their axis) and :func:`sample_planes` reads a 3D map
    (the teacher's) on the same planes, so teacher and student are compared voxel for voxel.

Attention metrics (:func:`attention_metrics`)
    * ROI share: ``Σ_{p ∈ ROI} s_p / Σ_p s_p``, the share of the saliency mass inside ``striatum``, ``caudate``
      (L + R), ``putamen`` (L + R) and ``putamen_post`` (L + R) of the template ROIs on the working grid. The
      teacher's is computed over the volume; a student's over the planes it saw (for a whole-stack channel, a
      pixel counts as inside when its ray crosses the ROI). Each share comes with its chance level, the ROI's
      share of the domain (what a uniform map would give).
    * Teacher–student agreement on the student's planes: Spearman's rank correlation of the two maps over the
      striatal pixels, and the IoU of the top ``top_percent`` % pixels of each map.

Faithfulness (a map that does not depend on the decision is not evidence)
    * :func:`deletion_scores`: the explained class's log-odds as the most salient ``f`` share of the input is
      set to the image minimum (background), for ``f`` in ``fractions``; its mean over the curve (area under the
      deletion curve) against the same for random orders. ``gap = random − saliency > 0``: removing what the map
      points at hurts the decision more than removing as much at random.
    * :func:`randomised_copy` + :func:`spearman`: the map of the same input with re-initialised weights (the
      model-parameter randomisation test); a trained map should hardly correlate with it.

:class:`AttentionEvaluation` runs all of this for a labelled split with the teacher and any number of students
(``configs/explain.json``) and writes per-scan and summary files.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import look_up_option
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity, default_upsampler
from scipy.stats import spearmanr
from scripts.errors import InputError, MissingFileError
from scripts.networks import SharedChannelEncoder
from scripts.options import parse_bool
from torch import nn

__all__ = [
    "SALIENCY_METHODS",
    "TARGET_LAYERS",
    "LAYER_GEOMETRY",
    "ROI_GROUPS",
    "SaliencyResult",
    "aligned_upsampler",
    "default_target_layer",
    "GradCAMSaliency",
    "occlusion_saliency",
    "projection_planes",
    "place_in_volume",
    "sample_planes",
    "roi_planes",
    "roi_groups",
    "roi_share",
    "spearman",
    "top_percent_iou",
    "attention_metrics",
    "deletion_scores",
    "randomised_copy",
    "load_weights",
    "AttentionEvaluation",
]

logger = logging.getLogger(__name__)

SALIENCY_METHODS = ("gradcam", "gradcampp")
"""``"gradcam"``: ``monai.visualize.GradCAM``; ``"gradcampp"``: ``monai.visualize.GradCAMpp``."""

TARGET_LAYERS = {"resnet10": "layer2", "resnet18": "layer2", "densenet121": "features.denseblock2"}
"""Grad-CAM layer of each backbone, relative to the backbone module (the stage at 1/8 of the input size)."""

LAYER_GEOMETRY = {"resnet10": (8, 0.0), "resnet18": (8, 0.0), "densenet121": (8, 2.0)}
"""``(stride, offset)`` of each backbone's :data:`TARGET_LAYERS` output: feature cell ``j`` is centred on input
pixel ``stride · j + offset``. ResNet: the stride-2 stem (k7, p3), max pooling (k3, p1) and the stride-2 first
block of layer 2 keep cell centres on ``8 j``; DenseNet: the 2×2 average pooling of ``transition1`` moves them by
half a cell of its input (2 input pixels)."""

ROI_GROUPS = {
    "striatum": ("striatum",),
    "caudate": ("caudate_L", "caudate_R"),
    "putamen": ("putamen_L", "putamen_R"),
    "putamen_post": ("putamen_post_L", "putamen_post_R"),
}
"""Regions of the attention metrics, as unions of :data:`scripts.anatomy.ROI_NAMES`."""


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


# ---------------------------------------------------------------------------------------------------------------
# Placement of 2D maps in the working grid
# ---------------------------------------------------------------------------------------------------------------


def projection_planes(image: torch.Tensor) -> torch.Tensor:
    """The ``(C, 2)`` rows ``(axis, index)`` a projected image records in ``meta["projection_planes"]``.

    Raises:
        ValueError: when ``image`` is not a ``MetaTensor`` from :mod:`scripts.projections` or the record does not
            match its channels.
    """
    planes = image.meta.get("projection_planes") if isinstance(image, MetaTensor) else None
    if planes is None:
        raise ValueError(
            "the image does not record its source planes (meta['projection_planes']): pass the MetaTensor that"
            " scripts.projections produced."
        )
    planes = torch.as_tensor(planes, dtype=torch.int64).reshape(-1, 2)
    if planes.shape[0] != image.shape[0]:
        raise ValueError(f"meta['projection_planes'] has {planes.shape[0]} rows for {image.shape[0]} channels.")
    return planes


def _plane_view(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """``(T, H, W)`` view of an ``(X, Y, Z)`` volume with ``axis`` first (the projections' slice layout)."""
    return volume.movedim(axis, 0)


def _check_planes(planes: torch.Tensor | np.ndarray, shape: Sequence[int]) -> list[tuple[int, int]]:
    rows = [(int(a), int(i)) for a, i in torch.as_tensor(planes).reshape(-1, 2).tolist()]
    for axis, index in rows:
        if axis not in (0, 1, 2) or not -1 <= index < shape[axis]:
            raise ValueError(f"plane (axis {axis}, index {index}) is outside a volume of shape {tuple(shape)}.")
    return rows


def place_in_volume(
    maps: torch.Tensor, planes: torch.Tensor, shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put per-channel 2D maps back into the ``(X, Y, Z)`` working grid.

    A slice channel fills its slice; a whole-stack channel (index ``-1``) is spread along its axis. Where
    planes cross (several views), the larger value is kept.

    Args:
        maps: ``(C, H, W)``.
        planes: ``(C, 2)`` rows ``(axis, index)`` (:func:`projection_planes`).
        shape: ``(X, Y, Z)``.

    Returns:
        ``(volume map (X, Y, Z), support (X, Y, Z) bool)``; the support marks the voxels the maps cover.
    """
    shape = tuple(int(s) for s in shape)
    rows = _check_planes(planes, shape)
    if maps.ndim != 3 or maps.shape[0] != len(rows):
        raise ValueError(f"expected maps (C, H, W) with C = {len(rows)} planes, got shape {tuple(maps.shape)}.")
    volume = torch.zeros(shape, dtype=maps.dtype, device=maps.device)
    support = torch.zeros(shape, dtype=torch.bool, device=maps.device)
    for m, (axis, index) in zip(maps, rows):
        target, cover = _plane_view(volume, axis), _plane_view(support, axis)
        if tuple(target.shape[1:]) != tuple(m.shape):
            raise ValueError(f"a map of shape {tuple(m.shape)} does not fit the planes {tuple(target.shape[1:])}.")
        if index < 0:
            target.copy_(torch.maximum(target, m.expand_as(target)))
            cover.fill_(True)
        else:
            target[index] = torch.maximum(target[index], m)
            cover[index] = True
    return volume, support


def sample_planes(volume: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """A 3D map read on a student's planes: ``(C, H, W)``, the slice, or the mean along the axis for index ``-1``."""
    volume = torch.as_tensor(volume)
    rows = _check_planes(planes, volume.shape)
    return torch.stack(
        [_plane_view(volume, a).float().mean(0) if i < 0 else _plane_view(volume, a)[i] for a, i in rows]
    )


def roi_planes(mask: np.ndarray | torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """A 3D ROI on a student's planes: ``(C, H, W)`` bool, the slice, or "the ray crosses the ROI" for index ``-1``."""
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    rows = _check_planes(planes, mask.shape)
    return torch.stack([_plane_view(mask, a).any(0) if i < 0 else _plane_view(mask, a)[i] for a, i in rows])


def roi_groups(rois: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The :data:`ROI_GROUPS` unions of template ROIs (``scripts.anatomy.template_rois``)."""
    return {name: np.logical_or.reduce([np.asarray(rois[p]) for p in parts]) for name, parts in ROI_GROUPS.items()}


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _flat(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def roi_share(saliency, mask, domain=None) -> float:
    """Share of the saliency mass inside ``mask``: ``Σ_{p ∈ mask ∩ domain} s_p / Σ_{p ∈ domain} s_p``.

    ``nan`` when the map has no mass in the domain (default: everywhere).
    """
    s, m = _flat(saliency), _flat(mask) > 0
    d = np.ones_like(m) if domain is None else _flat(domain) > 0
    total = s[d].sum()
    return float(s[d & m].sum() / total) if total > 0 else float("nan")


def spearman(a, b, mask=None) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``) of two maps over ``mask`` (default: all elements);
    ``nan`` if one is constant."""
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"maps must have the same number of elements, got {x.size} and {y.size}.")
    if mask is not None:
        keep = _flat(mask) > 0
        x, y = x[keep], y[keep]
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _top_set(x: np.ndarray, percent: float) -> np.ndarray:
    threshold = np.quantile(x, 1.0 - percent / 100.0)
    return (x >= threshold) & (x > 0)


def top_percent_iou(a, b, percent: float = 10.0, mask=None) -> float:
    """IoU of the top ``percent`` % elements of each map (positive values only) over ``mask``.

    1 for identical maps, 0 for maps with disjoint supports; ``nan`` when a map has no positive value there
    (an empty map agrees with nothing and disagrees with nothing).
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}.")
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"maps must have the same number of elements, got {x.size} and {y.size}.")
    if mask is not None:
        keep = _flat(mask) > 0
        x, y = x[keep], y[keep]
    if x.size == 0:
        return float("nan")
    sa, sb = _top_set(x, percent), _top_set(y, percent)
    if not (sa.any() and sb.any()):
        return float("nan")
    return float((sa & sb).sum() / (sa | sb).sum())


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and np.isfinite(a) else float("nan")


def attention_metrics(
    rois: Mapping[str, np.ndarray],
    teacher_map: torch.Tensor | None = None,
    student_maps: torch.Tensor | None = None,
    planes: torch.Tensor | None = None,
    top_percent: float = 10.0,
) -> dict[str, float]:
    """ROI shares of a teacher and/or a student map and their agreement (see the module docstring).

    Args:
        rois: template ROIs on the working grid (``scripts.anatomy.template_rois(shape, affine)``).
        teacher_map: ``(X, Y, Z)`` teacher saliency.
        student_maps: ``(C, H, W)`` student saliency, one map per input channel.
        planes: ``(C, 2)`` source planes of the student's channels (needed with ``student_maps``).
        top_percent: ``k`` of the top-``k`` % IoU.

    Returns:
        ``teacher_<roi>_share`` / ``_chance`` / ``_enrichment`` (share / chance; teacher over the volume),
        ``student_<roi>_share`` / ``_chance`` / ``_enrichment`` (student over its planes),
        ``teacher_on_planes_<roi>_share`` / ``_enrichment`` (the teacher's map read on the student's planes) and
        ``spearman_striatum`` / ``top<k>_iou`` (agreement on those planes), for the maps given.
    """
    groups = roi_groups(rois)
    out: dict[str, float] = {}
    if teacher_map is not None:
        t = torch.as_tensor(teacher_map).float()
        for name, mask in groups.items():
            out[f"teacher_{name}_share"] = roi_share(t, mask)
            out[f"teacher_{name}_chance"] = float(mask.mean())
            out[f"teacher_{name}_enrichment"] = _ratio(out[f"teacher_{name}_share"], out[f"teacher_{name}_chance"])
    if student_maps is not None:
        if planes is None:
            raise ValueError("student maps need their source planes (projection_planes) to be placed.")
        s = torch.as_tensor(student_maps).float()
        plane_masks = {name: roi_planes(mask, planes) for name, mask in groups.items()}
        for name, mask in plane_masks.items():
            out[f"student_{name}_share"] = roi_share(s, mask)
            out[f"student_{name}_chance"] = float(mask.float().mean())
            out[f"student_{name}_enrichment"] = _ratio(out[f"student_{name}_share"], out[f"student_{name}_chance"])
        if teacher_map is not None:
            t_planes = sample_planes(torch.as_tensor(teacher_map).float(), planes)
            for name, mask in plane_masks.items():
                out[f"teacher_on_planes_{name}_share"] = roi_share(t_planes, mask)
                out[f"teacher_on_planes_{name}_enrichment"] = _ratio(
                    out[f"teacher_on_planes_{name}_share"], out[f"student_{name}_chance"]
                )
            out["spearman_striatum"] = spearman(s, t_planes, plane_masks["striatum"])
            out[f"top{top_percent:g}_iou"] = top_percent_iou(s, t_planes, top_percent)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Faithfulness
# ---------------------------------------------------------------------------------------------------------------


def _deletion_curve(
    network: nn.Module, x: torch.Tensor, order: torch.Tensor, class_idx: int, fractions: Sequence[float]
) -> np.ndarray:
    flat = x.reshape(-1)
    baseline = flat.min()
    batch = []
    for f in fractions:
        deleted = flat.clone()
        deleted[order[: int(round(f * flat.numel()))]] = baseline
        batch.append(deleted.reshape(x.shape[1:]))
    with torch.no_grad():
        scores = [_log_odds(network(b[None]).float()[0], class_idx) for b in batch]
    return np.asarray(scores)


def _log_odds(logits: torch.Tensor, class_idx: int) -> float:
    """``log p_c − log(1 − p_c) = z_c − logsumexp(z_{k≠c})`` (for two classes: the logit margin)."""
    others = torch.cat([logits[:class_idx], logits[class_idx + 1 :]])
    return float(logits[class_idx] - torch.logsumexp(others, dim=0))


def _curve_area(fractions: Sequence[float], values: np.ndarray) -> float:
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    return float(((v[1:] + v[:-1]) / 2 * np.diff(f)).sum() / (f[-1] - f[0]))


def deletion_scores(
    network: nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: int,
    fractions: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
    random_repeats: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Deletion curve of a map against random deletion orders.

    The input elements (voxels, or pixels of every channel) are set to the image minimum in decreasing order of
    ``saliency`` (same shape as one scan of ``x``), ``f`` of them for each ``f`` in ``fractions``; the curve is
    the log-odds of ``class_idx``, ``log p_c − log(1 − p_c)`` (the logit margin for two classes), which unlike
    the probability does not saturate for confident networks. Areas are normalised by the fraction range (mean
    log-odds over the curve).

    Returns:
        ``{"deletion_auc", "random_auc", "deletion_gap"}`` with ``gap = random_auc − deletion_auc`` in log-odds
        units (positive when the map points at what the decision depends on).
    """
    x = torch.as_tensor(x).detach().float()
    if x.ndim < 4 or x.shape[0] != 1:
        raise ValueError(f"expected one scan as a (1, C, *spatial) batch, got shape {tuple(x.shape)}.")
    saliency = torch.as_tensor(saliency).detach().float().to(x.device)
    if saliency.numel() != x[0].numel():
        raise ValueError(f"the saliency map {tuple(saliency.shape)} does not match the input {tuple(x.shape[1:])}.")
    if len(fractions) < 2 or any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"fractions must be at least two increasing values, got {list(fractions)}.")
    training = network.training
    network.eval()
    try:
        order = torch.argsort(saliency.reshape(-1), descending=True, stable=True)
        salient = _curve_area(fractions, _deletion_curve(network, x[0:1], order, class_idx, fractions))
        generator = torch.Generator().manual_seed(seed)
        random = []
        for _ in range(random_repeats):
            perm = torch.randperm(order.numel(), generator=generator).to(x.device)
            random.append(_curve_area(fractions, _deletion_curve(network, x[0:1], perm, class_idx, fractions)))
    finally:
        network.train(training)
    random_auc = float(np.mean(random))
    return {"deletion_auc": salient, "random_auc": random_auc, "deletion_gap": random_auc - salient}


def randomised_copy(network: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``network`` with every parameter and normalisation statistic re-initialised (seeded)."""
    net = copy.deepcopy(network)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in net.modules():
            if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                module.reset_parameters()
            if hasattr(module, "reset_running_stats") and callable(module.reset_running_stats):
                module.reset_running_stats()
    finally:
        torch.random.set_rng_state(state)
    return net


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and the split-level evaluation
# ---------------------------------------------------------------------------------------------------------------


def load_weights(
    network: nn.Module, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", how_to_train: str = ""
) -> nn.Module:
    """Load a checkpoint (a state dict, or ``{"model": state dict}``) into ``network``, in eval mode, on ``device``.

    Raises:
        MissingFileError: no such file (the message adds ``how_to_train``).
        InputError: unreadable checkpoint or one that does not match the network definition.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} not found.{' ' + how_to_train if how_to_train else ''}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable or not a state dict
        raise InputError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}).") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:300]
        raise InputError(
            f"checkpoint {path} does not match the network definition ({type(network).__name__}"
            f" {getattr(network, 'backbone', '')} {getattr(network, 'projection', '')}): {detail} ..."
        ) from None
    return network.to(device).eval()


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def _json_ready(x):
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class AttentionEvaluation:
    """Attention agreement and saliency faithfulness of a teacher and its students on a labelled split.

    For every scan: the teacher's Grad-CAM on the working-grid volume and each student's on its projection, for
    the class ``target``; :func:`attention_metrics`; with ``faithfulness``, :func:`deletion_scores` and the
    correlation with the map of a :func:`randomised_copy`; on the first ``occlusion_scans`` scans, the
    correlation of Grad-CAM with :func:`occlusion_saliency`.

    Targets: ``"hc"`` (default of ``configs/explain.json``): the evidence for normal uptake, the same class for
    every scan and model; ``"pd"``; ``"label"``: the true class; ``"predicted"``: each model's own prediction.
    Grad-CAM keeps positive evidence only, and the evidence for PD in a DaTscan is largely *missing* uptake,
    which no activation map can point at: a confident network's PD map is often empty (counted in
    ``map_empty``; empty maps give ``nan`` metrics, left out of the means).

    Writes ``attention_per_scan.csv`` (one row per scan and model) and ``attention_summary.json`` (mean, SD and
    count of every number per model, plus the settings) to ``output_dir``, and returns the summary.

    Args:
        datalist: entries ``{"image", "label"}`` (e.g. ``scripts.data.load_datalist(file, "test")``).
        volume_transforms: the bundle's volume preprocessing (``configs/inference.json#volume_transforms``).
        projection_transform: the students' projection (``configs/inference.json#projection_transform``).
        teacher: the teacher definition; ``teacher_file``: its checkpoint.
        student: the student definition; ``student_files``: ``{name: checkpoint}`` of the students to compare
            (each gets its own copy of the definition).
        output_dir: folder of the outputs.
        device: where the networks run.
        method: one of :data:`SALIENCY_METHODS`.
        target: ``"hc"``, ``"pd"``, ``"label"`` or ``"predicted"``.
        top_percent: ``k`` of the top-``k`` % IoU.
        faithfulness: run the deletion and randomisation checks.
        deletion_fractions: deletion steps (shares of the input).
        occlusion_scans: number of scans (from the start of the split) with the occlusion check (0: none).
        occlusion_mask: occluded patch size (voxels/pixels per side) of the occlusion check.
        occlusion_overlap: patch overlap of the occlusion check.
        seed: seed of the random deletion orders and of the weight randomisation.
    """

    TARGETS = ("label", "predicted", "hc", "pd")

    def __init__(
        self,
        datalist: Sequence[Mapping],
        volume_transforms: Sequence[Callable],
        projection_transform: Callable,
        teacher: nn.Module,
        teacher_file: str | os.PathLike,
        student: nn.Module,
        student_files: Mapping[str, str | os.PathLike],
        output_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        method: str = "gradcam",
        target: str = "hc",
        top_percent: float = 10.0,
        faithfulness: bool = True,
        deletion_fractions: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
        occlusion_scans: int = 0,
        occlusion_mask: int = 16,
        occlusion_overlap: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.datalist = list(datalist)
        self.target = look_up_option(target, self.TARGETS)
        if self.target == "label" and any("label" not in e for e in self.datalist):
            raise InputError("attention agreement with target='label' needs a labelled split (entries with 'label').")
        if not student_files:
            raise ValueError("student_files must name at least one student checkpoint.")
        self.preprocess = Compose(list(volume_transforms))
        self.project = projection_transform
        self.device = torch.device(device)
        self.method = look_up_option(method, SALIENCY_METHODS)
        self.models = {"teacher": load_weights(copy.deepcopy(teacher), teacher_file, self.device)}
        for name, path in student_files.items():
            if name == "teacher":
                raise ValueError("'teacher' is the teacher's name in the outputs; give the student another name.")
            self.models[name] = load_weights(copy.deepcopy(student), path, self.device)
        # randomised copies first: a copy made after the Grad-CAM hooks are registered would share them
        self.random_cams = (
            {name: GradCAMSaliency(randomised_copy(net, seed), self.method) for name, net in self.models.items()}
            if faithfulness
            else {}
        )
        self.cams = {name: GradCAMSaliency(net, self.method) for name, net in self.models.items()}
        self.top_percent = float(top_percent)
        self.faithfulness = parse_bool(faithfulness, "faithfulness")
        self.deletion_fractions = tuple(float(f) for f in deletion_fractions)
        self.occlusion_scans = int(occlusion_scans)
        self.occlusion_mask = int(occlusion_mask)
        self.occlusion_overlap = float(occlusion_overlap)
        self.seed = int(seed)
        self.output_dir = Path(output_dir)

    def _model_rows(
        self, name: str, x: torch.Tensor, label: int | None, do_occlusion: bool
    ) -> tuple[dict, SaliencyResult]:
        net = self.models[name]
        cls = {"label": label, "predicted": None, "hc": 0, "pd": 1}[self.target]
        result = self.cams[name](x, class_idx=cls)
        row: dict = {
            "model": name,
            "pd_probability": float(result.probabilities[1]),
            "correct": None if label is None else int(int(result.probabilities.argmax()) == label),
            "explained_class": result.class_idx,
            "map_empty": int(not bool(result.maps.max() > 0)),
        }
        if self.faithfulness and row["map_empty"]:  # nothing to rank voxels by
            row.update({"deletion_auc": float("nan"), "random_auc": float("nan"), "deletion_gap": float("nan")})
            row["randomised_spearman"] = float("nan")
        elif self.faithfulness:
            saliency = result.maps.expand_as(x[0]) if result.maps.shape[0] == 1 else result.maps
            row.update(deletion_scores(net, x, saliency, result.class_idx, self.deletion_fractions, seed=self.seed))
            row["randomised_spearman"] = spearman(result.maps, self.random_cams[name](x, result.class_idx).maps)
        if do_occlusion:
            occ = occlusion_saliency(
                net, x, result.class_idx, self.occlusion_mask, self.occlusion_overlap, per_channel=x.ndim == 4
            )
            row["occlusion_spearman"] = spearman(result.maps, occ.maps)
            row["occlusion_maps"] = occ.maps
        return row, result

    def run(self) -> dict:
        """Evaluate every scan, write the files and return the summary."""
        from scripts.anatomy import template_rois

        rows: list[dict] = []
        for i, entry in enumerate(self.datalist):
            item = self.preprocess({"image": entry["image"]})
            volume = item["image"]
            image = self.project({"image": volume})["image"]
            planes = projection_planes(image)
            rois = template_rois(tuple(volume.shape[1:]), np.asarray(volume.affine))
            label = int(entry["label"]) if "label" in entry else None
            occlusion = i < self.occlusion_scans
            x3 = volume.as_tensor()[None].to(self.device)
            t_row, t_res = self._model_rows("teacher", x3, label, occlusion)
            teacher_map = t_res.maps[0].cpu()
            t_row.update(attention_metrics(rois, teacher_map=teacher_map, top_percent=self.top_percent))
            if occlusion:
                occ_map = t_row.pop("occlusion_maps")[0].cpu()
                t_row["occlusion_striatum_share"] = roi_share(occ_map, roi_groups(rois)["striatum"])
            scan_rows = [t_row]
            x2 = image.as_tensor()[None].to(self.device)
            for name in self.models:
                if name == "teacher":
                    continue
                s_row, s_res = self._model_rows(name, x2, label, occlusion)
                metrics = attention_metrics(rois, teacher_map, s_res.maps.cpu(), planes, top_percent=self.top_percent)
                # the teacher's own volume shares are in the teacher's rows
                s_row.update({k: v for k, v in metrics.items() if not k.startswith("teacher_") or "_on_planes_" in k})
                if occlusion:
                    striatum = roi_planes(roi_groups(rois)["striatum"], planes)
                    s_row["occlusion_striatum_share"] = roi_share(s_row.pop("occlusion_maps").cpu(), striatum)
                scan_rows.append(s_row)
            for row in scan_rows:
                row.update({"image": str(entry["image"]), "label": label})
            rows += scan_rows
            logger.info(f"attention: scan {i + 1}/{len(self.datalist)} done ({entry['image']})")
        return self._write(rows)

    def _write(self, rows: list[dict]) -> dict:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields: list[str] = ["image", "label", "model"]
        for row in rows:
            fields += [k for k in row if k not in fields]
        tmp = self.output_dir / "attention_per_scan.csv.tmp"
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        os.replace(tmp, self.output_dir / "attention_per_scan.csv")
        models: dict[str, dict] = {}
        for name in self.models:
            mine = [r for r in rows if r["model"] == name]
            keys = [k for k in fields if k not in ("image", "label", "model") and any(k in r for r in mine)]
            models[name] = {k: _mean_sd([r.get(k) for r in mine]) for k in keys}
        summary = {
            "n_scans": len(self.datalist),
            "settings": {
                "method": self.method,
                "target": self.target,
                "top_percent": self.top_percent,
                "deletion_fractions": list(self.deletion_fractions),
                "occlusion_scans": min(self.occlusion_scans, len(self.datalist)),
                "occlusion_mask": self.occlusion_mask,
                "occlusion_overlap": self.occlusion_overlap,
                "target_layers": {name: cam.target_layer for name, cam in self.cams.items()},
            },
            "models": models,
        }
        tmp = self.output_dir / "attention_summary.json.tmp"
        tmp.write_text(json.dumps(_json_ready(summary), indent=2))
        os.replace(tmp, self.output_dir / "attention_summary.json")
        return summary
