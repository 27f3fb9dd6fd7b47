# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The per-scan report figure (:func:`render_scan_report`) that :class:`scripts.report.ReportWriter` saves as
``scans/<scan>.png``: the student's input with its saliency, the teacher's saliency in three views, P(PD) and the
SBRs against the healthy-control range (layout: :mod:`scripts.report`).

Images are shown with anterior (axial, sagittal) or superior (coronal, sagittal) up and the patient's right on the
right of the image (neurological convention). matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scripts.attention import roi_groups, roi_planes

__all__ = ["REPORT_SBR_FEATURES", "render_scan_report"]

REPORT_SBR_FEATURES = (
    "caudate_L",
    "caudate_R",
    "putamen_L",
    "putamen_R",
    "putamen_post_L",
    "putamen_post_R",
    "putamen_ai",
)
"""SBR features shown in a report, from :func:`scripts.sbr.compute_sbr`."""

_SBR_LABELS = {
    "caudate_L": "caudate L",
    "caudate_R": "caudate R",
    "putamen_L": "putamen L",
    "putamen_R": "putamen R",
    "putamen_post_L": "post. putamen L",
    "putamen_post_R": "post. putamen R",
    "putamen_ai": "putamen AI (%)",
}
_AXIS_VIEW = {2: "axial", 1: "coronal", 0: "sagittal"}
_AXIS_LETTER = {0: "x", 1: "y", 2: "z"}


def _display(plane: np.ndarray) -> np.ndarray:
    """Rotate a stored ``(H, W)`` plane so that anterior/superior is up and the patient's right is right."""
    return np.rot90(np.asarray(plane), 1)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _side_labels(axis: int) -> tuple[str, str]:
    """(left edge, right edge) letters of a displayed plane sliced along ``axis``."""
    return ("P", "A") if axis == 0 else ("L", "R")


def _draw_plane(ax, image, saliency, outlines, title: str, axis: int) -> object:
    """Grey image, saliency overlay (values < 0.2 transparent) and ROI outlines on one axes."""
    ax.imshow(_display(_minmax(image)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    overlay = None
    if saliency is not None:
        s = _display(saliency)
        overlay = ax.imshow(
            np.ma.masked_less(s, 0.2), cmap="turbo", vmin=0, vmax=1, alpha=0.45, interpolation="bilinear"
        )
    for mask, colour in outlines:
        m = _display(mask.astype(float))
        if m.any():
            ax.contour(m, levels=[0.5], colors=[colour], linewidths=0.8)
    left, right = _side_labels(axis)
    ax.text(0.02, 0.5, left, transform=ax.transAxes, color="white", fontsize=8, va="center")
    ax.text(0.98, 0.5, right, transform=ax.transAxes, color="white", fontsize=8, va="center", ha="right")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return overlay


def _outline_masks(groups: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, str]]:
    return [(groups["caudate"], "cyan"), (groups["putamen"], "lime"), (groups["putamen_post"], "yellow")]


def _fmt_p(p: float | None) -> str:
    return "—" if p is None else f"{p:.3f} ({'PD' if p >= 0.5 else 'HC'})"


def render_scan_report(
    path: str | os.PathLike,
    name: str,
    volume: np.ndarray,
    rois: Mapping[str, np.ndarray],
    student_image: np.ndarray | None = None,
    student_maps: np.ndarray | None = None,
    planes: np.ndarray | None = None,
    student_title: str = "student",
    teacher_map: np.ndarray | None = None,
    teacher_title: str = "teacher",
    attention: Mapping[str, float] | None = None,
    student_pd: float | None = None,
    teacher_pd: float | None = None,
    sbr: Mapping[str, float] | None = None,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
    dpi: int = 80,
) -> Path:
    """Draw one scan's report PNG (see the module docstring).

    Args:
        path: output PNG file.
        name: scan name (figure title).
        volume: ``(X, Y, Z)`` working-grid volume.
        rois: template ROIs on the working grid (``scripts.anatomy.template_rois``).
        student_image: ``(C, H, W)`` student input (``None``: no student panels).
        student_maps: ``(C, H, W)`` its saliency (``None``: no overlay).
        planes: ``(C, 2)`` source planes of the student's channels.
        student_title: what the student saw (projection, fusion).
        teacher_map: ``(X, Y, Z)`` teacher saliency (``None``: the teacher panels show the volume only).
        teacher_title: what the teacher's map shows.
        attention: :func:`scripts.explain.attention_metrics` of the maps (striatal shares, agreement), or ``None``.
        student_pd: the student's P(PD).
        teacher_pd: the teacher's P(PD).
        sbr: SBR features (``None`` when unavailable).
        ranges: HC ranges ``{feature: (low, high)}`` (``None`` when unavailable).
        warnings: input warnings, shown in red.
        notes: other remarks, shown in grey.
        dpi: resolution (the figure is 14 × 8.6 in).
    """
    from matplotlib.figure import Figure  # lazily: only reports need matplotlib

    volume = np.asarray(volume, dtype=np.float32)
    groups = roi_groups(rois)

    fig = Figure(figsize=(14, 8.6), dpi=dpi, layout="constrained")
    verdict = student_pd if student_pd is not None else teacher_pd
    fig.suptitle(
        f"{name}    prediction: {'—' if verdict is None else ('PD' if verdict >= 0.5 else 'HC')}"
        f"    P(PD) student {_fmt_p(student_pd)}, teacher {_fmt_p(teacher_pd)}",
        fontsize=12,
        fontweight="bold",
    )
    left, right = fig.subfigures(1, 2, width_ratios=[2.3, 1.2])
    top, bottom = left.subfigures(2, 1)
    n_ch = 0 if student_image is None else int(student_image.shape[0])
    cols = max(3, n_ch)
    overlay = None
    # the student's input, channel by channel
    if student_image is not None:
        top.suptitle(f"Student input: {student_title}", fontsize=9.5)
        axes = top.subplots(1, cols, squeeze=False)[0]
        plane_rois = {k: roi_planes(v, torch.as_tensor(planes)).numpy() for k, v in groups.items()}
        for k, ax in enumerate(axes):
            if k >= n_ch:
                ax.axis("off")
                continue
            axis, index = (int(v) for v in planes[k])
            where = "whole stack" if index < 0 else f"{_AXIS_LETTER[axis]}={index}"
            outlines = [] if index < 0 else _outline_masks({g: m[k] for g, m in plane_rois.items()})
            s = None if student_maps is None else student_maps[k]
            overlay = _draw_plane(ax, student_image[k], s, outlines, f"{_AXIS_VIEW[axis]} {where}", axis) or overlay
    else:
        top.text(0.5, 0.5, "No student panel: inference ran the 3D teacher.", ha="center", va="center", fontsize=10)
    # the teacher through the striatum: axial and coronal through its centre, sagittal through the lower putamen
    centre = [int(round(float(c))) for c in np.argwhere(groups["striatum"]).mean(axis=0)]
    side = "L"
    if sbr and "putamen_L" in sbr and "putamen_R" in sbr:
        side = "L" if sbr["putamen_L"] <= sbr["putamen_R"] else "R"
    putamen = np.argwhere(np.asarray(rois[f"putamen_{side}"]))
    x_put = int(round(float(putamen[:, 0].mean()))) if putamen.size else centre[0]
    views = [(2, centre[2], "axial"), (1, centre[1], "coronal"), (0, x_put, f"sagittal ({side} putamen)")]
    bottom.suptitle(teacher_title, fontsize=9.5)
    axes = bottom.subplots(1, cols, squeeze=False)[0]
    for ax in axes[len(views) :]:
        ax.axis("off")
    for ax, (axis, index, label) in zip(axes, views):
        sl = [slice(None)] * 3
        sl[axis] = index
        sl = tuple(sl)
        t = None if teacher_map is None else np.asarray(teacher_map)[sl]
        outlines = _outline_masks({g: m[sl] for g, m in groups.items()})
        overlay = _draw_plane(ax, volume[sl], t, outlines, f"{label} {_AXIS_LETTER[axis]}={index}", axis) or overlay
    # right column: SBR against the HC range, the saliency colour scale, then shares, warnings and notes
    ax_sbr, cax, ax = right.subplots(3, 1, height_ratios=[1.1, 0.05, 1])
    _draw_sbr(ax_sbr, sbr, ranges)
    if overlay is not None:
        cbar = right.colorbar(overlay, cax=cax, orientation="horizontal")
        cbar.set_label("Grad-CAM (scaled to its maximum; below 0.2 not shown)", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    else:
        cax.axis("off")
    ax.axis("off")
    lines = [("Outlines: caudate (cyan), putamen (green), posterior putamen (yellow)", "dimgray")]
    for who in ("student", "teacher"):
        share, chance = (attention or {}).get(f"{who}_striatum_share"), (attention or {}).get(f"{who}_striatum_chance")
        if share is not None and np.isfinite(share):
            post = attention.get(f"{who}_putamen_post_share", float("nan"))
            lines.append(
                (
                    f"{who.capitalize()} saliency in the striatum: {100 * share:.1f} % (uniform map:"
                    f" {100 * chance:.1f} %), posterior putamen {100 * post:.1f} %",
                    "black",
                )
            )
    if attention and np.isfinite(attention.get("spearman_striatum", float("nan"))):
        lines.append(
            (
                f"Teacher–student agreement on the student's slices: Spearman {attention['spearman_striatum']:.2f}"
                " over the striatum",
                "black",
            )
        )
    lines += [(f"Warning: {w}", "firebrick") for w in warnings] or [("No input warnings.", "darkgreen")]
    lines += [(n, "dimgray") for n in notes]
    lines.append(("Research use only. Not for clinical or diagnostic use.", "dimgray"))
    y = 1.0
    for text, colour in lines:
        wrapped = textwrap.fill(text, 54)
        ax.text(0.0, y, wrapped, transform=ax.transAxes, fontsize=8.5, color=colour, va="top")
        y -= 0.065 * (wrapped.count("\n") + 1) + 0.025
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path


def _draw_sbr(ax, sbr: Mapping[str, float] | None, ranges: Mapping[str, tuple[float, float]] | None) -> None:
    """SBRs as dots against the HC range (grey bars); the asymmetry index as text below."""
    ax.set_title("SBR vs healthy-control range (mean ± 2 SD)" if ranges else "SBR (no HC reference range)", fontsize=9)
    if not sbr:
        ax.axis("off")
        ax.text(0.5, 0.5, "SBR not available", ha="center", va="center", transform=ax.transAxes)
        return
    features = [f for f in REPORT_SBR_FEATURES if f != "putamen_ai" and f in sbr]
    ys = np.arange(len(features))[::-1]
    for y, feature in zip(ys, features):
        value = sbr[feature]
        colour = "black"
        if ranges and feature in ranges:
            lo, hi = ranges[feature]
            ax.plot([lo, hi], [y, y], color="0.8", linewidth=8, solid_capstyle="butt")
            colour = "firebrick" if value < lo else ("darkorange" if value > hi else "darkgreen")
        ax.plot([value], [y], "o", color=colour, markersize=7)
        ax.text(value, y + 0.28, f"{value:.2f}", fontsize=7.5, ha="center", color=colour)
    ax.set_yticks(ys, [_SBR_LABELS[f] for f in features], fontsize=8)
    ax.set_ylim(-1.6, len(features) - 0.4)
    highest = max([sbr[f] for f in features] + [hi for f, (lo, hi) in (ranges or {}).items() if f in features])
    ax.set_xlim(min(0.0, min(sbr[f] for f in features)) - 0.1, highest + 0.4)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("SBR = mean(ROI) / mean(occipital) − 1", fontsize=8)
    if "putamen_ai" in sbr:
        ai = sbr["putamen_ai"]
        text = f"putamen asymmetry index {ai:.1f} %"
        colour = "black"
        if ranges and "putamen_ai" in ranges:
            lo, hi = ranges["putamen_ai"]
            text += f"  (HC up to {max(hi, 0.0):.1f} %)"
            colour = "darkorange" if ai > hi else "darkgreen"
        ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=8.5, color=colour)
