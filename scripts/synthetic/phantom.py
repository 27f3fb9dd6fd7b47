# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Synthetic DaTscan (123I-FP-CIT SPECT) and AV133-like (VMAT2 PET) phantoms with known ground truth.

Each subject is a set of latent parameters (age, sex, dopamine-transporter level, physiological asymmetry,
striatal size and, for PD, the spatial pattern and severity of the loss). A scan ("visit") adds the
acquisition: point-spread function, counts, global intensity and a small residual pose. Rendering is

    activity(p) = e * head(q) + (1 - e) * brain(q) + sum_s frac_s(q) * BP_s(t_s(q)),   q = pose^-1(p)
    counts      = Poisson(c * (G_fwhm * activity))
    volume      = k * (G_post * counts)

with ``e`` the extracerebral uptake, ``frac_s`` the anti-aliased membership of striatal structure ``s``,
``BP_s(t)`` its true specific binding (background brain = 1) at the normalised antero-posterior position
``t``, ``c`` the counts per background voxel, ``G`` Gaussian kernels and ``k`` the global intensity scale.

**Disease model (PD only).** On the most affected hemisphere (contralateral to the clinically most affected
body side) the posterior putamen loses a fraction ``L_post``; the loss falls linearly to
``L_ant = L_post * r_ant`` at the anterior end, the caudate loses ``L_post * r_caud`` and all losses on the
other hemisphere are multiplied by ``f_ipsi``: ``BP = BP_0 * (1 - loss(t))``. A fraction of PD subjects is
"mild" (``L_post ~ U(0.2, 0.5)``), which is what sets the overlap with healthy controls. Optionally a further
fraction is "early unilateral": the severe ``L_post`` on the most affected side but a small ``f_ipsi``
(``unilateral_fraction``, ``unilateral_ipsilateral_range``; 0 by default).

Nuisance variables (age, sex, pose, PSF, counts, intensity, striatal size) are drawn from each subject's own
random stream, independently of the label. Biological latents are shared between modalities: the same seed
gives the same subjects for ``spect`` and ``av133``.

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

Outputs follow the bundle's datalist convention; run ``python -m scripts.synthetic --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import math
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scripts.anatomy import (
    MNI_2MM_AFFINE,
    MNI_2MM_SHAPE,
    SIDES,
    brain_ellipsoid,
    evaluate_rois,
    head_ellipsoid,
    roi_mean_ap_position,
    striatal_distances,
    striatal_structures,
    world_coordinates,
)
from scripts.synthetic.presets import PRESETS, STUDY_SETS, Preset, get_preset, study_seed

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
    "main",
]

MODALITIES: tuple[str, ...] = ("spect", "av133")
SPLIT_NAMES: tuple[str, str, str] = ("training", "validation", "test")
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
# Per-hemisphere centre (mm) about which a subject's striatal size is scaled, so that the striatum stays put.
_STRIATAL_SCALE_CENTRE = {"L": np.array([-20.0, 4.0, 6.0]), "R": np.array([20.0, 4.0, 6.0])}
# Reference voxel volume (mm^3) for the counts-per-voxel parameter: one voxel of the MNI 2 mm grid.
_REFERENCE_VOXEL_MM3 = 8.0


@dataclass(frozen=True)
class PhantomConfig:
    """Generator parameters. Use :func:`default_config` for a modality's defaults; any field can be overridden.

    Ranges are ``(low, high)`` of a uniform distribution unless stated otherwise. ``*_bp`` are true
    (pre partial-volume) specific bindings of a 60-year-old man, relative to background brain = 1.
    """

    modality: str = "spect"
    # Demography.
    age_mean: float = 61.0
    age_sd: float = 10.0
    age_range: tuple[float, float] = (30.0, 85.0)
    female_probability: float = 0.38
    # Healthy binding.
    caudate_bp: float = 6.5
    putamen_bp: float = 3.5
    age_decline_per_decade: float = 0.06
    female_factor: float = 1.10
    global_sd: float = 0.17  # SD of log g, the subject's global transporter level
    structure_sd: float = 0.04  # SD of the per-structure, per-side lognormal factor
    asymmetry_sd: float = 0.03  # physiological L/R asymmetry a: left x (1 + a), right x (1 - a)
    striatal_volume_sd: float = 0.08  # striatal volume factor ~ N(1, sd) (clipped to +-3 sd); linear scale = cube root
    extracerebral_range: tuple[float, float] = (0.08, 0.2)
    # PD model.
    mild_fraction: float = 0.07
    mild_loss_range: tuple[float, float] = (0.2, 0.5)
    # Early unilateral PD: strong loss on the most affected side (the severe L_post) and little on the other side.
    unilateral_fraction: float = 0.0
    unilateral_ipsilateral_range: tuple[float, float] = (0.1, 0.4)
    # Dorsal-ventral physiology (0 / off by default). ``dv_gradient_range``: the loss of every PD subject is scaled by
    # ``1 + gamma (2 h - 1)`` along the dorsal-ventral position ``h`` (0 ventral, 1 dorsal) of each structure,
    # ``gamma ~ U(range)``, so that the dorsal striatum loses more than the ventral (same mean loss).
    # ``dorsal_only_fraction``: early PD whose loss (posterior ``L ~ U(dorsal_only_loss_range)`` on the most affected
    # side) is confined above ``h = b``, ``b ~ U(dorsal_only_boundary_range)`` (a 0.2-wide ramp in ``h``).
    dv_gradient_range: tuple[float, float] = (0.0, 0.0)
    dorsal_only_fraction: float = 0.0
    dorsal_only_loss_range: tuple[float, float] = (0.4, 0.8)
    dorsal_only_boundary_range: tuple[float, float] = (0.45, 0.6)
    severe_loss_beta: tuple[float, float] = (9.0, 1.6)
    severe_loss_clip: tuple[float, float] = (0.45, 0.99)
    anterior_ratio_range: tuple[float, float] = (0.55, 0.9)
    caudate_ratio_range: tuple[float, float] = (0.3, 0.6)
    ipsilateral_range: tuple[float, float] = (0.7, 0.95)
    progression_per_year_range: tuple[float, float] = (0.05, 0.10)
    max_loss: float = 0.99
    # Acquisition.
    fwhm_range_mm: tuple[float, float] = (10.0, 14.0)
    counts_range: tuple[float, float] = (20.0, 50.0)  # expected counts per 2 mm background voxel
    post_sigma_mm: float = 1.6  # Gaussian smoothing after the noise (0.8 voxel of the 2 mm grid)
    intensity_log_sd: float = 0.3
    per_count_units: bool = False  # False: counts x k; True: counts / c x k (ratio-like PET units)
    translation_sd_mm: float = 1.0
    translation_clip_mm: float = 3.0
    rotation_sd_deg: float = 2.0
    rotation_clip_deg: float = 6.0
    # Between-subject z (inferior-superior) translation and pitch (rotation about the left-right axis); ``None``:
    # the same as the other axes (``translation_*`` / ``rotation_*``).
    z_translation_sd_mm: float | None = None
    z_translation_clip_mm: float | None = None
    pitch_sd_deg: float | None = None
    pitch_clip_deg: float | None = None
    pose_scale_sd: float = 0.03
    pose_scale_clip: float = 0.1

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}.")
        for name in ("caudate_bp", "putamen_bp", "female_factor", "post_sigma_mm", "age_sd"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")
        for name in (
            "global_sd",
            "structure_sd",
            "asymmetry_sd",
            "striatal_volume_sd",
            "intensity_log_sd",
            "translation_sd_mm",
            "rotation_sd_deg",
            "pose_scale_sd",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative standard deviation, got {getattr(self, name)}.")
        for name in ("z_translation_sd_mm", "z_translation_clip_mm", "pitch_sd_deg", "pitch_clip_deg"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative (or None), got {getattr(self, name)}.")
        for name in ("female_probability", "mild_fraction", "unilateral_fraction", "dorsal_only_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}.")
        if self.mild_fraction + self.unilateral_fraction + self.dorsal_only_fraction > 1.0 + 1e-12:
            raise ValueError(
                "mild_fraction + unilateral_fraction + dorsal_only_fraction must not exceed 1, got "
                f"{self.mild_fraction} + {self.unilateral_fraction} + {self.dorsal_only_fraction}."
            )
        if self.dv_gradient_range[0] < 0 or self.dv_gradient_range[1] >= 1:
            raise ValueError(f"dv_gradient_range must lie in [0, 1), got {self.dv_gradient_range}.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_range", "_range_mm", "_loss_clip")) and not (
                isinstance(value, tuple) and len(value) == 2 and value[0] <= value[1]
            ):
                raise ValueError(f"{f.name} must be a (low, high) pair with low <= high, got {value!r}.")
        if self.fwhm_range_mm[0] <= 0 or self.counts_range[0] <= 0:
            raise ValueError(
                f"fwhm_range_mm and counts_range must be positive, got {self.fwhm_range_mm} and {self.counts_range}."
            )
        if (
            not (isinstance(self.severe_loss_beta, tuple) and len(self.severe_loss_beta) == 2)
            or min(self.severe_loss_beta) <= 0
        ):
            raise ValueError(f"severe_loss_beta parameters must be positive, got {self.severe_loss_beta}.")
        if not 0.0 <= self.max_loss <= 1.0:
            raise ValueError(f"max_loss must be in [0, 1], got {self.max_loss}.")

    def replace(self, **overrides) -> PhantomConfig:
        """Return a copy with ``overrides`` applied; unknown names raise a ``ValueError`` listing valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown phantom parameter(s) {unknown}; valid names are {sorted(names)}.")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return dataclasses.replace(self, **fixed)


def default_config(modality: str = "spect", **overrides) -> PhantomConfig:
    """Default generator parameters for ``modality`` (``"spect"`` or ``"av133"``), with ``overrides`` applied.

    ``av133`` is a VMAT2 PET-like domain: 4-6 mm FWHM, about three times the counts with weaker post-smoothing,
    putamen >= caudate in controls (true BP caudate 3.0, putamen 3.6), -5 %/decade, ratio-like units, and a PD
    pattern with mean losses caudate ~45 %, anterior putamen ~70 % and posterior putamen ~80 % on the most
    affected side, the other side x ~0.83.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    base = PhantomConfig(modality=modality)
    if modality == "av133":
        base = base.replace(
            caudate_bp=3.0,
            putamen_bp=3.6,
            age_decline_per_decade=0.05,
            anterior_ratio_range=(0.8, 0.95),
            caudate_ratio_range=(0.45, 0.67),
            ipsilateral_range=(0.75, 0.91),
            fwhm_range_mm=(4.0, 6.0),
            counts_range=(60.0, 150.0),
            post_sigma_mm=1.0,
            per_count_units=True,
        )
    return base.replace(**overrides)


@dataclass(frozen=True)
class SubjectLatents:
    """Biological latent parameters of one subject (shared by all visits and by both modalities).

    ``loss_*`` fields hold the PD pattern; they are drawn for every subject (so that the random stream does not
    depend on the label) but only used when ``label == 1``.
    """

    label: int
    age: float
    sex: str
    global_factor: float
    structure_factors: dict[str, float]
    asymmetry: float
    anatomical_scale: float
    extracerebral: float
    affected_side: str
    is_mild: bool
    posterior_loss: float
    anterior_ratio: float
    caudate_ratio: float
    ipsilateral_factor: float
    progression_per_year: float
    is_unilateral: bool = False
    dv_gradient: float = 0.0
    is_dorsal_only: bool = False
    dorsal_boundary: float = 0.0

    @property
    def dorsal_ventral(self) -> bool:
        """Whether the loss varies along the dorsal-ventral axis (a gradient, or dorsal-only early PD)."""
        return self.dv_gradient > 0.0 or self.is_dorsal_only


@dataclass(frozen=True)
class Acquisition:
    """Acquisition of one scan: PSF, counts, intensity, residual pose (image = R (s q) + translation), noise seed."""

    fwhm_mm: float
    counts: float
    intensity_scale: float
    translation_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    scale: float
    noise_seed: int

    def pose_dict(self) -> dict:
        return {
            "translation_mm": [round(v, 4) for v in self.translation_mm],
            "rotation_deg": [round(v, 4) for v in self.rotation_deg],
            "scale": round(self.scale, 5),
        }


@dataclass(frozen=True)
class PhantomSubject:
    """A subject: latents, the generator config and one :class:`Acquisition` per visit (visit ``v`` at year ``v``)."""

    subject_id: str
    latents: SubjectLatents
    config: PhantomConfig
    visits: tuple[Acquisition, ...] = field(default_factory=tuple)

    @property
    def label(self) -> int:
        return self.latents.label

    def years(self, visit: int) -> float:
        """Years since baseline of 0-based ``visit``."""
        return float(visit)


def subject_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of subject ``index``'s ``stream`` (0: latents, 1: visit count, 2 + v: visit ``v``).

    Derived from ``SeedSequence(seed, spawn_key=(1, index, stream))``, so it does not depend on how many subjects
    are generated, in which order, or by which worker process.
    """
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(1, int(index), int(stream))))
    )


def _uniform(u: float, bounds: tuple[float, float]) -> float:
    return float(bounds[0] + (bounds[1] - bounds[0]) * u)


def _sample_latents(rng: np.random.Generator, label: int, config: PhantomConfig) -> SubjectLatents:
    # The draw order is fixed and every draw happens for every subject, whatever the label or the parameters.
    age = float(np.clip(config.age_mean + config.age_sd * rng.standard_normal(), *config.age_range))
    sex = "F" if rng.random() < config.female_probability else "M"
    g = float(np.exp(config.global_sd * rng.standard_normal()))
    z = rng.standard_normal(4)
    factors = {
        name: float(np.exp(config.structure_sd * z[i]))
        for i, name in enumerate(("caudate_L", "caudate_R", "putamen_L", "putamen_R"))
    }
    asym = float(config.asymmetry_sd * rng.standard_normal())
    anat = float(np.cbrt(1.0 + config.striatal_volume_sd * np.clip(rng.standard_normal(), -3.0, 3.0)))
    extra = _uniform(rng.random(), config.extracerebral_range)
    side = "L" if rng.random() < 0.5 else "R"
    u_mild = rng.random()
    mild_loss = _uniform(rng.random(), config.mild_loss_range)
    severe_loss = float(np.clip(rng.beta(*config.severe_loss_beta), *config.severe_loss_clip))
    is_mild = bool(u_mild < config.mild_fraction)
    # The PD subtype comes from the same uniform: [0, mild) mild, [mild, mild + unilateral) early unilateral, else
    # bilateral. No extra draw, so presets without unilateral PD reproduce the original random streams exactly.
    is_unilateral = bool(not is_mild and u_mild < config.mild_fraction + config.unilateral_fraction)
    is_dorsal_only = bool(
        not is_mild
        and not is_unilateral
        and u_mild < config.mild_fraction + config.unilateral_fraction + config.dorsal_only_fraction
    )
    u = rng.random(4)
    # Dorsal-ventral draws only when the config uses them, so other presets keep their random streams exactly.
    dv = rng.random(3) if config.dv_gradient_range[1] > 0 or config.dorsal_only_fraction > 0 else np.zeros(3)
    if is_dorsal_only:
        severe_loss = _uniform(dv[1], config.dorsal_only_loss_range)
    return SubjectLatents(
        label=int(label),
        age=age,
        sex=sex,
        global_factor=g,
        structure_factors=factors,
        asymmetry=asym,
        anatomical_scale=anat,
        extracerebral=extra,
        affected_side=side,
        is_mild=is_mild,
        posterior_loss=mild_loss if is_mild else severe_loss,
        anterior_ratio=_uniform(u[0], config.anterior_ratio_range),
        caudate_ratio=_uniform(u[1], config.caudate_ratio_range),
        ipsilateral_factor=_uniform(
            u[2], config.unilateral_ipsilateral_range if is_unilateral else config.ipsilateral_range
        ),
        progression_per_year=_uniform(u[3], config.progression_per_year_range),
        is_unilateral=is_unilateral,
        dv_gradient=0.0 if is_dorsal_only else _uniform(dv[0], config.dv_gradient_range),
        is_dorsal_only=is_dorsal_only,
        dorsal_boundary=_uniform(dv[2], config.dorsal_only_boundary_range) if is_dorsal_only else 0.0,
    )


def _sample_acquisition(rng: np.random.Generator, config: PhantomConfig) -> Acquisition:
    u = rng.random(2)
    log_k = rng.standard_normal()

    def _axes(sd, clip, special_axis, special_sd, special_clip):
        sds, clips = np.full(3, float(sd)), np.full(3, float(clip))
        if special_sd is not None:
            sds[special_axis] = special_sd
        if special_clip is not None:
            clips[special_axis] = special_clip
        return sds, clips

    t_sd, t_clip = _axes(
        config.translation_sd_mm,
        config.translation_clip_mm,
        2,
        config.z_translation_sd_mm,
        config.z_translation_clip_mm,
    )
    r_sd, r_clip = _axes(
        config.rotation_sd_deg, config.rotation_clip_deg, 0, config.pitch_sd_deg, config.pitch_clip_deg
    )
    t = np.clip(t_sd * rng.standard_normal(3), -t_clip, t_clip)
    r = np.clip(r_sd * rng.standard_normal(3), -r_clip, r_clip)
    s = 1.0 + float(
        np.clip(config.pose_scale_sd * rng.standard_normal(), -config.pose_scale_clip, config.pose_scale_clip)
    )
    return Acquisition(
        fwhm_mm=_uniform(u[0], config.fwhm_range_mm),
        counts=_uniform(u[1], config.counts_range),
        intensity_scale=float(np.exp(config.intensity_log_sd * log_k)),
        translation_mm=tuple(float(v) for v in t),
        rotation_deg=tuple(float(v) for v in r),
        scale=s,
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )


def sample_subject(
    rng: np.random.Generator | int,
    label: int,
    config: PhantomConfig | str = "spect",
    n_visits: int = 1,
    subject_id: str = "sub-0001",
) -> PhantomSubject:
    """Draw one subject's latents and ``n_visits`` acquisitions.

    Args:
        rng: a numpy ``Generator`` used for everything (latents first, then each visit in order), or an int seed.
        label: 0 (HC) or 1 (PD).
        config: a :class:`PhantomConfig` or a modality name (its defaults).
        n_visits: number of scans of this subject, at years 0, 1, ..., ``n_visits - 1``.
        subject_id: identifier stored on the subject.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (HC) or 1 (PD), got {label!r}.")
    if int(n_visits) < 1:
        raise ValueError(f"n_visits must be >= 1, got {n_visits}.")
    cfg = default_config(config) if isinstance(config, str) else config
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    latents = _sample_latents(gen, label, cfg)
    visits = tuple(_sample_acquisition(gen, cfg) for _ in range(int(n_visits)))
    return PhantomSubject(subject_id=subject_id, latents=latents, config=cfg, visits=visits)


def dorsal_position(name: str, points: np.ndarray) -> np.ndarray:
    """Normalised dorsal-ventral position ``h`` in ``[0, 1]`` (0 ventral, 1 dorsal) of template ``points`` in ``name``.

    Putamen: along the ellipsoid's own supero-inferior axis, ``h = (u_1 / D_1 + 1) / 2``. Caudate: the template
    height ``z`` between the lowest and highest point of the tube (the head is ventral, the body and tail dorsal).
    """
    struct = striatal_structures()[name]
    pts = np.asarray(points, dtype=np.float64)
    if name.startswith("putamen"):
        u1 = struct.local(pts)[..., 1]
        return np.clip(0.5 * (u1 / struct.semi_axes[1] + 1.0), 0.0, 1.0)
    low, high = struct.bounding_box(0.0)
    return np.clip((pts[..., 2] - low[2]) / (high[2] - low[2]), 0.0, 1.0)


def _dorsal_weight(h: np.ndarray, latents: SubjectLatents) -> np.ndarray:
    """Factor on the loss at dorsal-ventral position ``h``: ``1 + gamma (2h - 1)``, or the dorsal-only ramp
    ``clip((h - b) / 0.2 + 0.5, 0, 1)`` of early PD whose loss is confined above ``h = b``."""
    if latents.is_dorsal_only:
        return np.clip((h - latents.dorsal_boundary) / 0.2 + 0.5, 0.0, 1.0)
    return 1.0 + latents.dv_gradient * (2.0 * h - 1.0)


def _local_loss(p: Mapping[str, float], t: np.ndarray, h: np.ndarray | None, latents: SubjectLatents, cap: float):
    """Loss at antero-posterior ``t`` and dorsal-ventral ``h`` (``None``: no dorsal-ventral variation)."""
    loss = p["loss_post"] + (p["loss_ant"] - p["loss_post"]) * t
    if h is None:
        return loss
    return np.minimum(loss * _dorsal_weight(h, latents), cap)


def _structure_parameters(subject: PhantomSubject, visit: int) -> dict[str, dict[str, float]]:
    """Healthy binding and loss parameters per structure for a visit: ``{struct: {bp, loss_post, loss_ant}}``."""
    lat, cfg = subject.latents, subject.config
    age = lat.age + subject.years(visit)
    common = (1.0 - cfg.age_decline_per_decade * (age - 60.0) / 10.0) * lat.global_factor
    if lat.sex == "F":
        common *= cfg.female_factor
    l_post = 0.0
    if lat.label == 1:
        l_post = min(lat.posterior_loss + lat.progression_per_year * subject.years(visit), cfg.max_loss)
    out = {}
    for side in SIDES:
        hemi = common * (1.0 + lat.asymmetry if side == "L" else 1.0 - lat.asymmetry)
        f = 1.0 if side == lat.affected_side else lat.ipsilateral_factor
        post = l_post * f
        out[f"caudate_{side}"] = {
            "bp": cfg.caudate_bp * hemi * lat.structure_factors[f"caudate_{side}"],
            "loss_post": l_post * lat.caudate_ratio * f,
            "loss_ant": l_post * lat.caudate_ratio * f,
        }
        out[f"putamen_{side}"] = {
            "bp": cfg.putamen_bp * hemi * lat.structure_factors[f"putamen_{side}"],
            "loss_post": post,
            "loss_ant": post * lat.anterior_ratio,
        }
    return out


def true_binding(subject: PhantomSubject, visit: int = 0) -> dict[str, float]:
    """True (pre partial-volume) mean specific binding of each template region for a visit.

    Returns:
        ``{region: BP}`` for caudate_L/R, putamen_L/R, putamen_ant_L/R and putamen_post_L/R, where each value is
        the mean of ``BP_0 (1 - loss(t))`` over the region; exact because the loss is linear in ``t``.
    """
    params = _structure_parameters(subject, visit)
    if subject.label == 1 and subject.latents.dorsal_ventral:
        # Not linear in t any more: average BP_0 (1 - loss(t, h)) over the ROI's template sample points.
        samples = _roi_samples()
        out = {}
        for region, (t, h) in samples.items():
            struct = ("caudate_" if region.startswith("caudate") else "putamen_") + region[-1]
            p = params[struct]
            loss = _local_loss(p, t, h, subject.latents, subject.config.max_loss)
            out[region] = float(p["bp"] * (1.0 - loss.mean()))
        return out
    mean_t = roi_mean_ap_position()
    out = {}
    for side in SIDES:
        for region in (f"caudate_{side}", f"putamen_{side}", f"putamen_ant_{side}", f"putamen_post_{side}"):
            p = params[f"caudate_{side}" if region.startswith("caudate") else f"putamen_{side}"]
            t = mean_t[region]
            out[region] = float(p["bp"] * (1.0 - (p["loss_post"] + (p["loss_ant"] - p["loss_post"]) * t)))
    return out


@functools.lru_cache(maxsize=1)
def _roi_samples(spacing_mm: float = 1.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{roi: (t, h)}`` of the template sample points of every striatal ROI (as in ``roi_mean_ap_position``)."""
    axis = np.arange(-60.0, 60.0 + spacing_mm / 2, spacing_mm)
    pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    pts = pts[
        (np.abs(pts[:, 0]) <= 50) & (pts[:, 1] >= -45) & (pts[:, 1] <= 45) & (pts[:, 2] >= -30) & (pts[:, 2] <= 40)
    ]
    rois = evaluate_rois(pts)
    dist = striatal_distances(pts, margin=1.0)
    out = {}
    for side in SIDES:
        for region in (f"caudate_{side}", f"putamen_{side}", f"putamen_ant_{side}", f"putamen_post_{side}"):
            struct = f"caudate_{side}" if region.startswith("caudate") else f"putamen_{side}"
            mask = rois[region]
            out[region] = (dist[struct][1][mask], dorsal_position(struct, pts[mask]))
    return out


def _rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _fast_length(n: int) -> int:
    """Smallest 2-3-5-smooth integer >= ``n`` (efficient FFT length)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def gaussian_blur(volume: np.ndarray, sigma_vox: Sequence[float] | float, truncate: float = 4.0) -> np.ndarray:
    """Isotropic/anisotropic Gaussian blur of a 3-D volume by FFT, with zero padding (no wrap-around).

    ``out = irfftn(rfftn(pad(v)) * prod_d exp(-2 pi^2 sigma_d^2 f_d^2))`` cropped back to ``volume.shape``; each axis
    is zero-padded by at least ``truncate * sigma_d`` voxels to an FFT-friendly length, so the result matches a
    linear convolution with a Gaussian of standard deviation ``sigma_d`` voxels up to ``exp(-truncate^2 / 2)``.

    Args:
        volume: ``(X, Y, Z)`` array.
        sigma_vox: standard deviation in voxels, one value or one per axis; 0 leaves an axis untouched.
        truncate: minimum zero padding per axis, in standard deviations.

    Returns:
        float32 ``(X, Y, Z)`` array.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D (X, Y, Z), got shape {vol.shape}.")
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    if np.any(sig < 0):
        raise ValueError(f"sigma_vox must be non-negative, got {tuple(sig)}.")
    if not np.any(sig > 0):
        return vol.copy()
    padded = tuple(_fast_length(n + int(math.ceil(truncate * s)) + 1) for n, s in zip(vol.shape, sig))
    spec = np.fft.rfftn(vol, s=padded, axes=(0, 1, 2))
    gains = []
    for d, (m, s) in enumerate(zip(padded, sig)):
        f = np.fft.rfftfreq(m) if d == 2 else np.fft.fftfreq(m)
        gains.append(np.exp(-2.0 * (np.pi * s * f) ** 2).astype(np.float32))
    spec *= gains[0][:, None, None]
    spec *= gains[1][None, :, None]
    spec *= gains[2][None, None, :]
    out = np.fft.irfftn(spec, s=padded, axes=(0, 1, 2))
    return np.ascontiguousarray(out[: vol.shape[0], : vol.shape[1], : vol.shape[2]], dtype=np.float32)


_GRID_CACHE: dict = {}


def _grid_cache(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    key = (shape, tuple(np.round(np.asarray(affine, dtype=np.float64), 6).ravel().tolist()))
    cached = _GRID_CACHE.get(key)
    if cached is None:
        world = world_coordinates(shape, affine).reshape(-1, 3).astype(np.float32)
        spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
        cached = (world, spacing)
        _GRID_CACHE.clear()
        _GRID_CACHE[key] = cached
    return cached


def _in_box(points: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: rows of ``points`` ``(N, 3)`` inside the axis-aligned box ``[low, high]``."""
    inside = (points[:, 0] >= low[0]) & (points[:, 0] <= high[0])
    for d in (1, 2):
        inside &= (points[:, d] >= low[d]) & (points[:, d] <= high[d])
    return inside


def _membership(distance: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased occupancy ``clip(0.5 - d / width, 0, 1)`` of a voxel whose centre is ``d`` mm from a surface."""
    return np.clip(0.5 - distance / width, 0.0, 1.0)


def activity_map(
    subject: PhantomSubject, visit: int = 0, shape: Sequence[int] = MNI_2MM_SHAPE, affine: np.ndarray = MNI_2MM_AFFINE
) -> np.ndarray:
    """Noise-free, unblurred activity (background brain = 1) of a visit on the grid ``(shape, affine)``.

    Every voxel centre ``p`` is mapped to template space by the visit's inverse pose ``q = R^T (p - t) / s`` and,
    for the striatum, by the subject's size factor about a per-hemisphere centre; shapes are anti-aliased with
    ``clip(0.5 - d / voxel, 0, 1)`` of the signed distance ``d``.

    Args:
        subject: from :func:`sample_subject`.
        visit: 0-based visit index.
        shape: grid shape ``(X, Y, Z)``.
        affine: ``(4, 4)`` voxel -> world (MNI mm) affine of the grid.

    Returns:
        float32 ``(X, Y, Z)`` array: extracerebral layer ``e``, brain 1, striatum ``1 + BP(t)``.
    """
    if isinstance(visit, bool) or not isinstance(visit, (int, np.integer)) or not 0 <= visit < len(subject.visits):
        raise ValueError(
            f"visit must be an int in [0, {len(subject.visits)}) for {subject.subject_id}, got {visit!r} "
            "(the modality is part of the subject's config)."
        )
    shape = tuple(int(s) for s in shape)
    world, spacing = _grid_cache(shape, affine)
    acq, lat = subject.visits[visit], subject.latents
    width = float(spacing.mean())
    # Template coordinates of every voxel centre: q = R^T (p - t) / s.
    rot = _rotation_matrix(acq.rotation_deg)
    inv = rot / acq.scale  # q_j = sum_i (p_i - t_i) R_ij / s, written per column (much faster than an (N, 3) matmul)
    rel = [world[:, i] - np.float32(acq.translation_mm[i]) for i in range(3)]
    q_all = np.empty_like(world)
    for j in range(3):
        q_all[:, j] = rel[0] * np.float32(inv[0, j]) + rel[1] * np.float32(inv[1, j]) + rel[2] * np.float32(inv[2, j])
    act = np.zeros(world.shape[0], dtype=np.float32)
    head = head_ellipsoid()
    low, high = head.bounding_box(2.0 * width)
    in_box = _in_box(q_all, low, high)
    q = np.compress(in_box, q_all, axis=0)
    head_frac = _membership(acq.scale * head.signed_distance(q), width)
    brain_frac = _membership(acq.scale * brain_ellipsoid().signed_distance(q), width)
    values = lat.extracerebral * head_frac + (1.0 - lat.extracerebral) * brain_frac
    params = _structure_parameters(subject, visit)
    s_anat = lat.anatomical_scale
    structs = striatal_structures()
    # Only voxels near the (scaled) striatum need the structure geometry.
    corners = []
    for name, struct in structs.items():
        centre = _STRIATAL_SCALE_CENTRE[name[-1]]
        for corner in struct.bounding_box(2.0 * width):
            corners.append(centre + (corner - centre) * s_anat)
    corners = np.asarray(corners)
    near = np.flatnonzero(_in_box(q, corners.min(axis=0), corners.max(axis=0)))
    q_near = q[near].astype(np.float64)
    striatal = np.zeros(near.size)
    caud_frac = np.zeros(near.size)
    for kind in ("caudate", "putamen"):
        for side in SIDES:
            name = f"{kind}_{side}"
            centre = _STRIATAL_SCALE_CENTRE[side]
            native = centre + (q_near - centre) / s_anat
            dist, t = striatal_distances(native, margin=width, names=(name,))[name]
            frac = _membership(acq.scale * s_anat * dist, width)
            if kind == "caudate":
                caud_frac = caud_frac + frac
            else:
                frac = np.minimum(frac, np.clip(1.0 - caud_frac, 0.0, 1.0))
            p = params[name]
            h = dorsal_position(name, native) if lat.label == 1 and lat.dorsal_ventral else None
            striatal += frac * p["bp"] * (1.0 - _local_loss(p, t, h, lat, subject.config.max_loss))
    values[near] += striatal
    act[in_box] = values
    return act.reshape(shape)


def render_volume(
    subject: PhantomSubject,
    visit: int = 0,
    shape: Sequence[int] = MNI_2MM_SHAPE,
    affine: np.ndarray = MNI_2MM_AFFINE,
    rng: np.random.Generator | None = None,
    noise: bool = True,
) -> np.ndarray:
    """Render one scan of ``subject``: PSF blur, Poisson counts, light smoothing and global intensity.

    ``volume = k * G_post * Poisson(c' * G_fwhm * activity)`` with ``c' = counts * voxel_volume / 8 mm^3``. SPECT
    volumes are in counts (background about ``k * counts``); AV133 volumes are divided by ``c'`` (background about
    ``k``).

    Args:
        subject: from :func:`sample_subject`.
        visit: 0-based visit index.
        shape: output grid shape, default the MNI 2 mm grid ``(91, 109, 91)``.
        affine: ``(4, 4)`` voxel -> world affine of the output grid; any axis-aligned grid works.
        rng: generator for the Poisson noise; default ``default_rng(noise_seed)`` of the visit, so a subject always
            renders to the same volume.
        noise: ``False`` skips the Poisson noise (the expected volume).

    Returns:
        float32 ``(X, Y, Z)`` array.
    """
    shape = tuple(int(s) for s in shape)
    act = activity_map(subject, visit, shape, affine)
    _, spacing = _grid_cache(shape, affine)
    acq, cfg = subject.visits[visit], subject.config
    blurred = gaussian_blur(act, acq.fwhm_mm * _FWHM_TO_SIGMA / spacing)
    np.maximum(blurred, 0.0, out=blurred)
    counts = acq.counts * float(np.prod(spacing)) / _REFERENCE_VOXEL_MM3
    expected = blurred * np.float32(counts)
    if noise:
        if rng is None:
            rng = np.random.default_rng(acq.noise_seed)
        live = np.flatnonzero(expected.ravel() > 1e-3)
        noisy = np.zeros(expected.size, dtype=np.float32)
        noisy[live] = rng.poisson(expected.ravel()[live].astype(np.float64))
        expected = noisy.reshape(shape)
    out = gaussian_blur(expected, cfg.post_sigma_mm / spacing) if cfg.post_sigma_mm > 0 else expected
    scale = acq.intensity_scale / counts if cfg.per_count_units else acq.intensity_scale
    out *= np.float32(scale)
    return out


def _write_nifti(path: pathlib.Path, volume: np.ndarray, affine: np.ndarray, compresslevel: int = 1) -> None:
    """Write a non-negative ``volume`` as int16 with ``scl_slope = max / 32767`` and no intercept (0 stays 0)."""
    import nibabel as nib

    vol = np.maximum(np.asarray(volume, dtype=np.float32), 0.0)
    peak = float(vol.max())
    slope = peak / 32767.0 if peak > 0 else 1.0
    aff = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.round(vol / slope).astype(np.int16), aff)
    img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units("mm")
    img.set_qform(aff, code=4)  # 4 = MNI_152
    img.set_sform(aff, code=4)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0))  # byte-reproducible
    os.replace(tmp, path)


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


def _build_subject(seed: int, index: int, label: int, n_visits: int, config: PhantomConfig, id_width: int = 4):
    latents = _sample_latents(subject_rng(seed, index, 0), label, config)
    visits = tuple(_sample_acquisition(subject_rng(seed, index, 2 + v), config) for v in range(n_visits))
    return PhantomSubject(subject_id=f"sub-{index + 1:0{id_width}d}", latents=latents, config=config, visits=visits)


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
    return [_build_subject(seed, i, int(labels[i]), n_visits[i], config, width) for i in range(int(n_subjects))]


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
    subject = _build_subject(seed, index, label, n_visits, config, id_width)
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
    subjects = [_build_subject(seed, i, int(labels[i]), n_visits[i], config, width) for i in range(n_subjects)]
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


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}.")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``python -m scripts.synthetic --help``."""
    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()).replace("%", "%%")
    parser = argparse.ArgumentParser(
        prog="python -m scripts.synthetic",
        description="Generate a synthetic DaTscan / AV133 phantom data set, the study data folder, or an in-memory "
        "calibration summary.",
    )
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--out", help="output folder (datalist.json and images/)")
    task.add_argument(
        "--study-data",
        metavar="DIR",
        help="build DIR/benchmark, DIR/av133 and DIR/spect_other_site (each once, with seeds derived from --seed)",
    )
    task.add_argument(
        "--information",
        action="store_true",
        help="render the population on the 64^3 input grid and print its information budget: PD vs HC from the whole "
        "volume vs the voxels each 2D projection sees (scripts/synthetic/information.py)",
    )
    task.add_argument(
        "--calibrate",
        action="store_true",
        help="render the population in memory and print its SBR calibration summary as JSON (no files)",
    )
    parser.add_argument("--preset", default="default", choices=list(PRESETS), help=f"named parameter set: {presets}")
    parser.add_argument("--n-subjects", type=int, default=None, help="number of subjects (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modality", choices=MODALITIES, default=None, help="default: the preset's (spect)")
    parser.add_argument("--pd-fraction", type=float, default=None, help="default: the preset's")
    parser.add_argument("--max-visits", type=int, default=None, help="default: the preset's (1)")
    parser.add_argument(
        "--split", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"), help="default: the preset's"
    )
    parser.add_argument(
        "--extra-test-subjects",
        type=int,
        default=None,
        metavar="N",
        help="subjects added to the test split only (default: the preset's; benchmark 880, a 1,000-scan test split)",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of --information")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a generator parameter, e.g. --set mild_fraction=0.1 --set fwhm_range_mm=[16,20]",
    )
    args = parser.parse_args(argv)
    design = {
        "modality": args.modality,
        "pd_fraction": args.pd_fraction,
        "max_visits": args.max_visits,
        "split": None if args.split is None else tuple(args.split),
    }
    if args.study_data:
        unused = [f"--{k.replace('_', '-')}" for k, v in design.items() if v is not None]
        unused += ["--set"] * bool(args.overrides) + ["--preset"] * (args.preset != "default")
        unused += ["--extra-test-subjects"] * (args.extra_test_subjects is not None)
        if unused:
            parser.error(f"{', '.join(unused)} cannot be used with --study-data (its sets are fixed presets).")
        try:
            paths = make_study_data(args.study_data, seed=args.seed, workers=args.workers, n_subjects=args.n_subjects)
        except ValueError as err:
            parser.error(str(err))
        for name, path in paths.items():
            meta = json.loads(path.read_text())["metadata"]
            print(f"{name}: preset {meta['preset']}, seed {meta['seed']}, {meta['n_scans']} scans -> {path}")
        return 0
    try:
        if args.information:
            from scripts.synthetic.information import format_budget, information_budget

            unused = [f"--{k.replace('_', '-')}" for k, v in design.items() if v is not None]
            if unused:
                parser.error(f"{', '.join(unused)} cannot be used with --information (the preset's design is used).")
            result = information_budget(
                args.preset,
                args.n_subjects,
                seed=args.seed,
                workers=args.workers,
                n_boot=args.bootstrap,
                **dict(args.overrides),
            )
            print(format_budget(result))
            print(f"({result['seconds']:.0f} s)")
            return 0
        if args.calibrate:
            summary = calibrate_population(
                args.preset, args.n_subjects, seed=args.seed, workers=args.workers, **design, **dict(args.overrides)
            )
            print(json.dumps(summary, indent=1))
            return 0
        path = generate_dataset(
            args.out,
            args.n_subjects,
            seed=args.seed,
            workers=args.workers,
            preset=args.preset,
            extra_test_subjects=args.extra_test_subjects,
            **design,
            **dict(args.overrides),
        )
    except ValueError as err:
        parser.error(str(err))
    meta = json.loads(path.read_text())["metadata"]
    c = meta["counts"]
    print(
        f"{meta['modality']}: {meta['n_scans']} scans of {meta['n_subjects']} subjects "
        f"(train {c['training']['n_scans']}, val {c['validation']['n_scans']}, test {c['test']['n_scans']}) "
        f"in {meta['seconds']:.1f} s -> {path} (preset {meta['preset']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
