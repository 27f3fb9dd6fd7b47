# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The study's measurement of label-free site adaptation (:mod:`scripts.site_adaptation`) on the external sets.

For every external set, every true PD share in :data:`SHARES` and every method in :data:`METHODS`:

* **the site**: a fixed subset of the external test split with that PD share, as large as the set allows (200
  balanced scans give 25 PD + 100 HC at 0.2, 100 + 100 at 0.5, 100 PD + 25 HC at 0.8), chosen by subject with a
  fixed seed (:func:`share_subset`);
* **AdaBN**: the cell's checkpoint re-scores the site through ``configs/inference.json --site_adaptation adabn``
  (batch-norm statistics re-estimated on that site's scans), once per set and share (:func:`adabn_predictions`,
  run inside the cell by :mod:`scripts.study.cells`, or afterwards by this module's command line);
* **the measurement**: :data:`N_DRAWS` bootstrap draws of the site (its PD and HC scans resampled with replacement,
  class counts fixed); on each draw every method sees the same scans, without their labels, estimates its
  threshold and is scored (sensitivity, specificity) against the labels. A refused draw keeps the in-domain
  threshold (what the inference leaves in ``predicted_class``) and is counted as refused;
* **the ceiling** (:data:`CEILING`): on each draw, the threshold with the best ``min(sensitivity, specificity)``
  chosen *with* the draw's labels (:func:`scripts.study.operating.maximin_point`, on the unadapted scores). No
  label-free threshold can beat it on average, so it says how much of a shortfall is the method's and how much
  the model's ranking at that site.

Reported per model (pooled over seeds): mean sensitivity and specificity per method, the paired difference to the
in-domain threshold with its 95 % interval over the draws (the same draws for both; seed-averaged), the share of
draws meeting the target (both ≥ :data:`TARGET`) and the refusal rate. The report recommends the method whose
worst case (lowest of mean sensitivity and specificity over every set and share) is highest for the default KD
student.

Command line (adds the AdaBN scores to a finished study's records, then prints the table; ``--site-sizes`` also
prints how the recommended ``mixture`` depends on the number of a site's scans, :func:`site_size_sweep`)::

    python -m scripts.study.adaptation eval/study-cpu [--site-sizes 20 30 40 60 100]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scripts.site_adaptation import MIN_SCANS, SiteAdaptationRefusedError, SourceScores, adapt_scores, parse_methods
from scripts.study.matrix import DEFAULT_PROJECTION, DEFAULT_VARIANT, Cell
from scripts.study.operating import maximin_point
from scripts.study.power import counted

__all__ = [
    "SHARES",
    "METHODS",
    "CEILING",
    "TARGET",
    "N_DRAWS",
    "share_subset",
    "wants_adabn",
    "measures_adabn",
    "adabn_predictions",
    "evaluate_record",
    "adaptation_results",
    "adaptation_section",
    "site_size_sweep",
    "site_size_section",
]

SHARES = (0.2, 0.5, 0.8)
"""True PD shares of the simulated sites."""
METHODS = ("none", "em", "bbse", "mixture", "adabn", "adabn+em", "adabn+bbse", "adabn+mixture")
"""Methods measured (``none``: the in-domain threshold)."""
CEILING = "labelled best"
"""Row name of the ceiling: the best single threshold chosen with each draw's labels (not a method)."""
ROWS = (*METHODS, CEILING)
TARGET = 0.90
"""Sensitivity and specificity every method should reach at every set and share."""
N_DRAWS = 100
"""Bootstrap draws of each site."""
SIZE_DRAWS = 40
"""Draws of each site size and seed in :func:`site_size_sweep`."""
DEFAULT_MODEL = f"2D {DEFAULT_PROJECTION.replace('_', ' ')}, with KD"
"""The report's name of the default KD student (the model the recommendation is for)."""
ADAPTED_KEY = "adapted_predictions"
"""Record key of the AdaBN scores: ``{"<set>@<share>": {"files", "labels", "scores"}}``."""


def _share_key(name: str, share: float) -> str:
    return f"{name}@{share:g}"


def share_subset(labels: Sequence[int], share: float, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of the largest subset of ``labels`` with PD share ``share``, drawn with ``seed``."""
    y = np.asarray(labels, dtype=np.int64)
    pd_idx, hc_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not 0.0 < share < 1.0:
        raise ValueError(f"a site's PD share must be in (0, 1), got {share}.")
    n = int(math.floor(min(pd_idx.size / share, hc_idx.size / (1.0 - share)) + 1e-9))
    n_pd = int(round(share * n))
    n_pd, n_hc = min(n_pd, pd_idx.size), min(n - n_pd, hc_idx.size)  # either may be 0 on a tiny set
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(pd_idx, n_pd, replace=False), rng.choice(hc_idx, n_hc, replace=False)]))


def wants_adabn(cell: Cell) -> bool:
    """The cells whose AdaBN scores the study measures: full-data teachers and the default projection's KD
    (default loss) and no-KD students with the default slice centre, under min-max or occipital (reference
    region) intensity normalisation."""
    if cell.fraction != 1.0 or cell.intensity not in ("minmax", "occipital"):
        return False
    if cell.kind == "teacher":
        return True
    return (
        cell.kind == "student"
        and cell.projection == DEFAULT_PROJECTION
        and cell.centre == "template"
        and (not cell.kd or cell.variant == DEFAULT_VARIANT)
    )


def adabn_shares(ctx: Any) -> tuple[float, ...]:
    """The site PD shares whose AdaBN scores the study measures: ``ctx.adabn_shares``, :data:`SHARES` when that is
    ``None``, none when it is empty."""
    return SHARES if ctx.adabn_shares is None else tuple(ctx.adabn_shares)


def measures_adabn(ctx: Any, cell: Cell) -> bool:
    """Whether the study re-scores ``cell``'s external sets after AdaBN: a cell the adaptation table compares
    (:func:`wants_adabn`), a study with external sets, and at least one site share (:func:`adabn_shares`)."""
    return wants_adabn(cell) and len(ctx.datasets) > 1 and bool(adabn_shares(ctx))


def adabn_predictions(ctx: Any, cell: Cell, checkpoint: str | Path, settings: Mapping | None = None) -> dict:
    """Score every external set's share subsets (the shares of :func:`adabn_shares`) with
    ``checkpoint`` after AdaBN, through ``configs/inference.json``.

    Each site is written as a datalist ``<cell dir>/adaptation/<set>@<share>.json``; the inference runs in
    ``<cell dir>/eval/adabn-<set>@<share>``. Returns ``{"<set>@<share>": {"files", "labels", "scores"}}``.
    """
    from scripts.data import load_datalist
    from scripts.study.cells import cell_dir, run_bundle, volumes_dir

    root = cell_dir(ctx.run_dir, cell)
    out: dict[str, dict] = {}
    configs = ["inference.json"] + (["inference_teacher.json"] if cell.kind == "teacher" else [])
    from scripts.study.cells import BUNDLE_ROOT

    known = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text(encoding="utf-8"))
    shared = {k: v for k, v in dict(settings if settings is not None else ctx.settings).items() if k in known}
    volume = "$monai.transforms.Compose(@volume_transforms)"  # what a teacher sees; a student, its projection
    transform = (
        volume if cell.kind == "teacher" else "$monai.transforms.Compose(@volume_transforms + [@projection_transform])"
    )
    for name in ctx.datasets:
        if name == ctx.in_domain:
            continue
        entries = sorted(load_datalist(ctx.datasets[name], "test"), key=lambda e: str(e["image"]))
        labels = [int(e["label"]) for e in entries]
        for share in adabn_shares(ctx):
            key = _share_key(name, share)
            site = [entries[i] for i in share_subset(labels, share)]
            if len(site) < MIN_SCANS:  # every method would refuse so small a site: nothing to measure
                continue
            datalist = root / "adaptation" / f"{key}.json"
            datalist.parent.mkdir(parents=True, exist_ok=True)
            datalist.write_text(json.dumps({"test": [{"image": str(e["image"])} for e in site]}, indent=1))
            run_name = f"adabn-{key}"
            overrides = {
                **shared,
                "bundle_root": str(root),
                "input": str(datalist),
                "input_split": "test",
                "model_file": str(checkpoint),
                "site_adaptation": "adabn",
                "site_adaptation_min_scans": min(MIN_SCANS, len(site)),
                "run_name": run_name,
                # the study's preprocessed scans (what its evaluations read), kept in memory for both passes of
                # AdaBN (statistics, then scoring): the study's own sets need no per-scan plausibility checks
                "dataset": {
                    "_target_": "scripts.fast_data.cached_dataset",
                    "data": "@datalist",
                    "transform": transform,
                    "shared_dir": volumes_dir(ctx),
                },
            }
            run_bundle(configs, "run", overrides, "infer")
            with (root / "eval" / run_name / "predictions.csv").open(newline="", encoding="utf-8") as f:
                scores = {Path(r["image"]).name: float(r["pd_probability"]) for r in csv.DictReader(f)}
            out[key] = {
                "files": [Path(str(e["image"])).name for e in site],
                "labels": [int(e["label"]) for e in site],
                "scores": [scores[Path(str(e["image"])).name] for e in site],
            }
    return out


def _metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    called = scores >= threshold
    return float(called[labels == 1].mean()), float((~called[labels == 0]).mean())


def evaluate_record(
    record: Mapping, in_domain: str, externals: Sequence[str], n_draws: int = N_DRAWS, min_scans: int = MIN_SCANS
) -> dict[str, dict]:
    """Sensitivity and specificity per draw of every method for one cell.

    Returns:
        ``{"<set>@<share>": {method: {"sens": [...], "spec": [...], "refused": [...], "threshold": [...],
        "pd_share": [...]}}}`` with one entry per draw (draw ``b`` uses seed ``b``, the same for every cell and
        method, so cells and methods pair by draw), and the :data:`CEILING` row in the same form. AdaBN methods are
        absent when the record has no AdaBN scores.
    """
    predictions = record["predictions"]
    val = predictions[f"{in_domain}/validation"]
    source = SourceScores.from_arrays(val["scores"], val["labels"])
    adapted = record.get(ADAPTED_KEY) or {}
    out: dict[str, dict] = {}
    for name in externals:
        test = predictions.get(f"{name}/test")
        if test is None:
            continue
        index = {f: i for i, f in enumerate(test["files"])}
        labels_all = np.asarray(test["labels"])
        for share in SHARES:
            key = _share_key(name, share)
            subset = share_subset(labels_all, share)
            y = labels_all[subset]
            plain = np.asarray(test["scores"], dtype=np.float64)[subset]
            families = {"plain": plain}
            if key in adapted:
                ada = adapted[key]
                if [index.get(f) for f in ada["files"]] != [int(i) for i in subset]:
                    raise ValueError(f"{record['cell']}: AdaBN scores of {key} are not those of its site subset.")
                families["adabn"] = np.asarray(ada["scores"], dtype=np.float64)
            pd_idx, hc_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
            if pd_idx.size == 0 or hc_idx.size == 0:
                continue
            res = {m: {"sens": [], "spec": [], "refused": [], "threshold": [], "pd_share": []} for m in ROWS}
            for b in range(n_draws):
                rng = np.random.default_rng(b)
                draw = np.concatenate([rng.choice(pd_idx, pd_idx.size), rng.choice(hc_idx, hc_idx.size)])
                yb = y[draw]
                for method in METHODS:
                    adabn, score_method = parse_methods(method)
                    family = "adabn" if adabn else "plain"
                    if family not in families:
                        continue
                    sb = families[family][draw]
                    refused, share_hat = False, None
                    try:
                        fit = adapt_scores(score_method, sb, source, source.threshold, min_scans)
                        threshold, share_hat = fit["threshold"], fit["pd_share"]
                    except SiteAdaptationRefusedError:
                        threshold, refused = source.threshold, True
                    sens, spec = _metrics(yb, sb, threshold)
                    r = res[method]
                    r["sens"].append(sens)
                    r["spec"].append(spec)
                    r["refused"].append(refused)
                    r["threshold"].append(float(threshold))
                    r["pd_share"].append(share_hat)
                threshold, sens, spec = maximin_point(yb, plain[draw])
                ceiling = res[CEILING]
                ceiling["sens"].append(sens)
                ceiling["spec"].append(spec)
                ceiling["refused"].append(False)
                ceiling["threshold"].append(threshold)
                ceiling["pd_share"].append(None)
            out[key] = {m: v for m, v in res.items() if v["sens"]}
    return out


def _model(cell: Cell) -> str | None:
    if not wants_adabn(cell):
        return None
    suffix = "" if cell.intensity == "minmax" else f" ({cell.intensity} normalisation)"
    if cell.kind == "teacher":
        return "3D teacher" + suffix
    return f"2D {cell.projection.replace('_', ' ')}, " + ("with KD" if cell.kd else "without KD") + suffix


def adaptation_results(
    records: Sequence[Mapping], in_domain: str, externals: Sequence[str], n_draws: int = N_DRAWS
) -> dict[str, Any]:
    """Per model (seeds pooled), set, share and method: mean sensitivity / specificity, the paired difference to
    ``none`` with its 95 % interval over draws, the share of draws meeting :data:`TARGET`, the refusal rate and the
    mean estimated PD share. ``{"models": {model: {"<set>@<share>": {method: {...}}}}, "seeds": {model: n}}``."""
    per_model: dict[str, list[dict]] = {}
    for record in records:
        model = _model(Cell.from_dict(record["axes"])) if "axes" in record else None
        if model is None or "predictions" not in record:
            continue
        per_model.setdefault(model, []).append(evaluate_record(record, in_domain, externals, n_draws))
    models: dict[str, dict] = {}
    for model, runs in per_model.items():
        table: dict[str, dict] = {}
        for key in runs[0]:
            methods = [m for m in ROWS if all(m in run.get(key, {}) for run in runs)]
            rows = {}
            for method in methods:
                sens = np.array([run[key][method]["sens"] for run in runs])  # (seeds, draws)
                spec = np.array([run[key][method]["spec"] for run in runs])
                ref = np.array([run[key][method]["refused"] for run in runs])
                shares = [s for run in runs for s in run[key][method]["pd_share"] if s is not None]
                base_sens = np.array([run[key]["none"]["sens"] for run in runs])
                base_spec = np.array([run[key]["none"]["spec"] for run in runs])
                d_sens, d_spec = (sens - base_sens).mean(axis=0), (spec - base_spec).mean(axis=0)
                rows[method] = {
                    "sens": float(sens.mean()),
                    "spec": float(spec.mean()),
                    "d_sens": float(d_sens.mean()),
                    "d_sens_ci": [float(np.percentile(d_sens, 2.5)), float(np.percentile(d_sens, 97.5))],
                    "d_spec": float(d_spec.mean()),
                    "d_spec_ci": [float(np.percentile(d_spec, 2.5)), float(np.percentile(d_spec, 97.5))],
                    "meets_target": float(((sens >= TARGET) & (spec >= TARGET)).mean()),
                    "refused": float(ref.mean()),
                    "pd_share": float(np.mean(shares)) if shares else None,
                }
            table[key] = rows
        models[model] = table
    return {"models": models, "seeds": {m: len(r) for m, r in per_model.items()}, "n_draws": n_draws}


def site_size_sweep(
    records: Sequence[Mapping],
    in_domain: str,
    externals: Sequence[str],
    sizes: Sequence[int],
    n_draws: int = SIZE_DRAWS,
    model: str | None = None,
) -> dict[str, dict[int, dict[str, float]]]:
    """How ``mixture`` depends on the number of a site's scans, for one model's records (default: the default KD
    student; seeds pooled).

    For every external set, true PD share in :data:`SHARES` and size ``N`` in ``sizes``: ``n_draws`` sites per seed
    of ``round(N · share)`` PD and ``N - round(N · share)`` HC scans, drawn without replacement from that share's
    subset (:func:`share_subset`; draw ``b`` uses seed ``b``). The mixture is fitted with the size floor lowered
    to ``N``, so that small sites are measured rather than refused for their size; a refusal keeps the in-domain
    threshold.

    Returns:
        ``{"<set>@<share>": {N: {"refused": share of draws refused, "p10": 10th percentile over draws of the lower
        of sensitivity and specificity, "draws": n}}}``; sizes larger than the share's subset allows are left out.
    """
    model = model or DEFAULT_MODEL
    chosen = [r for r in records if "axes" in r and "predictions" in r and _model(Cell.from_dict(r["axes"])) == model]
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name in externals:
        for share in SHARES:
            pools = [p for p in (_site_pool(r, in_domain, name, share) for r in chosen) if p is not None]
            for n in sizes:
                n_pd = max(1, round(n * share))
                n_hc = n - n_pd
                refused, worst = [], []
                for y, s, pd_idx, hc_idx, fallback in pools:
                    if n_hc < 1 or pd_idx.size < n_pd or hc_idx.size < n_hc:
                        continue
                    for b in range(n_draws):
                        rng = np.random.default_rng(b)
                        draw = np.concatenate(
                            [rng.choice(pd_idx, n_pd, replace=False), rng.choice(hc_idx, n_hc, replace=False)]
                        )
                        try:
                            threshold = adapt_scores("mixture", s[draw], None, fallback, min(n, MIN_SCANS))["threshold"]
                            refused.append(False)
                        except SiteAdaptationRefusedError:
                            threshold = fallback
                            refused.append(True)
                        sens, spec = _metrics(y[draw], s[draw], threshold)
                        worst.append(min(sens, spec))
                if worst:
                    out.setdefault(_share_key(name, share), {})[int(n)] = {
                        "refused": float(np.mean(refused)),
                        "p10": float(np.quantile(worst, 0.1)),
                        "draws": len(worst),
                    }
    return out


def _site_pool(record: Mapping, in_domain: str, name: str, share: float) -> tuple | None:
    """``(labels, scores, PD indices, HC indices, in-domain threshold)`` of a record's site subset of external set
    ``name`` at PD ``share`` (:func:`share_subset`); ``None`` when the record did not score that set."""
    predictions = record["predictions"]
    test = predictions.get(f"{name}/test")
    if test is None:
        return None
    val = predictions[f"{in_domain}/validation"]
    labels_all = np.asarray(test["labels"])
    subset = share_subset(labels_all, share)
    y, s = labels_all[subset], np.asarray(test["scores"], dtype=np.float64)[subset]
    threshold = SourceScores.from_arrays(val["scores"], val["labels"]).threshold
    return y, s, np.flatnonzero(y == 1), np.flatnonzero(y == 0), threshold


def site_size_section(sweep: Mapping[str, Mapping[int, Mapping[str, float]]], model: str | None = None) -> str:
    """Markdown table of :func:`site_size_sweep`: per set and share, refusals and the 10th percentile of the lower
    of sensitivity and specificity at each site size."""
    sizes = sorted({int(n) for row in sweep.values() for n in row})
    if not sizes:
        return ""
    model = model or DEFAULT_MODEL
    lines = [
        f"### Site size: `mixture`, {model}",
        "",
        "Refused share of draws / 10th percentile over draws of the lower of sensitivity and specificity, for sites of "
        "N scans drawn without replacement at each true PD share.",
        "",
        "| site | " + " | ".join(f"N = {n}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for key, row in sweep.items():
        name, share = key.split("@")
        cells = [f"{row[n]['refused']:.0%} / {row[n]['p10']:.2f}" if n in row else "–" for n in sizes]
        lines.append(f"| {name}, {share} PD | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recommend(results: Mapping[str, Any], model: str) -> tuple[str, float, bool] | None:
    """``(method, worst case, meets target everywhere)`` with the highest worst case of ``min(sens, spec)`` over
    every set and share for ``model`` (ties: the simpler method, in :data:`METHODS` order)."""
    table = results["models"].get(model)
    if not table:
        return None
    best = None
    for method in METHODS:
        if not all(method in rows for rows in table.values()):
            continue
        worst = min(min(rows[method]["sens"], rows[method]["spec"]) for rows in table.values())
        if best is None or worst > best[1] + 1e-9:
            best = (method, worst, worst >= TARGET)
    return best


def _ci(mean: float, ci: Sequence[float]) -> str:
    return f"{mean:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def adaptation_section(results: Mapping[str, Any], default_model: str | None = None) -> str:
    """The report's Markdown section (tables per model and external set, recommendation)."""
    models = results.get("models") or {}
    if not models:
        return ""
    default_model = default_model or DEFAULT_MODEL
    lines = [
        "## Site adaptation without labels",
        f"Each external set is turned into sites with a true PD share of {', '.join(f'{s:g}' for s in SHARES)} "
        "(the largest subset with that share, fixed by subject), and each site is resampled "
        f"{results['n_draws']} times (its PD and HC scans drawn with replacement). Every method sees a draw's scans "
        "without labels or prevalence and sets its own threshold (`python -m monai.bundle run --config_file "
        "configs/inference.json --site_adaptation METHOD`, see docs/new_site.md); *none* is the in-domain "
        "threshold. Sensitivity / specificity are means over seeds and draws; Δ is the paired difference to *none* "
        "(same draws), mean [95 % interval over draws, seed-averaged]; *target* is the share of draws with both "
        f"≥ {TARGET:.2f}; *refused* the share of draws the method declined (they keep the in-domain threshold); "
        "*π̂* the mean estimated PD share; *labelled best* is not a method but the ceiling: on each draw, the "
        "threshold with the highest lower of sensitivity and specificity, chosen with the draw's labels.",
    ]
    partial = sorted(
        {key.split("@")[1] for table in models.values() for key, rows in table.items() if "adabn" not in rows}
    )
    if partial and any("adabn" in rows for table in models.values() for rows in table.values()):
        lines.append(
            f"AdaBN was not measured at PD share {', '.join(partial)} (the study's `adabn_shares`), so its methods "
            "are left out of the recommendation, which compares methods over every set and share."
        )
    for model, table in models.items():
        lines.append(f"### {model} ({counted(results['seeds'][model], 'seed')})")
        for key, rows in table.items():
            name, share = key.split("@")
            header = "| method | π̂ | sensitivity | specificity | Δ sensitivity | Δ specificity | target | refused |"
            body = [header, "|---|---|---|---|---|---|---|---|"]
            for method, r in rows.items():
                pi = f"{r['pd_share']:.2f}" if r["pd_share"] is not None else "–"
                label = f"*{method}*" if method == CEILING else method
                body.append(
                    f"| {label} | {pi} | {r['sens']:.3f} | {r['spec']:.3f} | {_ci(r['d_sens'], r['d_sens_ci'])} | "
                    f"{_ci(r['d_spec'], r['d_spec_ci'])} | {r['meets_target']:.2f} | {r['refused']:.2f} |"
                )
            lines.append(f"**{name}, true PD share {share}**\n\n" + "\n".join(body))
    rec = recommend(results, default_model)
    if rec is not None:
        method, worst, ok = rec
        where = [
            f"{key.replace('@', ' at ')}: {table[method]['sens']:.2f} / {table[method]['spec']:.2f}"
            for key, table in models[default_model].items()
        ]
        verdict = (
            f"it meets the target (sensitivity and specificity ≥ {TARGET:.2f}) at every set and share"
            if ok
            else f"**the target (sensitivity and specificity ≥ {TARGET:.2f} at every set and share) is missed**: "
            f"its worst case is {worst:.3f}"
        )
        lines.append(
            f"**Recommended method: `{method}`** for the {default_model} student: the highest worst case over every "
            f"set and share (lowest of mean sensitivity and specificity {worst:.3f}); {verdict}. Sensitivity / "
            "specificity per site: " + "; ".join(where) + "."
        )
        lines.append(ceiling_sentence(models[default_model], worst))
    return "\n\n".join(lines)


def ceiling_sentence(table: Mapping[str, Mapping[str, Mapping[str, float]]], worst: float) -> str:
    """What the :data:`CEILING` rows of one model's ``table`` say about the recommended method's ``worst`` case."""
    sites = {key: min(rows[CEILING]["sens"], rows[CEILING]["spec"]) for key, rows in table.items() if CEILING in rows}
    if not sites:
        return ""
    key = min(sites, key=sites.get)
    ceiling = sites[key]
    reach = (
        f"even a threshold chosen with the labels misses the target at {key.replace('@', ' at ')} ({ceiling:.3f}), "
        "so no label-free method can meet it there: the shortfall is the model's ranking at that site"
        if ceiling < TARGET
        else f"the gap to the recommended method ({ceiling - worst:+.3f}) is what a better label-free method could "
        "still win"
    )
    return (
        f"**Ceiling.** With each draw's labels, the best single threshold (*{CEILING}*) reaches a worst case of "
        f"{ceiling:.3f} over the same sets and shares; {reach}."
    )


def section_for_study(res: Any) -> str:
    """The report hook: the section for a loaded :class:`scripts.study.report.StudyResults` (empty without
    external sets or without the models measured)."""
    externals = list(getattr(res, "externals", []) or [])
    if not externals:
        return ""
    records = list(res.records.values()) if isinstance(res.records, Mapping) else list(res.records)
    in_domain = _in_domain(records)
    if in_domain is None:
        return ""
    return adaptation_section(adaptation_results(records, in_domain, externals))


def _in_domain(records: Sequence[Mapping]) -> str | None:
    for record in records:
        for key in record.get("predictions", {}):
            if key.endswith("/validation"):
                return key.split("/")[0]
    return None


def add_adabn(run_dir: str | Path) -> int:
    """Add the AdaBN scores to every finished record of ``run_dir`` that the study measures and that lacks them
    (the updated record is appended to ``results.jsonl``; a later record of a cell wins). Returns how many."""
    from scripts.study.cells import log_to
    from scripts.study.results import ResultsFile
    from scripts.study.runner import context_from_study

    ctx = context_from_study(run_dir)
    results = ResultsFile(Path(run_dir) / "results.jsonl")
    added = 0
    for name, record in results.read().items():
        cell = Cell.from_dict(record["axes"])
        if not measures_adabn(ctx, cell) or record.get(ADAPTED_KEY) or "checkpoint" not in record:
            continue
        with log_to(Path(run_dir) / "cells" / name / "log.txt"):
            record[ADAPTED_KEY] = adabn_predictions(ctx, cell, record["checkpoint"])
        results.append(record)
        added += 1
        print(f"{name}: AdaBN scores added", flush=True)
    return added


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.study.adaptation", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--draws", type=int, default=N_DRAWS)
    parser.add_argument("--no-adabn", action="store_true", help="do not run AdaBN for records lacking it")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument(
        "--site-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="also print how mixture depends on a site's number of scans, at these sizes (e.g. 20 30 40 60 100)",
    )
    args = parser.parse_args(argv)
    if args.site_sizes and min(args.site_sizes) < 2:
        parser.error("--site-sizes: a site needs at least 2 scans.")
    from scripts.study.results import ResultsFile
    from scripts.study.runner import context_from_study

    if not args.no_adabn:
        add_adabn(args.run_dir)
    ctx = context_from_study(args.run_dir)
    records = list(ResultsFile(Path(args.run_dir) / "results.jsonl").read().values())
    externals = [n for n in ctx.datasets if n != ctx.in_domain]
    results = adaptation_results(records, ctx.in_domain, externals, args.draws)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(adaptation_section(results))
    if args.site_sizes:
        print(site_size_section(site_size_sweep(records, ctx.in_domain, externals, args.site_sizes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
