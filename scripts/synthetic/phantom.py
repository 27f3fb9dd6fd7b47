# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Synthetic DaTscan (123I-FP-CIT SPECT) and AV133-like (VMAT2 PET) phantoms with known ground truth: data sets.

The phantom model is in two modules: :mod:`scripts.synthetic.subjects` (generator parameters, each subject's
latents, acquisition and true binding, the disease model) and :mod:`scripts.synthetic.render` (the activity map and
the rendered, noisy, blurred volume). This module builds data sets from them (the public names of both are
re-exported here, the generator's one interface).

The defaults of :class:`PhantomConfig` are calibrated so that template-ROI SBRs reproduce published PPMI-like
statistics (HC caudate ~2.9, putamen ~2.1, PD putamen ~0.9, putamen asymmetry ~8 % HC / ~30 % PD, a
lowest-putamen threshold at ~0.955 accuracy); ``docs/calibration.md`` lists the measured values and the command
that reproduces them.

**Presets** (:mod:`scripts.synthetic.presets`, ``--preset NAME``) are named sets of overrides and data-set design
defaults: ``default`` (the calibrated defaults above), ``benchmark`` (a harder, non-saturating SPECT set: more mild
and early-unilateral PD, a multi-site PSF/count mix; lowest-putamen threshold ~0.92), and two external test sets
made with other subjects, ``av133_external`` and ``spect_other_site``. :func:`make_study_data` (``--study-data
DIR``) builds the benchmark and both external sets in one call; :func:`calibrate_population` (``--calibrate``)
renders a population in memory and prints its SBR calibration summary.

Outputs follow the bundle's datalist convention; the command line is :mod:`scripts.synthetic.cli` (``python -m
scripts.synthetic --help``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
from scripts.anatomy import MNI_2MM_AFFINE, MNI_2MM_SHAPE
from scripts.synthetic.presets import PRESETS, STUDY_SETS, Preset, get_preset, study_seed
from scripts.synthetic.render import _write_nifti, activity_map, gaussian_blur, render_volume
from scripts.synthetic.subjects import (
    MODALITIES,
    SPLIT_NAMES,
    Acquisition,
    PhantomConfig,
    PhantomSubject,
    SubjectLatents,
    build_subject,
    default_config,
    dorsal_position,
    sample_subject,
    subject_rng,
    true_binding,
)

__all__ = [
    "MODALITIES",
    "SPLIT_NAMES",
    "PhantomConfig",
    "SubjectLatents",
    "Acquisition",
    "PhantomSubject",
    "default_config",
    "PRESETS",
    "preset_config",
    "sample_subject",
    "subject_rng",
    "render_volume",
    "true_binding",
    "sample_population",
    "activity_map",
    "generate_dataset",
    "make_study_data",
    "calibrate_population",
    "gaussian_blur",
    "dorsal_position",
]


def _round_dict(d: dict[str, float], digits: int = 5) -> dict[str, float]:
    return {k: round(float(v), digits) for k, v in d.items()}


def preset_config(preset: str | Preset = "default", modality: str | None = None, **overrides) -> PhantomConfig:
    """Generator parameters of a named preset (see :mod:`scripts.synthetic.presets`) for ``modality``.

    ``default_config(modality)`` with the preset's population overrides, then its overrides for ``modality``, then
    ``overrides`` applied. ``preset_config("default", m)`` equals ``default_config(m)``.

    Args:
        preset: a name in :data:`PRESETS` (or a :class:`~scripts.synthetic.presets.Preset`).
        modality: ``"spect"`` or ``"av133"``; ``None`` uses the preset's own modality.
        overrides: :class:`PhantomConfig` fields applied last (e.g. ``fwhm_range_mm=(16, 20)``).

    Raises:
        ValueError: for an unknown preset (the message lists the valid ones), modality or parameter.
    """
    p = get_preset(preset)
    modality = p.modality if modality is None else modality
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    return default_config(modality, **{**p.config_overrides(modality), **overrides})


def _resolve_design(
    preset: str | Preset,
    n_subjects: int | None,
    modality: str | None,
    pd_fraction: float | None,
    max_visits: int | None,
    split: Sequence[float] | None,
) -> tuple[Preset, int, str, float, int, tuple[float, ...]]:
    """Fill every design argument left ``None`` from the preset."""
    p = get_preset(preset)
    return (
        p,
        p.n_subjects if n_subjects is None else n_subjects,
        p.modality if modality is None else modality,
        p.pd_fraction if pd_fraction is None else pd_fraction,
        p.max_visits if max_visits is None else max_visits,
        tuple(p.split if split is None else split),
    )


def _dataset_design(
    n_subjects: int,
    seed: int,
    pd_fraction: float,
    max_visits: int,
    fractions: Sequence[float],
    extra_test_subjects: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Labels, split index (0 training, 1 validation, 2 test) and visit count of every subject.

    ``extra_test_subjects`` more subjects (indices ``n_subjects ..``, ``round(pd_fraction * extra)`` of them PD, in
    their own seeded order) all go to the test split; the first ``n_subjects`` are exactly those without them.
    """
    n_pd = int(round(pd_fraction * n_subjects))
    master = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(0,))))
    labels = master.permutation(np.array([1] * n_pd + [0] * (n_subjects - n_pd), dtype=np.int64))
    split_of = np.empty(n_subjects, dtype=np.int64)
    for cls in (0, 1):
        members = master.permutation(np.flatnonzero(labels == cls))
        bounds = np.cumsum([0] + _allocate(members.size, fractions))
        for s in range(3):
            split_of[members[bounds[s] : bounds[s + 1]]] = s
    extra = int(extra_test_subjects)
    if extra > 0:
        n_pd_extra = int(round(pd_fraction * extra))
        more = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(2,))))
        labels = np.concatenate(
            [labels, more.permutation(np.array([1] * n_pd_extra + [0] * (extra - n_pd_extra), dtype=np.int64))]
        )
        split_of = np.concatenate([split_of, np.full(extra, 2, dtype=np.int64)])
    n_visits = [int(subject_rng(seed, i, 1).integers(1, max_visits + 1)) for i in range(n_subjects + max(extra, 0))]
    return labels, split_of, n_visits


def sample_population(
    n_subjects: int | None = None,
    seed: int = 0,
    modality: str | None = None,
    pd_fraction: float | None = None,
    max_visits: int | None = None,
    preset: str | Preset = "default",
    **overrides,
) -> list[PhantomSubject]:
    """The subjects :func:`generate_dataset` would create for these arguments, in memory and without rendering.

    Useful for calibration: render them with :func:`render_volume` (e.g. in a process pool) instead of writing
    files. Subject ``i`` depends only on ``(seed, i)`` and its label. Arguments left ``None`` come from ``preset``.
    """
    p, n_subjects, modality, pd_fraction, max_visits, _ = _resolve_design(
        preset, n_subjects, modality, pd_fraction, max_visits, None
    )
    if int(n_subjects) < 1:
        raise ValueError(f"n_subjects must be a positive integer, got {n_subjects!r}.")
    if not 0.0 <= pd_fraction <= 1.0:
        raise ValueError(f"pd_fraction must be in [0, 1], got {pd_fraction}.")
    config = preset_config(p, modality, **overrides)
    labels, _, n_visits = _dataset_design(int(n_subjects), seed, pd_fraction, int(max_visits), (1.0, 0.0, 0.0))
    width = max(4, len(str(n_subjects)))
    return [build_subject(seed, i, int(labels[i]), n_visits[i], config, width) for i in range(int(n_subjects))]


def _entry(subject: PhantomSubject, visit: int) -> dict:
    """The datalist entry of one visit (without the image path)."""
    latents, acq, label = subject.latents, subject.visits[visit], subject.label
    return {
        "label": int(label),
        "subject": subject.subject_id,
        "visit": visit + 1,
        "years": subject.years(visit),
        "age": round(latents.age + subject.years(visit), 3),
        "sex": latents.sex,
        "sbr_true": _round_dict(true_binding(subject, visit)),
        "affected_side": latents.affected_side if label == 1 else None,
        "mild": bool(latents.is_mild) if label == 1 else None,
        "unilateral": bool(latents.is_unilateral) if label == 1 else None,
        "dorsal_only": bool(latents.is_dorsal_only) if label == 1 else None,
        "fwhm_mm": round(acq.fwhm_mm, 4),
        "counts": round(acq.counts, 4),
        "intensity_scale": round(acq.intensity_scale, 5),
        "anatomical_scale": round(latents.anatomical_scale, 5),
        "pose": acq.pose_dict(),
    }


def _subject_entries(task: tuple) -> list[dict]:
    """Worker: sample, render and write every visit of one subject; returns its datalist entries."""
    seed, index, label, n_visits, config, out_dir, id_width = task
    subject = build_subject(seed, index, label, n_visits, config, id_width)
    entries = []
    for v in range(n_visits):
        volume = render_volume(subject, v)
        rel = pathlib.Path("images") / f"{subject.subject_id}_ses-{v + 1:02d}.nii.gz"
        _write_nifti(pathlib.Path(out_dir) / rel, volume, MNI_2MM_AFFINE)
        entries.append({"image": rel.as_posix(), **_entry(subject, v)})
    return entries


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into ``len(fractions)`` integer counts by the largest-remainder rule."""
    raw = [f * n for f in fractions]
    counts = [int(math.floor(r + 1e-9)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _validate_dataset_args(
    n_subjects: int, modality: str, pd_fraction: float, max_visits: int, split: Sequence[float], workers: int
) -> tuple[int, int, tuple[float, float, float]]:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    if int(n_subjects) != n_subjects or n_subjects < 1:
        raise ValueError(f"n_subjects must be a positive integer, got {n_subjects!r}.")
    if not 0.0 <= pd_fraction <= 1.0:
        raise ValueError(f"pd_fraction must be in [0, 1], got {pd_fraction}.")
    if int(max_visits) != max_visits or max_visits < 1:
        raise ValueError(f"max_visits must be an integer >= 1, got {max_visits!r}.")
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")
    fractions = tuple(float(f) for f in split)
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise ValueError(
            f"split must be three non-negative fractions (training, validation, test), got {tuple(split)}."
        )
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions):.6g}).")
    n_pd = int(round(pd_fraction * n_subjects))
    n_hc = int(n_subjects) - n_pd
    if 0.0 < pd_fraction < 1.0:
        for cls, n_cls in (("HC", n_hc), ("PD", n_pd)):
            per_split = _allocate(n_cls, fractions)
            for name, f, k in zip(SPLIT_NAMES, fractions, per_split):
                if f > 0 and k == 0:
                    raise ValueError(
                        f"n_subjects={n_subjects} is too small: with pd_fraction={pd_fraction} there are {n_pd} PD and "
                        f"{n_hc} HC subjects, and split={fractions} leaves the {name} split without any {cls} subject. "
                        "Increase n_subjects or change pd_fraction/split."
                    )
    return n_pd, n_hc, fractions


def generate_dataset(
    out_dir: str | os.PathLike,
    n_subjects: int | None = None,
    seed: int = 0,
    modality: str | None = None,
    pd_fraction: float | None = None,
    max_visits: int | None = None,
    split: Sequence[float] | None = None,
    workers: int = 1,
    preset: str | Preset = "default",
    extra_test_subjects: int | None = None,
    **overrides,
) -> pathlib.Path:
    """Generate a phantom data set: NIfTI volumes plus a ``datalist.json`` split by subject.

    Labels: exactly ``round(pd_fraction * n_subjects)`` PD subjects, in a seeded random order. Each subject has
    ``U{1..max_visits}`` visits (drawn independently of the label) at years 0, 1, ...; PD losses progress by
    ``progression_per_year`` per year. The training/validation/test split is by subject and stratified by label
    (largest-remainder allocation of each class), so all visits of a subject share a split. Everything is a
    function of ``seed`` only (one ``SeedSequence`` child per subject and visit), whatever ``workers`` is.

    Every argument left ``None`` takes the value of ``preset`` (see :mod:`scripts.synthetic.presets`); the
    ``default`` preset is spect, 300 subjects, 80 % PD, one visit, split 60/20/20.

    Args:
        out_dir: output folder; volumes go to ``out_dir/images/sub-XXXX_ses-YY.nii.gz``.
        n_subjects: number of subjects.
        seed: master seed.
        modality: ``"spect"`` (DaTscan) or ``"av133"`` (VMAT2 PET-like, out-of-distribution).
        pd_fraction: fraction of PD subjects.
        max_visits: maximum number of scans per subject.
        split: (training, validation, test) fractions of subjects, summing to 1; a zero fraction gives an
            empty split (``(0, 0, 1)``: every scan in ``test``, e.g. for an external test set).
        workers: number of worker processes.
        preset: a name in :data:`PRESETS` (``"default"``, ``"benchmark"``, ``"av133_external"``,
            ``"spect_other_site"``): generator overrides and defaults for the arguments above.
        extra_test_subjects: subjects added to the test split only, from the same population (``None``: the
            preset's; the benchmark adds 880 to its 120 test subjects); the first ``n_subjects`` subjects and their
            split do not depend on it.
        overrides: :class:`PhantomConfig` fields replacing the preset's values (e.g. ``mild_fraction=0.1``).

    With ``workers > 1`` a ``spawn`` process pool is used, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard.

    Returns:
        path of ``out_dir/datalist.json``: ``{"training": [...], "validation": [...], "test": [...],
        "metadata": {...}}`` with image paths relative to ``out_dir``.
    """
    p, n_subjects, modality, pd_fraction, max_visits, split = _resolve_design(
        preset, n_subjects, modality, pd_fraction, max_visits, split
    )
    n_pd, n_hc, fractions = _validate_dataset_args(n_subjects, modality, pd_fraction, max_visits, split, workers)
    config = preset_config(p, modality, **overrides)
    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    extra = p.extra_test_subjects if extra_test_subjects is None else int(extra_test_subjects)
    if extra < 0:
        raise ValueError(f"extra_test_subjects must be >= 0, got {extra}.")
    labels, split_of, n_visits = _dataset_design(n_subjects, seed, pd_fraction, max_visits, fractions, extra)
    n_total = n_subjects + extra
    id_width = max(4, len(str(n_total)))
    tasks = [(int(seed), i, int(labels[i]), n_visits[i], config, str(out), id_width) for i in range(n_total)]

    if workers > 1 and n_total > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=min(int(workers), n_total)) as pool:
            results = pool.map(_subject_entries, tasks, chunksize=max(1, n_total // (8 * workers)))
    else:
        results = [_subject_entries(t) for t in tasks]

    datalist: dict = {name: [] for name in SPLIT_NAMES}
    for i, entries in enumerate(results):
        datalist[SPLIT_NAMES[split_of[i]]].extend(entries)
    elapsed = time.perf_counter() - started
    counts = {}
    for name in SPLIT_NAMES:
        items = datalist[name]
        subjects = {e["subject"]: e["label"] for e in items}
        counts[name] = {
            "n_scans": len(items),
            "n_subjects": len(subjects),
            "n_pd_subjects": sum(subjects.values()),
            "n_hc_subjects": len(subjects) - sum(subjects.values()),
            "n_pd_scans": sum(e["label"] for e in items),
            "n_hc_scans": len(items) - sum(e["label"] for e in items),
        }
    datalist["metadata"] = {
        "generator": "scripts.synthetic.phantom",
        "preset": p.name,
        "modality": modality,
        "seed": int(seed),
        "n_subjects": int(n_subjects),
        "extra_test_subjects": int(extra),
        "n_scans": int(sum(len(r) for r in results)),
        "pd_fraction": float(pd_fraction),
        "max_visits": int(max_visits),
        "split": list(fractions),
        "labels": {"0": "HC", "1": "PD"},
        "counts": counts,
        "parameters": dataclasses.asdict(config),
        "grid": {"shape": list(MNI_2MM_SHAPE), "affine": np.asarray(MNI_2MM_AFFINE).tolist(), "space": "MNI152 2 mm"},
        "intensity": "counts x intensity_scale" if not config.per_count_units else "counts / c x intensity_scale",
        "seconds": round(elapsed, 2),
    }
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


def _study_sizes(n_subjects: int | Mapping[str, int] | None) -> dict[str, tuple[int, int]]:
    """``{set: (n_subjects, extra_test_subjects)}``: a set sized explicitly gets no extra test subjects."""
    sizes = {
        name: (get_preset(preset).n_subjects, get_preset(preset).extra_test_subjects)
        for name, (preset, _) in STUDY_SETS.items()
    }
    if n_subjects is None:
        return sizes
    if isinstance(n_subjects, Mapping):
        unknown = sorted(set(n_subjects) - set(sizes))
        if unknown:
            raise ValueError(f"unknown study set(s) {unknown} in n_subjects; valid sets are {list(STUDY_SETS)}.")
        return {**sizes, **{k: (int(v), 0) for k, v in n_subjects.items()}}
    return {name: (int(n_subjects), 0) for name in sizes}


def make_study_data(
    root: str | os.PathLike, seed: int = 0, workers: int = 1, n_subjects: int | Mapping[str, int] | None = None
) -> dict[str, pathlib.Path]:
    """Build (once) the study data folder: the benchmark set and its two shifted, external test sets.

    ``root/benchmark`` (preset ``benchmark``, seed ``seed``), ``root/av133`` (``av133_external``) and
    ``root/spect_other_site`` (``spect_other_site``), each with its own derived seed (:func:`study_seed`), so the
    external sets hold other subjects than the benchmark. A set whose ``datalist.json`` exists is not generated
    again (generation is deterministic); it must have been made with the same preset, seed and size.

    Args:
        root: the study data folder.
        seed: the study's master seed.
        workers: worker processes per set.
        n_subjects: ``None`` for each preset's recommended size (benchmark: 600 subjects split 60/20/20 plus 880
            test-only subjects, a 1,000-scan test split; each external set 500), an int for every set, or
            ``{set name: n}`` for some sets (a set sized so has no extra test subjects).

    Returns:
        ``{"benchmark": root/benchmark/datalist.json, "av133": ..., "spect_other_site": ...}``.

    Raises:
        ValueError: when an existing datalist was made with another preset, seed, number of subjects or generator
            parameters (e.g. by an older version of the preset).
    """
    root = pathlib.Path(root)
    sizes = _study_sizes(n_subjects)
    paths: dict[str, pathlib.Path] = {}
    for name, (preset, _) in STUDY_SETS.items():
        set_seed, path = study_seed(seed, name), root / name / "datalist.json"
        if path.is_file():
            meta = json.loads(path.read_text()).get("metadata", {})
            made = (
                meta.get("preset", "default"),
                meta.get("seed"),
                meta.get("n_subjects"),
                meta.get("extra_test_subjects", 0),
            )
            if made != (preset, set_seed, *sizes[name]):
                raise ValueError(
                    f"{path} was made with preset={made[0]!r}, seed={made[1]}, n_subjects={made[2]}, "
                    f"extra_test_subjects={made[3]}, not preset={preset!r}, seed={set_seed}, "
                    f"n_subjects={sizes[name][0]}, extra_test_subjects={sizes[name][1]}: remove {path.parent} or "
                    "use another study folder."
                )
            # JSON round trip: tuples are stored as lists.
            expected = json.loads(json.dumps(dataclasses.asdict(preset_config(preset))))
            changed = sorted(k for k, v in expected.items() if meta.get("parameters", {}).get(k) != v)
            if changed:
                raise ValueError(
                    f"{path} was made with other {preset!r} generator parameters than the current preset "
                    f"(changed: {changed}): remove {path.parent} to generate it again."
                )
        else:
            n, extra = sizes[name]
            generate_dataset(root / name, n, seed=set_seed, preset=preset, workers=workers, extra_test_subjects=extra)
        paths[name] = path
    return paths


def _visit_sbr(task: tuple[PhantomSubject, int]) -> dict[str, float]:
    """Worker: render one visit in memory (float32, MNI 2 mm grid) and measure its SBR features."""
    from scripts.sbr import compute_sbr

    subject, visit = task
    return compute_sbr(render_volume(subject, visit), MNI_2MM_AFFINE)


def calibrate_population(
    preset: str | Preset = "benchmark",
    n_subjects: int | None = None,
    seed: int = 0,
    modality: str | None = None,
    pd_fraction: float | None = None,
    max_visits: int | None = None,
    split: Sequence[float] | None = None,
    workers: int = 1,
    **overrides,
) -> dict:
    """Render a preset's population in memory and summarise its calibration (no files are written).

    The subjects, labels and split are exactly those :func:`generate_dataset` would write for the same arguments;
    volumes stay float32 (files are int16, which changes SBRs by ~1e-4).

    Returns:
        :func:`scripts.sbr.summarize_features` of every scan (per-class SBR statistics, the in-sample
        lowest-putamen threshold and the nuisance-only CV AUC) plus ``"threshold_train_test"``: the threshold
        fitted on the training split and evaluated on the test split (as ``python -m scripts.sbr --datalist``
        does), when both splits hold both classes; and the design (``preset``, ``modality``, ``seed``, ...).
    """
    from scripts.sbr import SBRThresholdClassifier, summarize_features

    p, n_subjects, modality, pd_fraction, max_visits, split = _resolve_design(
        preset, n_subjects, modality, pd_fraction, max_visits, split
    )
    _, _, fractions = _validate_dataset_args(n_subjects, modality, pd_fraction, max_visits, split, workers)
    config = preset_config(p, modality, **overrides)
    started = time.perf_counter()
    labels, split_of, n_visits = _dataset_design(n_subjects, seed, pd_fraction, max_visits, fractions)
    width = max(4, len(str(n_subjects)))
    subjects = [build_subject(seed, i, int(labels[i]), n_visits[i], config, width) for i in range(n_subjects)]
    tasks = [(s, v) for s in subjects for v in range(len(s.visits))]
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(processes=min(int(workers), len(tasks))) as pool:
            feats = pool.map(_visit_sbr, tasks, chunksize=max(1, len(tasks) // (8 * workers)))
    else:
        feats = [_visit_sbr(t) for t in tasks]
    split_name = {s.subject_id: SPLIT_NAMES[split_of[i]] for i, s in enumerate(subjects)}
    entries = [{**_entry(s, v), "split": split_name[s.subject_id]} for s, v in tasks]
    summary = summarize_features(entries, feats)
    lowest = np.asarray([f["lowest_putamen"] for f in feats])
    y = np.asarray([e["label"] for e in entries])
    fit, test = (np.asarray([e["split"] == name for e in entries]) for name in ("training", "test"))
    if all(0 < y[m].sum() < m.sum() for m in (fit, test)):
        clf = SBRThresholdClassifier().fit(lowest[fit], y[fit])
        summary["threshold_train_test"] = {"threshold": clf.threshold, "metrics": clf.report(lowest[test], y[test])}
    design = {"preset": p.name, "modality": modality, "seed": int(seed), "n_subjects": int(n_subjects)}
    design.update(pd_fraction=float(pd_fraction), max_visits=int(max_visits), split=list(fractions))
    design.update(overrides={k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
    return {**design, **summary, "seconds": round(time.perf_counter() - started, 2)}
