# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The information budget of a phantom population: how well PD can be told from HC from the whole striatum vs from
exactly the voxels each 2D projection feeds the student (``python -m scripts.synthetic --information``).

Every scan is rendered on the bundle's input grid (the MNI 2 mm field of view resampled to 64³, RAS,
:func:`scripts.projections.template_grid_affine`). A *voxel set* is what one input sees:

* ``whole_volume``: every voxel (the 3D teacher);
* ``single_slice``: the template centre axial slice (``single_slice``);
* ``three_slices``: the three adjacent axial slices around it (``early_fusion_slices`` / ``joint_fusion_slices``);
* ``views``: the template centre slice of each view, axial, coronal and sagittal (``*_fusion_views``);
* ``views_three_slices``: three adjacent slices of each view (``early_fusion_views_slices``).

From the voxels of a set, regional SBRs are measured as ``mean(region ∩ set) / mean(occipital ∩ set) - 1`` over 16
template regions (caudate / putamen × anterior / posterior × dorsal / ventral × side; the caudate and the dorsal /
ventral halves are split at the median voxel of each structure on the grid); a region the set does not cut is
missing for that set. PD vs HC is then measured two ways:

* **lowest putamen**: the SBR of the less-bound putamen (all putamen voxels in the set), as the clinical index;
* **logistic**: a cross-validated (stratified 5-fold) L2 logistic regression on the set's regional SBRs.

Each gets its ROC AUC with a stratified bootstrap interval over scans, and its paired difference to the whole
volume. A gap of at least ~0.02 ROC AUC is what a study of the 2D students could resolve; a smaller one means the
projection loses little of what the volume holds about the label, whatever a network does with it.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections.abc import Mapping, Sequence

import numpy as np
from scripts.anatomy import SIDES, template_rois
from scripts.metrics import logistic_cv_scores, roc_auc_rows

__all__ = [
    "VOXEL_SETS",
    "voxel_sets",
    "regions",
    "regional_sbr",
    "budget_from_features",
    "information_budget",
    "format_budget",
]

GRID: tuple[int, int, int] = (64, 64, 64)
VOXEL_SETS: tuple[str, ...] = ("whole_volume", "single_slice", "three_slices", "views", "views_three_slices")
"""The inputs compared, from the 3D teacher's to the 2D projections' (see the module docstring)."""
_VIEW_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}


def _grid_affine(shape: Sequence[int]) -> np.ndarray:
    from scripts.projections import template_grid_affine

    return template_grid_affine(tuple(shape))


@functools.lru_cache(maxsize=2)
def voxel_sets(shape: tuple[int, int, int] = GRID) -> dict[str, np.ndarray]:
    """``{set name: bool (X, Y, Z)}``: the voxels each input of :data:`VOXEL_SETS` sees on the grid ``shape``."""
    from scripts.projections import template_centre

    aff = _grid_affine(shape)
    out = {"whole_volume": np.ones(shape, dtype=bool)}

    def slab(view: str, k: int) -> np.ndarray:
        axis, c = _VIEW_AXES[view], template_centre(shape, view, aff)
        mask = np.zeros(shape, dtype=bool)
        index = [slice(None)] * 3
        index[axis] = slice(max(c - k // 2, 0), c + k // 2 + 1)
        mask[tuple(index)] = True
        return mask

    out["single_slice"] = slab("axial", 1)
    out["three_slices"] = slab("axial", 3)
    out["views"] = slab("axial", 1) | slab("coronal", 1) | slab("sagittal", 1)
    out["views_three_slices"] = slab("axial", 3) | slab("coronal", 3) | slab("sagittal", 3)
    return out


@functools.lru_cache(maxsize=2)
def regions(shape: tuple[int, int, int] = GRID) -> dict[str, np.ndarray]:
    """``{region: bool (X, Y, Z)}``: the 16 regional ROIs plus ``putamen_L/R`` and ``occipital`` on the grid."""
    aff = _grid_affine(shape)
    rois = template_rois(shape, aff)
    ijk = np.indices(shape).reshape(3, -1)
    world = (aff[:3, :3] @ ijk + aff[:3, 3:4]).reshape(3, *shape)
    y, z = world[1], world[2]
    out: dict[str, np.ndarray] = {}
    for side in SIDES:
        caud, put = rois[f"caudate_{side}"], rois[f"putamen_{side}"]
        y_mid, zc_mid, zp_mid = np.median(y[caud]), np.median(z[caud]), np.median(z[put])
        for ap, caud_ap, put_ap in (
            ("ant", caud & (y >= y_mid), rois[f"putamen_ant_{side}"]),
            ("post", caud & (y < y_mid), rois[f"putamen_post_{side}"]),
        ):
            out[f"caudate_{ap}_dorsal_{side}"] = caud_ap & (z >= zc_mid)
            out[f"caudate_{ap}_ventral_{side}"] = caud_ap & (z < zc_mid)
            out[f"putamen_{ap}_dorsal_{side}"] = put_ap & (z >= zp_mid)
            out[f"putamen_{ap}_ventral_{side}"] = put_ap & (z < zp_mid)
        out[f"putamen_{side}"] = put
    out["occipital"] = rois["occipital"]
    return out


def regional_sbr(volume: np.ndarray, shape: tuple[int, int, int] = GRID) -> dict[str, dict[str, float]]:
    """``{set: {region: SBR}}`` of one volume on the grid ``shape``; regions a set does not cut are left out, and
    ``lowest_putamen`` is the smaller of the two putamen SBRs of the set."""
    vol = np.asarray(volume, dtype=np.float64)
    regs, sets = regions(shape), voxel_sets(shape)
    out: dict[str, dict[str, float]] = {}
    for name, keep in sets.items():
        occ = regs["occipital"] & keep
        if not occ.any():
            raise ValueError(f"voxel set {name!r} holds no occipital reference voxel on the grid {shape}.")
        ref = float(vol[occ].mean())
        feats = {}
        for region, mask in regs.items():
            if region == "occipital":
                continue
            m = mask & keep
            if m.any():
                feats[region] = float(vol[m].mean()) / ref - 1.0
        feats["lowest_putamen"] = min(feats.get(f"putamen_{s}", np.inf) for s in SIDES)
        out[name] = feats
    return out


def _bootstrap_indices(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, N)`` stratified resamples (each class resampled within itself)."""
    rng = np.random.default_rng(seed)
    parts = [np.flatnonzero(y == c) for c in (0, 1)]
    return np.concatenate([p[rng.integers(0, p.size, size=(n_boot, p.size))] for p in parts], axis=1)


def budget_from_features(
    features: Sequence[Mapping[str, Mapping[str, float]]],
    labels: Sequence[int],
    n_boot: int = 1000,
    seed: int = 0,
    folds: int = 5,
) -> dict[str, dict[str, dict[str, float]]]:
    """The budget table from per-scan features (:func:`regional_sbr` of each scan) and labels.

    Returns:
        ``{set: {"lowest_putamen" | "logistic": {"auc", "low", "high", "diff", "diff_low", "diff_high"},
        "n_regions": k}}``: ROC AUC with its 95 % stratified bootstrap interval over scans, and the paired
        difference to ``whole_volume`` (same resamples) with its interval.
    """
    y = np.asarray(labels, dtype=np.int64)
    if y.size != len(features) or not 0 < y.sum() < y.size:
        raise ValueError("the information budget needs one label per scan and both classes present.")
    sets = [s for s in VOXEL_SETS if s in features[0]]
    scores: dict[str, dict[str, np.ndarray]] = {}
    n_regions: dict[str, int] = {}
    for name in sets:
        skip = ("lowest_putamen", *(f"putamen_{side}" for side in SIDES))
        keys = sorted(k for k in features[0][name] if k not in skip and all(k in f[name] for f in features))
        x = np.array([[f[name][k] for k in keys] for f in features])
        n_regions[name] = len(keys)
        lowest = np.array([f[name]["lowest_putamen"] for f in features])
        scores[name] = {"lowest_putamen": -lowest, "logistic": logistic_cv_scores(x, y, folds=folds, seed=seed)}
    idx = _bootstrap_indices(y, n_boot, seed)
    yb = y[idx]
    out: dict[str, dict] = {}
    for method in ("lowest_putamen", "logistic"):
        whole = roc_auc_rows(yb, scores["whole_volume"][method][idx]) if "whole_volume" in scores else None
        for name in sets:
            s = scores[name][method]
            boots = roc_auc_rows(yb, s[idx])
            row = {"auc": float(roc_auc_rows(y, s)[0]), "low": float(np.quantile(boots, 0.025))}
            row["high"] = float(np.quantile(boots, 0.975))
            if whole is not None:
                diff = boots - whole
                row["diff"] = float(roc_auc_rows(y, s)[0] - roc_auc_rows(y, scores["whole_volume"][method])[0])
                row["diff_low"], row["diff_high"] = (float(np.quantile(diff, q)) for q in (0.025, 0.975))
            out.setdefault(name, {"n_regions": n_regions[name]})[method] = row
    return out


def _render_features(task: tuple) -> tuple[int, dict]:
    from scripts.synthetic.phantom import render_volume

    subject, visit, shape = task
    return subject.label, regional_sbr(render_volume(subject, visit, shape, _grid_affine(shape)), shape)


def information_budget(
    preset: str = "benchmark",
    n_subjects: int | None = None,
    seed: int = 0,
    workers: int = 1,
    n_boot: int = 1000,
    shape: tuple[int, int, int] = GRID,
    **overrides,
) -> dict:
    """Render a preset's population on the bundle's input grid and measure its information budget.

    Args:
        preset: a generator preset (:mod:`scripts.synthetic.presets`).
        n_subjects: subjects (default: the preset's, without its extra test subjects); every visit is used.
        seed: generator seed (the subjects are those of ``generate_dataset`` with the same seed).
        workers: rendering processes.
        n_boot: bootstrap resamples.
        shape: the input grid (the configs' ``spatial_size``).
        overrides: generator parameters replacing the preset's.

    Returns:
        ``{"design": {...}, "table": budget_from_features(...), "seconds": s}``.
    """
    from scripts.synthetic.phantom import sample_population

    started = time.perf_counter()
    subjects = sample_population(n_subjects, seed=seed, preset=preset, **overrides)
    tasks = [(s, v, tuple(shape)) for s in subjects for v in range(len(s.visits))]
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(processes=int(workers)) as pool:
            rows = pool.map(_render_features, tasks, chunksize=max(1, len(tasks) // (8 * workers)))
    else:
        rows = [_render_features(t) for t in tasks]
    labels = [label for label, _ in rows]
    table = budget_from_features([f for _, f in rows], labels, n_boot=n_boot, seed=seed)
    design = {"preset": preset, "seed": int(seed), "n_scans": len(rows), "n_pd": int(sum(labels)), "grid": list(shape)}
    design["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return {"design": design, "table": table, "seconds": round(time.perf_counter() - started, 1)}


_LABELS = {
    "whole_volume": "whole volume (3D teacher)",
    "single_slice": "single slice (`single_slice`)",
    "three_slices": "3 template slices (`*_fusion_slices`)",
    "views": "centre slice of 3 views (`*_fusion_views`)",
    "views_three_slices": "3 slices of 3 views (`early_fusion_views_slices`)",
}


def format_budget(result: Mapping) -> str:
    """A Markdown table of :func:`information_budget`'s result."""
    d = result["design"]
    lines = [
        f"Information budget: preset {d['preset']}, seed {d['seed']}, {d['n_scans']} scans ({d['n_pd']} PD), "
        f"grid {'x'.join(map(str, d['grid']))}; ROC AUC [95 % bootstrap interval over scans]; difference to the "
        "whole volume paired on the same resamples.",
        "",
        "| input (voxels it sees) | regions | lowest-putamen SBR AUC | Δ vs volume | logistic (CV) AUC | Δ vs volume |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["table"].items():
        cells = []
        for method in ("lowest_putamen", "logistic"):
            r = row[method]
            cells.append(f"{r['auc']:.3f} [{r['low']:.3f}, {r['high']:.3f}]")
            cells.append(
                "—" if name == "whole_volume" else f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]"
            )
        lines.append(f"| {_LABELS.get(name, name)} | {row['n_regions']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
