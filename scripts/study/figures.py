# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The study's figures (matplotlib PNGs), drawn from the cell records by :func:`draw_figures`.

* ``kd_vs_nokd.png``: ROC AUC and macro F1 of each projection without and with KD, one line per seed (the pair)
  and the mean ± std;
* ``low_data.png``: ROC AUC and macro F1 against the training fraction for teacher, KD and no-KD students;
* ``ablation.png``: the loss variants beside no-KD;
* ``external.png``: in-domain vs external ROC AUC and PD sensitivity per model;
* ``roc.png``: ROC curves (one per seed) of the teacher, the default-projection students and the SBR baseline on
  every test set;
* ``centres.png``: the axial centre slice ``auto`` picks, by class, against the fixed template centre;
* ``gallery.png``: one HC and one PD test scan under every projection.

matplotlib is imported here only (the Agg backend, no display), never by the bundle's runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scripts.metrics import roc_curve
from scripts.projections import PROJECTIONS, projection_spec

__all__ = ["draw_figures", "roc_curve"]

COLOURS = {"teacher": "#444444", "kd": "#d62728", "nokd": "#1f77b4", "sbr": "#2ca02c", "other": "#9467bd"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _vals(group, key, metric, op="validation"):
    from scripts.study.report import values

    return values(group, key, metric, op)


def _mean_std(vals):
    v = [x for x in vals if x is not None]
    if not v:
        return np.nan, np.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _kd_vs_nokd(res, b, path: Path) -> bool:
    plt = _plt()
    key = res.test_key()
    projections = [p for p in b.projections if b.kd(p) and b.nokd(p)]
    if not projections:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(projections) + 2) * 1.6, 4), squeeze=False)
    for ax, metric, title in zip(axes[0], ("roc_auc", "f1_macro"), ("ROC AUC", "macro F1")):
        for i, p in enumerate(projections):
            a, c = _vals(b.nokd(p), key, metric), _vals(b.kd(p), key, metric)
            for s in sorted(set(a) & set(c)):
                if a[s] is not None and c[s] is not None:
                    ax.plot([i - 0.18, i + 0.18], [a[s], c[s]], color="#bbbbbb", lw=0.8, zorder=1)
            for dx, vals, colour, label in ((-0.18, a, COLOURS["nokd"], "no KD"), (0.18, c, COLOURS["kd"], "KD")):
                m, sd = _mean_std(vals.values())
                ax.errorbar(i + dx, m, yerr=sd, fmt="o", color=colour, capsize=4, label=label if i == 0 else None)
        ax.set_xticks(range(len(projections)))
        ax.set_xticklabels([p.replace("_", "\n") for p in projections], fontsize=8)
        ax.set_ylabel(title)
        ax.set_title(f"{title} on {key} (grey: one seed's pair)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _low_data(res, b, path: Path) -> bool:
    plt = _plt()
    key = res.test_key()
    fractions = sorted({c.fraction for c in res.cells.values() if c.kind == "student"})
    if len(fractions) < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, metric, title in zip(axes[0], ("roc_auc", "f1_macro"), ("ROC AUC", "macro F1")):
        series = {"3D teacher": (COLOURS["teacher"], lambda f: res.select("teacher", fraction=f))}
        tfs = sorted(
            {c.teacher_fraction for c in res.cells.values() if c.kind == "student" and c.kd and c.fraction < 1}
        )
        for tf_mode in ("matched", "full"):
            if tf_mode == "matched" and any(tf < 1 for tf in tfs):
                series["KD (teacher on same fraction)"] = (
                    COLOURS["kd"],
                    lambda f: b.kd(fraction=f, teacher_fraction=f),
                )
            if tf_mode == "full" and (1.0 in tfs or not tfs):
                series["KD (full-data teacher)"] = ("#ff9896", lambda f: b.kd(fraction=f, teacher_fraction=1.0))
        series["no KD"] = (COLOURS["nokd"], lambda f: b.nokd(fraction=f))
        for label, (colour, select) in series.items():
            xs, ms, sds = [], [], []
            for f in fractions:
                m, sd = _mean_std(_vals(select(f), key, metric).values())
                if not np.isnan(m):
                    xs.append(f)
                    ms.append(m)
                    sds.append(sd)
            if xs:
                ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, color=colour, label=label)
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:g}" for f in fractions])
        ax.set_xlabel("share of training subjects")
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"Low-data sweep ({b.p0}), {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ablation(res, b, path: Path) -> bool:
    from scripts.study.matrix import VARIANTS

    plt = _plt()
    key = res.test_key()
    groups = [("no KD", b.nokd())] + [(v, b.kd(variant=v)) for v in VARIANTS]
    groups = [(n, g) for n, g in groups if g]
    if len(groups) < 3:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, metric, title in zip(axes[0], ("roc_auc", "f1_macro"), ("ROC AUC", "macro F1")):
        for i, (name, g) in enumerate(groups):
            vals = [v for v in _vals(g, key, metric).values() if v is not None]
            colour = COLOURS["nokd"] if name == "no KD" else COLOURS["kd"]
            ax.scatter([i] * len(vals), vals, color=colour, alpha=0.35, s=14)
            m, sd = _mean_std(vals)
            ax.errorbar(i, m, yerr=sd, fmt="o", color=colour, capsize=4)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([n for n, _ in groups], fontsize=8)
        ax.set_ylabel(title)
    fig.suptitle(f"Loss ablation ({b.p0}), {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _external(res, b, path: Path) -> bool:
    plt = _plt()
    if not res.externals:
        return False
    groups = []
    if b.teachers:
        groups.append(("3D teacher", b.teachers, COLOURS["teacher"]))
    for p in b.projections:
        for kd, g, colour in (("KD", b.kd(p), COLOURS["kd"]), ("no KD", b.nokd(p), COLOURS["nokd"])):
            if g:
                groups.append((f"{p} {kd}", g, colour))
    if res.baseline("sbr"):
        groups.append(("SBR", {0: res.baseline("sbr")}, COLOURS["sbr"]))
    sets = [res.in_domain] + res.externals
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(groups) + 2), squeeze=False)
    markers = ["o", "s", "^", "D", "v"]
    for ax, metric, title in zip(
        axes[0], ("roc_auc", "sensitivity"), ("ROC AUC", "PD sensitivity (in-domain threshold)")
    ):
        for i, (_, g, colour) in enumerate(groups):
            means = [_mean_std(_vals(g, res.test_key(s), metric).values())[0] for s in sets]
            ax.plot(means, [i] * len(sets), color="#cccccc", lw=1, zorder=1)
            for j, (s, m) in enumerate(zip(sets, means)):
                ax.scatter(m, i, marker=markers[j % len(markers)], color=colour, label=s if i == 0 else None, zorder=2)
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels([n.replace("_", " ") for n, _, _ in groups], fontsize=8)
        ax.set_xlabel(title)
        ax.invert_yaxis()
        ax.legend(fontsize=8, title="test set")
    fig.suptitle("In-domain vs external test sets (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _roc(res, b, path: Path) -> bool:
    plt = _plt()
    sets = [res.in_domain] + res.externals
    groups = [("3D teacher", b.teachers, COLOURS["teacher"]), (f"{b.p0} KD", b.kd(), COLOURS["kd"]),
              (f"{b.p0} no KD", b.nokd(), COLOURS["nokd"])]  # fmt: skip
    if res.baseline("sbr"):
        groups.append(("SBR", {0: res.baseline("sbr")}, COLOURS["sbr"]))
    groups = [g for g in groups if g[1]]
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.2), squeeze=False)
    for ax, name in zip(axes[0], sets):
        key = res.test_key(name)
        for label, g, colour in groups:
            aucs = []
            for i, record in enumerate(g.values()):
                pred = record.get("predictions", {}).get(key)
                if pred is None or len(set(pred["labels"])) < 2:
                    continue
                fpr, tpr = roc_curve(pred["labels"], pred["scores"])
                aucs.append(record["metrics"][key]["validation"]["roc_auc"])
                ax.plot(fpr, tpr, color=colour, alpha=0.6, lw=1, label=None if i else label)
            if aucs:
                ax.plot([], [], " ", label=f"  AUC {np.mean(aucs):.3f}")
        ax.plot([0, 1], [0, 1], ":", color="#999999")
        ax.set_title(key)
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("PD sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _centres(res, path: Path) -> bool:
    plt = _plt()
    record = res.baseline("centres")
    if record is None:
        return False
    key = res.test_key()
    c = record["centres"].get(key)
    if c is None:
        return False
    labels = np.asarray(c["labels"])
    auto = np.asarray(c["auto"]["axial"])
    template = c["template"]["axial"][0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.arange(auto.min() - 0.5, auto.max() + 1.5)
    ax.hist(
        [auto[labels == 0], auto[labels == 1]], bins=bins, label=["HC", "PD"], color=[COLOURS["nokd"], COLOURS["kd"]]
    )
    ax.axvline(template, color="black", ls="--", label=f"template centre ({template})")
    ax.set_xlabel("axial centre slice")
    ax.set_ylabel("scans")
    ax.set_title(f"slice_centre auto by class, {key}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _gallery(res, path: Path) -> bool:
    """One HC and one PD in-domain test scan through the bundle's preprocessing and every projection."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose
    from scripts.data import load_datalist
    from scripts.study.cells import _in_bundle_root

    plt = _plt()
    entries = load_datalist(res.datasets[res.in_domain], "test")
    picks = [next((e for e in entries if e["label"] == lab), None) for lab in (0, 1)]
    if None in picks:
        return False
    shared = res.study["settings"]["shared"]
    parser = ConfigParser()
    with _in_bundle_root():
        parser.read_config("configs/inference.json")
    parser.update({k: v for k, v in shared.items() if k in ("spatial_size", "num_slices", "gap")})
    volumes = Compose(parser.get_parsed_content("volume_transforms"))
    loaded = [volumes({"image": e["image"]})["image"] for e in picks]
    num_slices = int(parser.get_parsed_content("num_slices"))
    max_ch = max(projection_spec(p, num_slices).in_channels for p in PROJECTIONS)
    cols = min(max_ch, 3)
    fig, axes = plt.subplots(len(PROJECTIONS), 2 * cols, figsize=(2 * cols * 1.3, len(PROJECTIONS) * 1.35))
    for r, name in enumerate(PROJECTIONS):
        parser["projection"] = name
        transform = parser.get_parsed_content("projection_transform", instantiate=True, lazy=False)
        for k, (label, image) in enumerate(zip(("HC", "PD"), loaded)):
            out = np.asarray(transform({"image": image})["image"])
            for ch in range(cols):
                ax = axes[r, k * cols + ch]
                ax.axis("off")
                if ch < out.shape[0]:
                    ax.imshow(np.rot90(out[ch]), cmap="magma")
                if r == 0 and ch == 0:
                    ax.set_title(label, fontsize=9, loc="left")
        axes[r, 0].text(-0.1, 0.5, name.replace("_", "\n"), transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=7)  # fmt: skip
    fig.suptitle("HC (left) and PD (right) test scan under every projection (first channels)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def draw_figures(res, b, folder: Path) -> list[Path]:
    """Draw every figure that the records support into ``folder``; returns the files written.

    Without matplotlib (optional) nothing is drawn: a line says how to install it, and the report has no figures.
    """
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from scripts.report import MATPLOTLIB_REQUIREMENT

        print(f"no figures: matplotlib is not installed (pip install '{MATPLOTLIB_REQUIREMENT}').")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    jobs = {
        "kd_vs_nokd.png": lambda p: _kd_vs_nokd(res, b, p),
        "low_data.png": lambda p: _low_data(res, b, p),
        "ablation.png": lambda p: _ablation(res, b, p),
        "external.png": lambda p: _external(res, b, p),
        "roc.png": lambda p: _roc(res, b, p),
        "centres.png": lambda p: _centres(res, p),
        "gallery.png": lambda p: _gallery(res, p),
    }
    for name, draw in jobs.items():
        path = folder / name
        if draw(path):
            out.append(path)
        elif path.exists():
            path.unlink()  # a stale figure of an earlier report
    return out
