# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""3D → 2D projections of a DaTscan volume ("partial input restriction"), as MONAI transforms.

The 2D student only sees a 2D image computed from the 3D volume. This module provides those projections,
a registry of their names and a dispatcher used by every config.

Input
    A channel-first single-channel volume ``(1, X, Y, Z)`` as a numpy array, a torch tensor or a MONAI
    ``MetaTensor``, in NIfTI voxel order as loaded by MONAI: ``x`` = left–right, ``y`` = posterior–anterior,
    ``z`` = inferior–superior. The projections are meant for the raw (e.g. min–max 0–255) intensities; any
    standardisation is applied afterwards to the 2D image.

Views
    A view is the axis the slices are taken along; a slice is the plane of the two other axes, in stored order
    (no rotation or flip):

    ==========  =============  ======================  ==========  ==========
    view        slicing axis   slice ``t``             H (rows)    W (columns)
    ==========  =============  ======================  ==========  ==========
    axial       z              ``img[:, :, :, t]``     x           y
    coronal     y              ``img[:, :, t, :]``     x           z
    sagittal    x              ``img[:, t, :, :]``     y           z
    ==========  =============  ======================  ==========  ==========

    Multi-view projections stack channels in the order ``[axial, coronal, sagittal]``; they need equal in-plane
    shapes for the three views, i.e. a cubic grid ``X = Y = Z`` (such as 64³).

Output
    A channel-first 2D image ``(C', H, W)`` of the same type family as the input: numpy in, numpy out; tensor
    in, tensor out; ``MetaTensor`` in, ``MetaTensor`` out. The dtype is the input's when it is floating point,
    else float32. For a ``MetaTensor`` the meta data are kept (``filename_or_obj`` etc.) except the stale 3D
    ``spatial_shape`` (removed) and ``affine`` (replaced by the 3×3 in-plane affine of the projected view, see
    :func:`plane_affine`; for multi-view outputs that of the first view, axial, since the other channels lie in
    other planes); ``meta["projection"]`` records the projection name and ``meta["projection_planes"]`` where
    each channel came from: an int64 ``(C', 2)`` tensor of rows ``(axis, index)``, the spatial axis sliced
    (0 = x, 1 = y, 2 = z, see :data:`VIEW_AXIS`) and the slice index along it, or ``-1`` for a channel computed
    from the whole stack of slices (dynamic image, entropy); it is what maps a 2D result (e.g. a saliency map)
    back to its place in the volume, whatever the centre mode. The applied-operation trace is
    reset, because the 3D operations cannot be inverted through a projection. Lists of outputs collate with
    ``monai.data.list_data_collate``.

Centre slice
    The slice-based projections take ``centre``: a fixed slice index; ``"template"``, the centre of the template
    striatum (:mod:`scripts.anatomy`) in each view of the image's own grid (:func:`template_centre`: the same slice
    for every scan on one grid, as the atlas-based centre of the original study); or ``"auto"``, which locates
    the striatum in each view from the data with :func:`find_slice_centre` (default: the uptake-weighted mean
    slice of the hottest 1 % of the voxels), for scans that are not aligned to the template. ``"auto"`` depends
    on the scan's own uptake, so the anatomy a model sees can depend on the class (a PD scan's hottest voxels
    sit elsewhere than a control's) and a hot spot outside the striatum moves it; the bundle's configs use
    ``"template"``. A ``MetaTensor`` output records the centres used in ``meta["slice_centre"]`` (``{view:
    index}``), and ``"auto"`` logs them at debug level (logger ``scripts.projections``).

Whole-stack projections
    The dynamic image (approximate rank pooling, rescaled to ``[0, 1]`` in floating point, without any 8-bit
    quantisation) and the entropy-weighted projection use every slice along the view axis; see
    :class:`DynamicImage` and :class:`EntropyProjection`.

Registry (:data:`PROJECTIONS`, :func:`projection_spec`, :class:`Projection`, :class:`Projectiond`)

    ===========================  ==============  ========  =================================================
    name                         channels        fusion    image
    ===========================  ==============  ========  =================================================
    single_slice                 1 (2g+1)        early     centre slice (gap g > 0: slices c−g..c+g, "mean")
    early_fusion_slices          k               early     k adjacent slices c−k//2..c+k//2 of one view
    joint_fusion_slices          k               joint     same image as early_fusion_slices
    early_fusion_views           3               early     centre slice of each view
    joint_fusion_views           3               joint     same image as early_fusion_views
    early_fusion_views_slices    3k              early     k adjacent slices of each view
    dynamic_image                1               early     rank-pooling dynamic image of one view
    dynamic_image_views          3               early     dynamic image of each view
    entropy                      1               early     entropy-weighted mean of the slices of one view
    entropy_views                3               early     entropy-weighted mean of each view
    ===========================  ==============  ========  =================================================

    ``fusion`` tells the network how to read the channels: ``"early"``: one CNN over all channels; ``"joint"``:
    a shared 1-channel encoder per channel with the embeddings concatenated; ``"mean"``: a shared 1-channel
    encoder per channel with the outputs averaged (one prediction per scan, not per slice).

The names, specifications and argument checks live in :mod:`scripts.projection_common`, the centre slices in
:mod:`scripts.slice_centre`; their public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends
from scripts.errors import InputError
from scripts.projection_common import (
    CENTRE_METHODS,
    CENTRE_MODES,
    DYNAMIC_IMAGE_VARIANTS,
    FUSIONS,
    PROJECTIONS,
    VIEW_AXIS,
    VIEWS,
    CentreLike,
    ProjectionSpec,
    _check_bins,
    _check_centre,
    _check_centre_method,
    _check_int,
    _check_num_slices,
    _check_same_planes,
    _check_smoothing,
    _check_variant,
    _check_view,
    _check_views,
    _out_dtype,
    _slices_first,
    _volume,
    _volume_any,
    _wrap_output,
    plane_affine,
    projection_spec,
)
from scripts.slice_centre import _resolve_centres, find_slice_centre, template_centre, template_grid_affine

__all__ = [
    "VIEWS",
    "VIEW_AXIS",
    "FUSIONS",
    "PROJECTIONS",
    "DYNAMIC_IMAGE_VARIANTS",
    "CENTRE_METHODS",
    "ProjectionSpec",
    "projection_spec",
    "find_slice_centre",
    "template_centre",
    "template_grid_affine",
    "CENTRE_MODES",
    "rank_pooling_coefficients",
    "slice_entropy",
    "plane_affine",
    "AdjacentSlices",
    "AdjacentSlicesd",
    "DynamicImage",
    "DynamicImaged",
    "EntropyProjection",
    "EntropyProjectiond",
    "Projection",
    "Projectiond",
]


# ---------------------------------------------------------------------------------------------------------------
# Dynamic image and entropy weights
# ---------------------------------------------------------------------------------------------------------------


def rank_pooling_coefficients(
    num_frames: int, variant: str = "canonical", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Approximate rank pooling coefficients ``α_t``, ``t = 1 .. T``.

    ``"canonical"``: ``α_t = Σ_{i=t}^{T} (2i − T − 1) / i`` (they sum to 0).
    ``"reference"``: ``α_t = Σ_{i=t}^{T} (2i − T) / i`` (they sum to ``T``; the variant of a widely used
    implementation).

    Returns:
        ``(T,)`` tensor; entry ``t − 1`` is ``α_t``.
    """
    n = _check_int(num_frames, "num_frames", 1)
    variant = _check_variant(variant)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    terms = (2 * i - n - 1) / i if variant == "canonical" else (2 * i - n) / i
    return torch.flip(torch.cumsum(torch.flip(terms, (0,)), 0), (0,)).to(dtype)


def slice_entropy(volume: NdarrayOrTensor, view: str, bins: int = 256) -> torch.Tensor:
    """Shannon entropy (natural log) of the grey-level histogram of every slice along ``view``.

    The whole volume is first quantised to ``bins`` levels over its own range:
    ``level = min(⌊bins · (v − min) / (max − min)⌋, bins − 1)`` (all level 0 for a constant volume). For slice
    ``t`` with level frequencies ``p_b``, ``H_t = −Σ_b p_b ln p_b`` (``0 ln 0 = 0``).

    Args:
        volume: ``(1, X, Y, Z)`` channel-first or ``(X, Y, Z)`` volume.
        view: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        bins: number of grey levels (>= 2).

    Returns:
        ``(T,)`` float64 tensor of entropies, ``T`` being the volume size along the view's axis.
    """
    view = _check_view(view)
    bins = _check_bins(bins)
    vol = _volume_any(volume).to(torch.float64)
    lo, hi = vol.min(), vol.max()
    if bool(hi > lo):
        levels = torch.floor((vol - lo) / (hi - lo) * bins).clamp_(0, bins - 1).long()
    else:
        levels = torch.zeros(vol.shape, dtype=torch.long, device=vol.device)
    stack = _slices_first(levels, view).reshape(vol.shape[VIEW_AXIS[view]], -1)
    counts = torch.zeros(stack.shape[0], bins, dtype=torch.float64, device=vol.device)
    counts.scatter_add_(1, stack, torch.ones_like(stack, dtype=torch.float64))
    p = counts / stack.shape[1]
    return -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Array transforms
# ---------------------------------------------------------------------------------------------------------------


class AdjacentSlices(Transform):
    """Adjacent slices around a centre slice, as channels, for one or several views.

    For each view ``v`` (in the given order) with centre ``c_v`` and ``h = num_slices // 2``, the channels are
    the slices ``S_v[c_v − h], …, S_v[c_v + h]`` in increasing index order, where ``S_v[t]`` is slice ``t`` along
    the view's axis (see the module table for the H and W axes). Output ``(len(views) · num_slices, H, W)``.

    ``num_slices = 1`` is the single centre slice; ``num_slices = k`` with one view is 2D+ε; the three views
    with ``k`` slices give ``[axial slices…, coronal slices…, sagittal slices…]``.

    Args:
        view: a view name or a sequence of view names (channel order); several views need a cubic grid.
        centre: ``"template"`` (:func:`template_centre` on the image's grid: its ``MetaTensor`` affine, or the MNI
            2 mm field of view for a plain array), ``"auto"`` (:func:`find_slice_centre`), both per view and then
            clamped so that all ``num_slices`` slices fit; an int slice index (the same for every view); a sequence
            of three ints / names in the order ``(axial, coronal, sagittal)``; or a mapping ``{view: int | name}``
            for all three views. A fixed centre without ``h`` neighbours on both sides raises ``ValueError``.
        num_slices: odd number ``k >= 1`` of adjacent slices per view.
        centre_method: ``"centroid"`` or ``"peak"``, how :func:`find_slice_centre` finds an automatic centre.
        centre_sigma: Gaussian smoothing (slices) of an automatic ``"peak"`` centre.
        centre_quantile: uptake quantile of an automatic centre.
        name: value recorded in ``meta["projection"]`` of a ``MetaTensor`` output.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        view: str | Sequence[str] = "axial",
        centre: CentreLike = "auto",
        num_slices: int = 1,
        centre_method: str = "centroid",
        centre_sigma: float = 2.0,
        centre_quantile: float = 0.99,
        name: str = "adjacent_slices",
    ) -> None:
        self.views = _check_views(view)
        self.centre = _check_centre(centre)
        self.num_slices = _check_num_slices(num_slices)
        self.centre_method = _check_centre_method(centre_method)
        self.centre_sigma, self.centre_quantile = _check_smoothing(centre_sigma, centre_quantile)
        self.name = name

    def _centres(self, vol: torch.Tensor, img: NdarrayOrTensor) -> dict[str, int]:
        return _resolve_centres(
            vol,
            self.views,
            self.centre,
            self.num_slices // 2,
            self.centre_method,
            self.centre_sigma,
            self.centre_quantile,
            img.affine if isinstance(img, MetaTensor) else None,
        )

    def centres(self, img: NdarrayOrTensor) -> dict[str, int]:
        """The centre slice index used for each view of ``img`` ``(1, X, Y, Z)``."""
        try:
            return self._centres(_volume(img), img)
        except InputError as e:
            name = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
            raise InputError(f"{name}: {e}" if name else str(e)) from None

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(1, X, Y, Z)`` → ``(len(views) · num_slices, H, W)``."""
        vol = _volume(img)
        _check_same_planes(vol, self.views)
        half = self.num_slices // 2
        channels, planes = [], []
        centres = self.centres(img)
        for v, c in centres.items():
            channels.append(_slices_first(vol, v)[c - half : c + half + 1])
            planes += [(VIEW_AXIS[v], t) for t in range(c - half, c + half + 1)]
        out = torch.cat(channels, dim=0).to(_out_dtype(vol))
        return _wrap_output(out, img, self.views[0], self.name, planes, centres)


class DynamicImage(Transform):
    """Dynamic image by approximate rank pooling over all slices of a view.

    The slices along the view axis are the frames, in index order (frame ``t`` = slice ``t − 1``, ``t = 1..T``):

        DI = Σ_{t=1}^{T} α_t V_t,   then   DI' = (DI − min DI) / (max DI − min DI) ∈ [0, 1],

    with ``α_t`` from :func:`rank_pooling_coefficients` (``variant``), computed in float64. A DI that is constant
    up to rounding (range ≤ 1e-10 · Σ|α_t| · max|V|, e.g. a constant volume or one whose slices are all equal)
    gives zeros. Several views give one channel per view, in the given order.

    Args:
        view: a view name or a sequence of view names (channel order); several views need a cubic grid.
        variant: ``"canonical"`` or ``"reference"``.
        name: value recorded in ``meta["projection"]`` of a ``MetaTensor`` output.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self, view: str | Sequence[str] = "axial", variant: str = "canonical", name: str = "dynamic_image"
    ) -> None:
        self.views = _check_views(view)
        self.variant = _check_variant(variant)
        self.name = name

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(1, X, Y, Z)`` → ``(len(views), H, W)`` in ``[0, 1]``."""
        vol = _volume(img)
        _check_same_planes(vol, self.views)
        v64 = vol.to(torch.float64)
        vmax = float(v64.abs().max()) if v64.numel() else 0.0
        channels = []
        for v in self.views:
            stack = _slices_first(v64, v)
            alpha = rank_pooling_coefficients(stack.shape[0], self.variant).to(stack.device)
            di = torch.tensordot(alpha, stack, dims=1)
            lo, hi = di.min(), di.max()
            tol = 1e-10 * float(alpha.abs().sum()) * vmax
            channels.append((di - lo) / (hi - lo) if float(hi - lo) > tol else torch.zeros_like(di))
        out = torch.stack(channels, dim=0).to(_out_dtype(vol))
        return _wrap_output(out, img, self.views[0], self.name, [(VIEW_AXIS[v], -1) for v in self.views])


class EntropyProjection(Transform):
    """Entropy-weighted mean of all slices of a view.

        image = Σ_t H_t V_t / (Σ_t H_t + 1e-5),

    with ``H_t`` the grey-level entropy of slice ``t`` from :func:`slice_entropy` (``bins`` levels over the
    volume's range) and ``V_t`` the float (not quantised) slice values; computed in float64. Slices with more
    grey-level variety get more weight; an all-constant volume gives zeros. Several views give one channel per
    view, in the given order.

    Args:
        view: a view name or a sequence of view names (channel order); several views need a cubic grid.
        bins: number of grey levels of the histogram.
        name: value recorded in ``meta["projection"]`` of a ``MetaTensor`` output.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, view: str | Sequence[str] = "axial", bins: int = 256, name: str = "entropy") -> None:
        self.views = _check_views(view)
        self.bins = _check_bins(bins)
        self.name = name

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(1, X, Y, Z)`` → ``(len(views), H, W)``."""
        vol = _volume(img)
        _check_same_planes(vol, self.views)
        v64 = vol.to(torch.float64)
        channels = []
        for v in self.views:
            weights = slice_entropy(v64, v, self.bins)
            channels.append(torch.tensordot(weights, _slices_first(v64, v), dims=1) / (weights.sum() + 1e-5))
        out = torch.stack(channels, dim=0).to(_out_dtype(vol))
        return _wrap_output(out, img, self.views[0], self.name, [(VIEW_AXIS[v], -1) for v in self.views])


class Projection(Transform):
    """Apply the projection named ``projection`` (one of :data:`PROJECTIONS`; see the module table).

    Args:
        projection: projection name; :func:`projection_spec` gives its channels and fusion mode.
        view: view of the single-view projections (``single_slice``, ``*_fusion_slices``, ``dynamic_image``,
            ``entropy``); validated but unused by the multi-view ones, which always use
            ``(axial, coronal, sagittal)``.
        centre: centre slice of the slice-based projections, as in :class:`AdjacentSlices`; unused otherwise.
        num_slices: ``k`` of the ``*_slices`` projections (odd).
        gap: ``g`` of ``single_slice``: the ``2g + 1`` slices ``c − g .. c + g``.
        dynamic_image_variant: ``"canonical"`` or ``"reference"`` coefficients of the dynamic images.
        bins: grey levels of the entropy projections.
        centre_method: ``"centroid"`` or ``"peak"``, how :func:`find_slice_centre` finds an automatic centre.
        centre_sigma: Gaussian smoothing (slices) of an automatic ``"peak"`` centre.
        centre_quantile: uptake quantile of an automatic centre.

    Every argument is validated, also those the chosen projection does not use, so that a typo in a config
    fails early whatever the projection.

    Raises:
        ValueError: unknown projection (listing the valid ones), view, variant or centre method, even
            ``num_slices``, negative ``gap``, a malformed centre, ``bins < 2``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        projection: str,
        view: str = "axial",
        centre: CentreLike = "auto",
        num_slices: int = 3,
        gap: int = 0,
        dynamic_image_variant: str = "canonical",
        bins: int = 256,
        centre_method: str = "centroid",
        centre_sigma: float = 2.0,
        centre_quantile: float = 0.99,
    ) -> None:
        self.spec = projection_spec(projection, num_slices, gap)
        # every argument is validated, also those the chosen projection does not use
        view = _check_view(view)
        _check_variant(dynamic_image_variant)
        _check_bins(bins)
        _check_centre(centre)
        _check_centre_method(centre_method)
        _check_smoothing(centre_sigma, centre_quantile)
        name = self.spec.name
        slices = {
            "centre": centre,
            "centre_method": centre_method,
            "centre_sigma": centre_sigma,
            "centre_quantile": centre_quantile,
            "name": name,
        }
        if name == "single_slice":
            self.transform: Transform = AdjacentSlices(view, num_slices=2 * int(gap) + 1, **slices)
        elif name in ("early_fusion_slices", "joint_fusion_slices"):
            self.transform = AdjacentSlices(view, num_slices=num_slices, **slices)
        elif name in ("early_fusion_views", "joint_fusion_views"):
            self.transform = AdjacentSlices(VIEWS, num_slices=1, **slices)
        elif name == "early_fusion_views_slices":
            self.transform = AdjacentSlices(VIEWS, num_slices=num_slices, **slices)
        elif name in ("dynamic_image", "dynamic_image_views"):
            views = VIEWS if name.endswith("_views") else view
            self.transform = DynamicImage(views, variant=dynamic_image_variant, name=name)
        else:
            views = VIEWS if name.endswith("_views") else view
            self.transform = EntropyProjection(views, bins=bins, name=name)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(1, X, Y, Z)`` → ``(spec.in_channels, H, W)``."""
        return self.transform(img)


# ---------------------------------------------------------------------------------------------------------------
# Dictionary transforms
# ---------------------------------------------------------------------------------------------------------------


class _ArrayMapd(MapTransform):
    """Apply ``self.transform`` to every key."""

    transform: Transform
    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class AdjacentSlicesd(_ArrayMapd):
    """Dictionary version of :class:`AdjacentSlices`."""

    def __init__(
        self,
        keys: KeysCollection,
        view: str | Sequence[str] = "axial",
        centre: CentreLike = "auto",
        num_slices: int = 1,
        centre_method: str = "centroid",
        centre_sigma: float = 2.0,
        centre_quantile: float = 0.99,
        name: str = "adjacent_slices",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = AdjacentSlices(view, centre, num_slices, centre_method, centre_sigma, centre_quantile, name)


class DynamicImaged(_ArrayMapd):
    """Dictionary version of :class:`DynamicImage`."""

    def __init__(
        self,
        keys: KeysCollection,
        view: str | Sequence[str] = "axial",
        variant: str = "canonical",
        name: str = "dynamic_image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = DynamicImage(view, variant, name)


class EntropyProjectiond(_ArrayMapd):
    """Dictionary version of :class:`EntropyProjection`."""

    def __init__(
        self,
        keys: KeysCollection,
        view: str | Sequence[str] = "axial",
        bins: int = 256,
        name: str = "entropy",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = EntropyProjection(view, bins, name)


class Projectiond(_ArrayMapd):
    """Dictionary version of :class:`Projection`: replaces each ``keys`` volume by its named 2D projection.

    Typical use keeps the volume for a 3D teacher under another key first (e.g. ``CopyItemsd``), then
    ``Projectiond(keys="image", projection="early_fusion_slices")``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        projection: str,
        view: str = "axial",
        centre: CentreLike = "auto",
        num_slices: int = 3,
        gap: int = 0,
        dynamic_image_variant: str = "canonical",
        allow_missing_keys: bool = False,
        bins: int = 256,
        centre_method: str = "centroid",
        centre_sigma: float = 2.0,
        centre_quantile: float = 0.99,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Projection(
            projection,
            view,
            centre,
            num_slices,
            gap,
            dynamic_image_variant,
            bins,
            centre_method,
            centre_sigma,
            centre_quantile,
        )
        self.spec = self.transform.spec
