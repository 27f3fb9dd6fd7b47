# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""What the networks look at: saliency maps, their place in the volume, attention agreement and faithfulness.

Saliency maps are computed by :mod:`scripts.saliency` (Grad-CAM, occlusion) and placed and compared by
:mod:`scripts.attention` (placement in the working grid, ROI shares, teacher-student agreement); their names are
re-exported here.

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose
from monai.utils import look_up_option
from scripts.attention import (
    ROI_GROUPS,
    attention_metrics,
    place_in_volume,
    projection_planes,
    roi_groups,
    roi_planes,
    roi_share,
    sample_planes,
    spearman,
    top_percent_iou,
)
from scripts.checkpoints import load_weights
from scripts.errors import InputError
from scripts.options import parse_bool
from scripts.saliency import (
    LAYER_GEOMETRY,
    SALIENCY_METHODS,
    TARGET_LAYERS,
    GradCAMSaliency,
    SaliencyResult,
    aligned_upsampler,
    default_target_layer,
    occlusion_saliency,
)
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
    "AttentionEvaluation",
]

logger = logging.getLogger(__name__)


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
        self.models = {"teacher": load_weights(copy.deepcopy(teacher), teacher_file, self.device, role="teacher")}
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
