# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The phantom's subjects: generator parameters, each subject's latents and acquisition, and its true binding.

Each subject is a set of latent parameters (age, sex, dopamine-transporter level, physiological asymmetry,
striatal size and, for PD, the spatial pattern and severity of the loss). A scan ("visit") adds the
acquisition: point-spread function, counts, global intensity and a small residual pose.

**Disease model (PD only).** On the most affected hemisphere (contralateral to the clinically most affected
body side) the posterior putamen loses a fraction ``L_post``; the loss falls linearly to
``L_ant = L_post * r_ant`` at the anterior end, the caudate loses ``L_post * r_caud`` and all losses on the
other hemisphere are multiplied by ``f_ipsi``: ``BP = BP_0 * (1 - loss(t))``. A fraction of PD subjects is
"mild" (``L_post ~ U(0.2, 0.5)``), which is what sets the overlap with healthy controls. Optionally a further
fraction is "early unilateral": the severe ``L_post`` on the most affected side but a small ``f_ipsi``
(``unilateral_fraction``, ``unilateral_ipsilateral_range``; 0 by default).

Nuisance variables (age, sex, pose, PSF, counts, intensity, striatal size) are drawn from each subject's own
random stream, independently of the label. Biological latents are shared between modalities: the same seed
gives the same subjects for ``spect`` and ``av133``. Rendering is in :mod:`scripts.synthetic.render`, data sets
in :mod:`scripts.synthetic.phantom`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scripts.anatomy import SIDES, evaluate_rois, roi_mean_ap_position, striatal_distances, striatal_structures

MODALITIES: tuple[str, ...] = ("spect", "av133")
SPLIT_NAMES: tuple[str, str, str] = ("training", "validation", "test")


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


def build_subject(seed: int, index: int, label: int, n_visits: int, config: PhantomConfig, id_width: int = 4):
    """Subject ``index`` of a data set of ``seed``: latents and each visit's acquisition from the subject's own
    random streams (so a subject does not depend on the others, nor on the number of subjects)."""
    latents = _sample_latents(subject_rng(seed, index, 0), label, config)
    visits = tuple(_sample_acquisition(subject_rng(seed, index, 2 + v), config) for v in range(n_visits))
    return PhantomSubject(subject_id=f"sub-{index + 1:0{id_width}d}", latents=latents, config=config, visits=visits)
