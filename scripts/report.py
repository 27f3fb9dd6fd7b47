# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Per-scan reading reports and a static index page, written by inference (``--report True``).

For every scan, :class:`ReportWriter` (an ignite handler of the inference evaluator) writes
``<output_dir>/scans/<scan>.png``, one figure a reader takes in at a glance:

* the student's input, channel by channel, with its Grad-CAM overlay and the template striatal outlines;
* the teacher's Grad-CAM through the striatum in three orthogonal views (axial and coronal through the centre
  of the template striatum, sagittal through the putamen with the lower SBR);
* P(PD) of the student and of the teacher and the predicted class;
* the SBRs (caudate, putamen and posterior putamen, left and right; putamen asymmetry index) against the
  healthy-control range (mean ± 2 SD of the HC scans of a reference split, by default the datalist's training
  split), values outside the range flagged;
* input warnings (SBR not computable, striatal uptake away from the template striatum: the scan is probably not
  in MNI space, so SBRs and ROI outlines are unreliable).

``<output_dir>/index.html`` lists every scan (thumbnail, P(PD) of student and teacher, predicted class, lowest
putamen SBR, warnings), sortable by any column and sorted by the student's P(PD) at first; a scan that could
not be processed gets an error row with the reason. The page is static (inline CSS and script, images by
relative path), so the folder can be copied and opened in any browser. ``report.json`` holds the same rows.
The index is rewritten after every batch, so a run that stops early still leaves a page for what was done.

Images are shown with anterior (axial, sagittal) or superior (coronal, sagittal) up and the patient's right on
the right of the image (neurological convention), as ``scripts.handlers.ProjectionPNGSaver`` does.

matplotlib is optional (``configs/metadata.json`` lists it for the model zoo; ``requirements-dev.txt`` installs it):
it is imported only when a report is drawn, and :func:`require_matplotlib` stops a run that asks for reports without
it, before any scan is read, with the command that installs it.
"""

from __future__ import annotations

import copy
import functools
import html
import importlib.util
import json
import logging
import os
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import Compose
from scripts.attention import attention_metrics, projection_planes
from scripts.checkpoints import load_weights
from scripts.errors import InputError, find_input_error
from scripts.report_figure import REPORT_SBR_FEATURES, render_scan_report
from scripts.saliency import GradCAMSaliency, SaliencyResult
from torch import nn

__all__ = [
    "REPORT_SBR_FEATURES",
    "ScanRecord",
    "hc_reference_ranges",
    "render_scan_report",
    "write_index",
    "ReportWriter",
    "require_matplotlib",
]

MATPLOTLIB_REQUIREMENT = "matplotlib==3.11.2"
"""The matplotlib version the bundle is tested with (``configs/metadata.json``'s ``required_packages_version``)."""


def require_matplotlib(purpose: str = "the per-scan reports (--report True)") -> None:
    """Raise an :class:`~scripts.errors.InputError` naming the install command when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(
            f"{purpose} need matplotlib, which is not installed: pip install '{MATPLOTLIB_REQUIREMENT}' "
            "(or run without them)."
        )


_OFFSET_WARNING_MM = 12.0

logger = logging.getLogger(__name__)


@dataclass
class ScanRecord:
    """One row of the report index.

    Attributes:
        image: the scan's file (or DICOM folder).
        name: unique short name; the report is ``scans/<name>.png``.
        png: report image path relative to the index (``None`` when the scan has no report).
        student_pd / teacher_pd: P(PD) of each network (``None`` when not available).
        predicted_label: ``"PD"`` or ``"HC"`` from the inference network.
        sbr: SBR features shown in the report.
        warnings: input warnings.
        error: why the scan has no report (``None`` when it has one).
    """

    image: str
    name: str
    png: str | None = None
    student_pd: float | None = None
    teacher_pd: float | None = None
    predicted_label: str | None = None
    sbr: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


def _scan_stem(path: str) -> str:
    name = os.path.basename(str(path).rstrip("/"))
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def hc_reference_ranges(
    datalist_file: str | os.PathLike, split: str = "training", n_sd: float = 2.0
) -> dict[str, tuple[float, float]]:
    """Healthy-control SBR ranges ``mean ± n_sd · SD`` over the HC (label 0) scans of a datalist split.

    Raises:
        ValueError: when the split has fewer than 3 HC scans.
    """
    from scripts.data import load_datalist
    from scripts.sbr import compute_sbr
    from scripts.transforms import LoadScand

    entries = [e for e in load_datalist(datalist_file, split) if int(e["label"]) == 0]
    if len(entries) < 3:
        raise ValueError(f"{datalist_file} [{split}] has {len(entries)} HC scans; at least 3 are needed for a range.")
    load = LoadScand(keys="image")
    values = []
    for entry in entries:
        image = load({"image": entry["image"]})["image"]
        values.append(compute_sbr(image[0], image.affine))
    out = {}
    for feature in REPORT_SBR_FEATURES:
        v = np.asarray([row[feature] for row in values], dtype=np.float64)
        out[feature] = (float(v.mean() - n_sd * v.std(ddof=1)), float(v.mean() + n_sd * v.std(ddof=1)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Index page
# ---------------------------------------------------------------------------------------------------------------

TEMPLATES = Path(__file__).parent / "templates"
"""Folder of the page templates: ``report_index.html`` (the page) and ``report_row.html`` (one scan's row), filled
with :class:`string.Template` (every value HTML-escaped here)."""


def _num_cell(value: float | None, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return '<td class="num" data-value="">—</td>'
    return f'<td class="num" data-value="{value:.6f}">{value:.{digits}f}</td>'


@functools.cache
def _template(name: str) -> string.Template:
    return string.Template((TEMPLATES / name).read_text(encoding="utf-8"))


def _row_html(record: ScanRecord) -> str:
    e = html.escape
    report = "no report"
    if record.png:
        png, name = e(record.png), e(record.name)
        report = f'<a href="{png}"><img class="thumb" src="{png}" alt="report of {name}"></a>'
    label = record.predicted_label or ""
    problems = ([f"error: {record.error}"] if record.error else []) + list(record.warnings)
    lowest = record.sbr.get("lowest_putamen") if record.sbr else None
    return (
        _template("report_row.html")
        .substitute(
            status="error" if record.error else "ok",
            name=e(record.name),
            report=report,
            student_pd=_num_cell(record.student_pd),
            teacher_pd=_num_cell(record.teacher_pd),
            label=e(label),
            label_class=label.lower(),
            label_text=e(label) or "—",
            lowest_sbr=_num_cell(lowest, 2),
            problems="<br>".join(f'<span class="warn">{e(p)}</span>' for p in problems),
        )
        .strip()
    )


def _sort_key(record: ScanRecord) -> tuple:
    p = record.student_pd if record.student_pd is not None else record.teacher_pd
    return (p is None, -(p or 0.0), record.name)


def write_index(
    output_dir: str | os.PathLike,
    records: Sequence[ScanRecord],
    title: str = "DaTscan PD classification: scan reports",
    notes: Sequence[str] = (),
) -> Path:
    """Write ``index.html`` and ``report.json`` for ``records`` (rows sorted by P(PD), highest first)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=_sort_key)
    n, n_err = len(records), sum(1 for r in records if r.error)
    n_pd, n_hc = (sum(1 for r in records if r.predicted_label == label) for label in ("PD", "HC"))
    summary = f"{n} scan{'s' if n != 1 else ''}: {n_pd} predicted PD, {n_hc} predicted HC; {n_err} without a report."
    page = _template("report_index.html").substitute(
        title=html.escape(title),
        summary=html.escape(summary),
        notes="\n".join(f'<p class="notes">{html.escape(n)}</p>' for n in notes),
        rows="\n".join(_row_html(r) for r in records),
    )
    for name, text in (("index.html", page), ("report.json", json.dumps([asdict(r) for r in records], indent=2))):
        tmp = output_dir / f"{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, output_dir / name)
    return output_dir / "index.html"


# ---------------------------------------------------------------------------------------------------------------
# The inference handler
# ---------------------------------------------------------------------------------------------------------------


def _items(batch, output) -> list[tuple[object, torch.Tensor]]:
    """``(image, class probabilities)`` per scan of a MONAI engine's decollated batch and output."""
    images = [b["image"] for b in batch] if isinstance(batch, list) else list(batch["image"])
    preds = [o["pred"] for o in output] if isinstance(output, list) else list(output["pred"])
    return [(image, torch.as_tensor(p).detach().float().reshape(-1).cpu()) for image, p in zip(images, preds)]


def _explained(cam: GradCAMSaliency, x: torch.Tensor, predicted: int) -> tuple[SaliencyResult, str]:
    """Grad-CAM of the predicted class, or of the other class when that map is empty, with a title saying which.

    Grad-CAM keeps positive evidence only; a confident PD decision that rests on missing uptake can leave the PD
    map empty, and the map of the evidence for HC (the uptake that is there) is shown instead.
    """
    names = ("HC", "PD")
    result = cam(x, class_idx=predicted)
    if bool(result.maps.max() > 0):
        return result, f"Grad-CAM for {names[predicted]} (predicted)"
    other = cam(x, class_idx=1 - predicted)
    return other, (
        f"Grad-CAM for {names[predicted]} is empty (no positive evidence at this layer); shown: evidence for"
        f" {names[1 - predicted]}"
    )


def _uptake_offset_mm(volume: MetaTensor, striatum: np.ndarray) -> float:
    """Distance (mm) between the centroid of the hottest 1 % of the voxels and the template striatum's centroid."""
    v = np.asarray(volume[0].detach().cpu(), dtype=np.float64)
    hot = v >= np.quantile(v, 0.99)
    affine = np.asarray(volume.affine, dtype=np.float64)

    def world(mask: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        idx = np.argwhere(mask).astype(np.float64)
        w = None if weights is None else weights[mask]
        centre = np.average(idx, axis=0, weights=w)
        return affine[:3, :3] @ centre + affine[:3, 3]

    return float(np.linalg.norm(world(hot, v - np.median(v)) - world(striatum)))


class ReportWriter:
    """Ignite handler of the inference evaluator: per-scan report PNGs and ``index.html`` (module docstring).

    Args:
        output_dir: report folder (``index.html``, ``report.json``, ``scans/*.png``).
        network: the inference network (a 2D student; a 3D teacher when inference runs the teacher, then the
            teacher panels show it and there is no student panel). A copy is used for the saliency.
        volume_transforms: the bundle's volume preprocessing, to get each scan's working-grid volume.
        teacher: the teacher definition; ``teacher_file``: its checkpoint. A missing or unusable checkpoint gives
            reports without teacher maps, said on every page.
        datalist: the scans the run was given; scans that did not come through the run get an error row.
        reference_datalist / reference_split: where the HC SBR range comes from (``None``: no range).
        method: Grad-CAM method (``scripts.explain.SALIENCY_METHODS``).
        threshold: PD decision threshold of the predicted class.
        device: where the saliency runs.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        network: nn.Module,
        volume_transforms: Sequence[Callable],
        teacher: nn.Module | None = None,
        teacher_file: str | os.PathLike | None = None,
        datalist: Sequence[Mapping] | None = None,
        reference_datalist: str | os.PathLike | None = None,
        reference_split: str = "training",
        method: str = "gradcam",
        threshold: float = 0.5,
        device: str | torch.device = "cpu",
    ) -> None:
        require_matplotlib()
        self.output_dir = Path(output_dir)
        self.network = network
        self.preprocess = Compose(list(volume_transforms))
        self.teacher_def = teacher
        self.teacher_file = teacher_file
        self.datalist = [dict(e) for e in datalist] if datalist is not None else None
        self.reference_datalist = reference_datalist
        self.reference_split = reference_split
        self.method = method
        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.records: list[ScanRecord] = []
        self.notes: list[str] = []
        self._names: set[str] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _prepare(self, engine: Engine) -> None:
        """Saliency networks, teacher and HC ranges, once per run (after the CheckpointLoader's STARTED)."""
        self.records, self.notes, self._names = [], [], set()
        self._failed: dict[str, str] = {}
        net = copy.deepcopy(self.network).to(self.device).eval()
        self.teacher_only = getattr(net, "spatial_dims", 2) == 3
        self.student_cam = None if self.teacher_only else GradCAMSaliency(net, self.method)
        self.teacher_cam = None
        if self.teacher_only:
            self.teacher_cam = GradCAMSaliency(net, self.method)
        elif self.teacher_def is not None and self.teacher_file is not None:
            try:
                teacher = load_weights(copy.deepcopy(self.teacher_def), self.teacher_file, self.device, "teacher")
                self.teacher_cam = GradCAMSaliency(teacher, self.method)
            except (OSError, ValueError) as e:
                reason = str(e)  # a missing file's message gives the command that trains it
                self.notes.append(f"No teacher panel: {reason}")
                engine.logger.warning(f"report without the teacher: {reason}")
        else:
            self.notes.append("No teacher panel: no teacher checkpoint was given.")
        self.ranges = None
        if self.reference_datalist is not None:
            try:
                self.ranges = hc_reference_ranges(self.reference_datalist, self.reference_split)
                self.notes.append(
                    f"Healthy-control SBR range: mean ± 2 SD of the HC scans of {self.reference_datalist}"
                    f" [{self.reference_split}]."
                )
            except (OSError, ValueError, KeyError) as e:
                self.notes.append(f"No healthy-control SBR range ({e}).")
        else:
            self.notes.append("No healthy-control SBR range: no reference datalist was given.")

    def _on_started(self, engine: Engine) -> None:
        self._prepare(engine)
        write_index(self.output_dir, self._pending(), notes=self.notes)

    def _pending(self) -> list[ScanRecord]:
        """The records so far and a placeholder row for every scan of the datalist not reported yet."""
        seen = {os.path.abspath(r.image) for r in self.records}
        rows = list(self.records)
        for entry in self.datalist or []:
            path = str(entry["image"])
            if os.path.abspath(path) not in seen:
                rows.append(
                    ScanRecord(
                        image=path,
                        name=_scan_stem(path),
                        error="not reported yet: the run had not reached this scan when the page was written.",
                    )
                )
        return rows

    def _unique_name(self, image: str) -> str:
        stem, name, i = _scan_stem(image), _scan_stem(image), 2
        while name in self._names:
            name, i = f"{stem}_{i}", i + 1
        self._names.add(name)
        return name

    def _on_iteration(self, engine: Engine) -> None:
        for failure in getattr(engine.state, "failed_scans", None) or []:  # refused by the input checks or the gate
            if isinstance(failure, Mapping) and failure.get("image"):
                self._failed[os.path.abspath(str(failure["image"]))] = str(failure.get("reason", ""))
        for image, probs in _items(engine.state.batch, engine.state.output):
            path = str(image.meta.get("filename_or_obj", "")) if isinstance(image, MetaTensor) else ""
            record = ScanRecord(image=path, name=self._unique_name(path or f"scan_{len(self.records)}"))
            p_pd = float(probs[1]) if probs.numel() > 1 else float(probs[0])
            record.predicted_label = "PD" if p_pd >= self.threshold else "HC"
            if self.teacher_only:
                record.teacher_pd = p_pd
            else:
                record.student_pd = p_pd
            try:
                self._report(record, image, p_pd)
            except Exception as e:  # noqa: BLE001 - one scan's report must not stop the others
                record.error = f"report failed: {type(e).__name__}: {e}"
                engine.logger.warning(f"{path}: {record.error}")
            self.records.append(record)
        write_index(self.output_dir, self._pending(), notes=self.notes)

    def _report(self, record: ScanRecord, image, p_pd: float) -> None:
        from scripts.anatomy import template_rois
        from scripts.sbr import compute_sbr
        from scripts.transforms import LoadScand

        volume = self.preprocess({"image": record.image})["image"]
        rois = template_rois(tuple(volume.shape[1:]), np.asarray(volume.affine))
        x3 = volume.as_tensor()[None].float().to(self.device)
        student = dict(student_image=None, student_maps=None, planes=None, student_title="")
        student_maps = planes = None
        if not self.teacher_only:
            x2 = torch.as_tensor(image).as_subclass(torch.Tensor).float()[None].to(self.device)
            result, what = _explained(self.student_cam, x2, int(p_pd >= self.threshold))
            net = self.student_cam.network
            student_maps, planes = result.maps.cpu(), projection_planes(image)
            student = dict(
                student_image=np.asarray(torch.as_tensor(image).float().cpu()),
                student_maps=student_maps.numpy(),
                planes=planes.numpy(),
                student_title=f"{getattr(net, 'projection', '')} ({getattr(net, 'fusion', '')} fusion), {what}",
            )
        teacher_map, teacher_title = None, "teacher"
        if self.teacher_cam is not None:
            with torch.no_grad():
                predicted = int(torch.softmax(self.teacher_cam.network(x3).float(), dim=1)[0, 1] >= self.threshold)
            result, what = _explained(self.teacher_cam, x3, predicted)
            teacher_map = result.maps[0].cpu()
            record.teacher_pd = float(result.probabilities[1])
            teacher_title = f"Teacher (3D): {what}"
        shares = attention_metrics(rois, teacher_map, student_maps, planes)
        raw = LoadScand(keys="image")({"image": record.image})["image"]
        try:
            sbr = compute_sbr(raw[0], raw.affine)
            record.sbr = {k: round(float(sbr[k]), 4) for k in (*REPORT_SBR_FEATURES, "lowest_putamen")}
        except ValueError as e:
            record.warnings.append(f"SBR not computable: {e}")
        offset = _uptake_offset_mm(volume, np.asarray(rois["striatum"]))
        if offset > _OFFSET_WARNING_MM:
            record.warnings.append(
                f"the striatal uptake lies {offset:.0f} mm from the template striatum: the scan may not be in MNI"
                " space, so SBRs and outlines are unreliable."
            )
        meta_warnings = image.meta.get("warnings") if isinstance(image, MetaTensor) else None
        if meta_warnings:
            record.warnings += [str(w) for w in np.atleast_1d(meta_warnings)]
        png = self.output_dir / "scans" / f"{record.name}.png"
        render_scan_report(
            png,
            record.name,
            volume[0].cpu().numpy(),
            rois,
            teacher_map=None if teacher_map is None else teacher_map.numpy(),
            teacher_title=teacher_title,
            attention=shares,
            student_pd=record.student_pd,
            teacher_pd=record.teacher_pd,
            sbr=record.sbr or None,
            ranges=self.ranges,
            warnings=record.warnings,
            notes=[n for n in self.notes if n.startswith("No teacher")],
            **student,
        )
        record.png = f"scans/{png.name}"

    def _on_completed(self, engine: Engine) -> None:
        if self.datalist is not None:
            seen = {os.path.abspath(r.image) for r in self.records}
            for entry in self.datalist:
                path = str(entry["image"])
                if os.path.abspath(path) in seen:
                    continue
                record = ScanRecord(image=path, name=self._unique_name(path))
                if self._failed.get(os.path.abspath(path)):
                    record.error = self._failed[os.path.abspath(path)]
                    self.records.append(record)
                    continue
                try:
                    self.preprocess({"image": path})
                    record.error = "no prediction was produced for this scan."
                except Exception as e:  # noqa: BLE001 - the reason is what the row shows
                    reason = find_input_error(e) or e
                    record.error = str(reason).strip().splitlines()[0] if str(reason).strip() else type(e).__name__
                self.records.append(record)
        index = write_index(self.output_dir, self.records, notes=self.notes)
        engine.logger.info(f"report of {len(self.records)} scans written to {index}")
