# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The experiment matrix: what a cell is, how cells pair, and the named presets.

A *cell* is one model trained once (a teacher or a student with one seed) or one baseline, scored on every test
set. The matrix of a study is the union of

* **teachers**: the 3D teacher with seeds ``0 .. n_teachers - 1`` (and, for the low-data sweep with
  ``teacher_fraction`` ``matched``/``both``, teachers trained on each training fraction; for the intensity
  comparison, teachers trained with each intensity normalisation);
* **main**: every projection × {KD, no-KD} × student seeds ``0 .. n_seeds - 1``, loss variant ``fg+lg``;
* **ablation** (default projection, KD): every loss variant of :data:`VARIANTS` × seeds;
* **low data**: every training fraction × {teacher, KD, no-KD} × seeds on each low-data projection (by default
  the default projection; ``single_slice`` sees the least and has the most to gain). The validation split shrinks
  with the training fraction, down to :data:`VALIDATION_FLOOR` subjects (:func:`validation_subset`); a model of
  a fraction below 1 trains for about as many optimiser steps as at full data (:meth:`Cell.schedule`) and keeps
  the checkpoint with the best validation ROC AUC (:data:`LOW_DATA_SELECTION_METRIC`);
* **label noise**: students trained on ``noise_fraction`` of the training subjects with a share of their labels
  flipped (:func:`training_subset`), KD (from the full-data teacher, trained on clean labels) vs no-KD;
* **centre**: the default projection with ``slice_centre: auto`` instead of the fixed template centre, × {KD,
  no-KD} × seeds;
* **intensity**: teachers and default-projection students (KD, no-KD) with another intensity normalisation;
* **baselines**: the lowest-putamen SBR threshold and always-PD, and the slice centres that ``auto`` picks.

Cells shared by two parts (the main KD cell of the default projection is also the ablation's ``fg+lg`` and the
low-data sweep's fraction 1) are run once.

Pairing of seeds
    Student seed ``s`` sets ``--seed s`` (``monai.utils.set_determinism`` in the config's ``initialize``), so the
    KD and the no-KD student of seed ``s`` start from the same initial weights and see the training scans in the
    same order (the configs instantiate the teacher definition in both, so both consume the random stream alike;
    ``tests/test_study.py`` checks it); they differ only by the distillation terms. A KD student of seed ``s`` is
    distilled from the teacher of seed ``s mod n_teachers`` (of its training fraction and intensity), and a
    student–teacher comparison pairs it with that teacher. Every model of a training fraction below 1 sees the
    same subset of training subjects (``data_seed`` stays fixed), so seeds measure initialisation and data-order
    variance, not subset variance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from monai.utils import look_up_option
from scripts.projections import PROJECTIONS

__all__ = [
    "VARIANTS",
    "DEFAULT_VARIANT",
    "DEFAULT_PROJECTION",
    "KINDS",
    "BASELINES",
    "TEACHER_FRACTIONS",
    "Cell",
    "MatrixSpec",
    "PRESETS",
    "preset",
    "build_cells",
    "slice_based",
    "count_cells",
    "VALIDATION_FLOOR",
    "cell_rules",
    "validation_subset",
    "training_subset",
]

DEFAULT_PROJECTION = "joint_fusion_slices"
"""The configs' default projection; the ablation, low-data, centre and intensity parts use it."""

VARIANTS: dict[str, dict] = {
    "fg+lg": {"kd_mode": "graph", "fg_weight": 5.0, "lg_weight": 5.0, "decor_weight": 0.0},
    "fg": {"kd_mode": "graph", "fg_weight": 5.0, "lg_weight": 0.0, "decor_weight": 0.0},
    "lg": {"kd_mode": "graph", "fg_weight": 0.0, "lg_weight": 5.0, "decor_weight": 0.0},
    "fg+lg+decor": {"kd_mode": "graph", "fg_weight": 5.0, "lg_weight": 5.0, "decor_weight": 1.0},
    "hinton": {"kd_mode": "hinton", "fg_weight": 0.0, "lg_weight": 1.0, "decor_weight": 0.0},
}
"""Distillation loss variants (overrides of ``configs/distill.json``), ``λ_cls = 1`` and ``T = 5`` throughout:

* ``fg+lg``: the configs' default, ``CE + 5 L_fg + 5 L_lg``;
* ``fg`` / ``lg``: one graph term only;
* ``fg+lg+decor``: plus the decorrelation term ``1 · M(f_s)`` of the reference loss (GS_lf);
* ``hinton``: classic soft-target distillation ``CE + T² KL(p_t ‖ p_s)`` (weight 1: the ``T²`` factor keeps its
  gradient on the scale of the CE term), no graph terms.
"""

DEFAULT_VARIANT = "fg+lg"
NO_KD = "none"
KINDS = ("teacher", "student", "baseline")
BASELINES = ("sbr", "always_pd", "centres")
TEACHER_FRACTIONS = ("matched", "full", "both")

_SLICE_BASED = {
    "single_slice",
    "early_fusion_slices",
    "joint_fusion_slices",
    "early_fusion_views",
    "joint_fusion_views",
    "early_fusion_views_slices",
}


VALIDATION_FLOOR = 24
"""Fewest validation subjects of a low-data model. A centre with ``f`` of the training subjects has about ``f`` of
the validation subjects too; below 24 (about 7 HC at 30 % HC), the best checkpoint and the Youden operating point
would be chosen on a handful of controls, so the validation split stops shrinking there."""


LOW_DATA_SELECTION_METRIC = "auc_ce"
"""Validation metric that picks a low-data model's best checkpoint: ROC AUC, as with a few dozen training scans
macro-F1 at the arg-max stays at its always-PD value for many epochs, with ties broken by the validation
cross-entropy, as on 24 validation subjects ROC AUC reaches 1.000 within a few epochs and stays there (see
``scripts.metrics.SELECTION_METRICS``)."""

LOW_DATA_MAX_EPOCH_FACTOR = 20
"""Most a low-data training's epochs (and patience) are multiplied by (:meth:`Cell.schedule`)."""


def cell_rules() -> dict:
    """How this version of the study configures a cell beyond the user's settings (low-data validation floor,
    checkpoint selection and schedule). Kept in ``study.json``: a run folder made under other rules would mix
    cells trained differently, so it is not extended (:meth:`scripts.study.results.StudyFile.check`)."""
    return {
        "validation_floor": VALIDATION_FLOOR,
        "low_data_selection_metric": LOW_DATA_SELECTION_METRIC,
        "low_data_max_epoch_factor": LOW_DATA_MAX_EPOCH_FACTOR,
    }


def validation_subset(datalist_file: str, fraction: float = 1.0, floor: int = VALIDATION_FLOOR, seed: int = 0):
    """The validation entries a model trained on ``fraction`` of the training subjects may use: the same share of
    the validation subjects (per class, :func:`scripts.data.subsample_by_subject`), but at least ``floor`` subjects
    (all of them when the split holds fewer)."""
    from scripts.data import load_datalist, subsample_by_subject

    entries = load_datalist(datalist_file, "validation")
    n = len({str(e.get("subject", e["image"])) for e in entries})
    if n == 0 or fraction >= 1.0:
        return entries
    share = min(1.0, max(float(fraction), floor / n))
    return subsample_by_subject(entries, share, seed)


def training_subset(datalist_file: str, fraction: float = 1.0, seed: int = 0, flip: float = 0.0):
    """``fraction`` of the training subjects (:func:`scripts.data.subsample_by_subject`) with the labels of
    ``round(flip × subjects)`` of them flipped (chosen with ``seed``; every scan of a flipped subject), as an
    uncertain clinical diagnosis of early PD would."""
    import random

    from scripts.data import load_datalist, subsample_by_subject

    entries = subsample_by_subject(load_datalist(datalist_file, "training"), fraction, seed)
    subjects = sorted({str(e.get("subject", e["image"])) for e in entries})
    flipped = set(random.Random(seed + 7919).sample(subjects, int(round(flip * len(subjects))))) if flip > 0 else set()
    return [{**e, "label": 1 - int(e["label"])} if str(e.get("subject", e["image"])) in flipped else e for e in entries]


def slice_based(projection: str | None) -> bool:
    """Whether a projection takes slices around a centre (so ``slice_centre`` matters)."""
    return projection in _SLICE_BASED


def _fraction(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix (see the module docstring).

    Attributes:
        kind: ``"teacher"``, ``"student"`` or ``"baseline"``.
        seed: the training seed (``--seed``).
        projection: the student's projection (students only).
        kd: distilled from a teacher (students only).
        variant: loss variant of :data:`VARIANTS` for a KD student, ``"none"`` otherwise.
        fraction: share of the training subjects the model is trained on (``--train_fraction``).
        teacher_fraction: training fraction of a KD student's teacher (1 or ``fraction``).
        centre: ``slice_centre`` of a student (``"template"`` or ``"auto"``).
        intensity: intensity normalisation (``"minmax"`` or ``"occipital"``).
        baseline: ``"sbr"``, ``"always_pd"`` or ``"centres"`` for a baseline cell.
        label_noise: share of the training subjects whose label is flipped (students only).
    """

    kind: str
    seed: int = 0
    projection: str | None = None
    kd: bool = False
    variant: str = NO_KD
    fraction: float = 1.0
    teacher_fraction: float | None = None
    centre: str = "template"
    intensity: str = "minmax"
    baseline: str | None = None
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        look_up_option(self.kind, KINDS)
        if self.kind == "student":
            look_up_option(self.projection, PROJECTIONS)
            if self.kd:
                look_up_option(self.variant, VARIANTS)
                if self.teacher_fraction is None:
                    raise ValueError("a KD student needs the training fraction of its teacher.")
            elif self.variant != NO_KD or self.teacher_fraction is not None:
                raise ValueError("a student without KD has no loss variant and no teacher.")
        if self.kind == "baseline":
            look_up_option(self.baseline, BASELINES)
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"training fraction must be in (0, 1], got {self.fraction}.")
        if not 0.0 <= self.label_noise < 0.5 or (self.label_noise > 0 and self.kind != "student"):
            raise ValueError(f"label noise is a share in [0, 0.5) of a student's labels, got {self.label_noise}.")

    @property
    def name(self) -> str:
        """Unique, file-system safe name, e.g. ``student-joint_fusion_slices-kd-fg+lg-f1-tf1-template-minmax-s0``."""
        if self.kind == "baseline":
            return f"baseline-{self.baseline}"
        if self.kind == "teacher":
            return f"teacher-f{_fraction(self.fraction)}-{self.intensity}-s{self.seed}"
        kd = (
            f"kd-{self.variant}-f{_fraction(self.fraction)}-tf{_fraction(self.teacher_fraction)}"
            if self.kd
            else (f"nokd-f{_fraction(self.fraction)}")
        )
        noise = f"-noise{_fraction(self.label_noise)}" if self.label_noise > 0 else ""
        return f"student-{self.projection}-{kd}-{self.centre}-{self.intensity}{noise}-s{self.seed}"

    @property
    def group(self) -> str:
        """The name without the seed: the cells summarised together over seeds."""
        return self.name.rsplit("-s", 1)[0] if self.kind != "baseline" else self.name

    def teacher(self, n_teachers: int) -> Cell | None:
        """The teacher cell a KD student is distilled from: seed ``seed mod n_teachers``; ``None`` otherwise."""
        if self.kind != "student" or not self.kd:
            return None
        return Cell("teacher", seed=self.seed % n_teachers, fraction=self.teacher_fraction, intensity=self.intensity)

    def overrides(self) -> dict:
        """The config overrides of this cell's axes (the study adds paths, grid and schedule)."""
        if self.kind == "baseline":
            return {}
        out = {"seed": self.seed, "train_fraction": self.fraction, "intensity": self.intensity}
        if self.fraction < 1.0:
            out["selection_metric"] = LOW_DATA_SELECTION_METRIC
            out["validate#datalist"] = {
                "_target_": "scripts.study.matrix.validation_subset",
                "datalist_file": "@datalist_file",
                "fraction": self.fraction,
                "floor": VALIDATION_FLOOR,
                "seed": "@data_seed",
            }
        if self.label_noise > 0:
            out["train#datalist"] = {
                "_target_": "scripts.study.matrix.training_subset",
                "datalist_file": "@datalist_file",
                "fraction": "@train_fraction",
                "seed": "@data_seed",
                "flip": self.label_noise,
            }
        if self.kind == "student":
            out.update(projection=self.projection, slice_centre=self.centre, kd_enabled=self.kd)
            if self.kd:
                out.update(VARIANTS[self.variant])
        return out

    def schedule(self, settings: dict) -> dict:
        """``settings`` (``max_epochs``, ``patience``) of a training on ``fraction`` of the subjects, so that it takes
        about as many optimiser steps as the full-data training: epochs scaled by ``1 / fraction``, at most
        :data:`LOW_DATA_MAX_EPOCH_FACTOR` times. With the full-data epoch count a network trained on 20 scans makes a
        few dozen steps and never leaves its initial "everything is PD" state."""
        if self.fraction >= 1.0:
            return dict(settings)
        factor = min(1.0 / self.fraction, LOW_DATA_MAX_EPOCH_FACTOR)
        return {k: (math.ceil(v * factor) if k in ("max_epochs", "patience") else v) for k, v in settings.items()}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Cell:
        return cls(**data)


@dataclass
class MatrixSpec:
    """The extent of a study (see :data:`PRESETS`).

    Attributes:
        projections: student projections of the main part.
        seeds: number of student seeds (``0 .. seeds - 1``).
        teachers: number of teacher seeds.
        variants: loss variants of the ablation (the main part always uses ``fg+lg``).
        fractions: training fractions below 1 of the low-data sweep.
        low_data_projections: projections of the low-data sweep and the label-noise arm (default: the default
            projection).
        low_data_seeds: student seeds of the low-data sweep and the label-noise arm (``None``: ``seeds``).
        label_noise: shares of flipped training labels of the label-noise arm (KD from the full-data teacher).
        noise_fraction: training fraction of the label-noise arm.
        teacher_fraction: teacher of a low-data KD student: ``"matched"`` (trained on the same fraction, so the
            KD student sees no label the no-KD student does not), ``"full"`` (the full-data teacher) or ``"both"``.
        centres: extra ``slice_centre`` values compared on the default projection (the main part uses
            ``"template"``).
        intensities: extra intensity normalisations compared on the default projection and the teacher.
        teacher_epochs, student_epochs: ``max_epochs`` (and ``patience``) of the two trainings.
        n_subjects: subjects of the generated synthetic sets (when the study generates its data): ``None`` for the
            generator's recommended sizes, ``{set name: n}`` for some sets (e.g. ``{"benchmark": 200}``), or an int
            for every set.
        settings: other config overrides shared by every cell (grid, batch sizes, ...).
        adabn_shares: true PD shares of the simulated sites whose AdaBN scores the study measures (the networks'
            forward passes over every site: the teacher's are most of a small study's time); ``None`` for every
            share of :data:`scripts.study.adaptation.SHARES`, ``()`` for none (the ``demo``). The score-based
            methods always see every share.
    """

    projections: tuple[str, ...] = (DEFAULT_PROJECTION,)
    seeds: int = 5
    teachers: int = 5
    variants: tuple[str, ...] = ()
    fractions: tuple[float, ...] = ()
    low_data_projections: tuple[str, ...] = (DEFAULT_PROJECTION,)
    low_data_seeds: int | None = None
    label_noise: tuple[float, ...] = ()
    noise_fraction: float = 1.0
    teacher_fraction: str = "matched"
    centres: tuple[str, ...] = ()
    intensities: tuple[str, ...] = ()
    teacher_epochs: int = 8
    student_epochs: int = 15
    n_subjects: int | dict[str, int] | None = None
    settings: dict = field(default_factory=dict)
    adabn_shares: tuple[float, ...] | None = None

    def check(self) -> MatrixSpec:
        from scripts.study.adaptation import SHARES

        if any(share not in SHARES for share in self.adabn_shares or ()):
            raise ValueError(f"AdaBN site shares must be among {list(SHARES)}, got {list(self.adabn_shares)}.")
        for p in (*self.projections, *self.low_data_projections):
            look_up_option(p, PROJECTIONS)
        if any(not 0.0 < n < 0.5 for n in self.label_noise) or not 0.0 < self.noise_fraction <= 1.0:
            raise ValueError(
                f"label noise shares must be in (0, 0.5) and noise_fraction in (0, 1], got {list(self.label_noise)} "
                f"and {self.noise_fraction}."
            )
        for v in self.variants:
            look_up_option(v, VARIANTS)
        look_up_option(self.teacher_fraction, TEACHER_FRACTIONS)
        for c in self.centres:
            look_up_option(c, ("template", "auto"))
        for i in self.intensities:
            look_up_option(i, ("minmax", "occipital", "zscore"))
        if self.seeds < 1 or self.teachers < 1:
            raise ValueError(f"seeds and teachers must be >= 1, got {self.seeds} and {self.teachers}.")
        if any(not 0.0 < f < 1.0 for f in self.fractions):
            raise ValueError(f"low-data fractions must be in (0, 1), got {list(self.fractions)}.")
        return self


LOW_DATA_FRACTIONS: tuple[float, ...] = (0.0556, 0.1111, 0.25)
"""Training fractions of the low-data sweep: about 20, 40 and 90 of the benchmark's 360 training scans (per class,
14 + 6, 28 + 12 and 63 + 27 subjects)."""

PRESETS: dict[str, dict] = {
    "demo": {
        "projections": (DEFAULT_PROJECTION,),
        "seeds": 2,
        "teachers": 1,
        "teacher_epochs": 6,
        "student_epochs": 8,
        "n_subjects": {"benchmark": 150, "av133": 100, "spect_other_site": 100},
        "adabn_shares": (),
    },
    "cpu": {
        "projections": ("single_slice", "early_fusion_slices", "joint_fusion_slices", "dynamic_image", "entropy"),
        "seeds": 3,
        "teachers": 3,
        "variants": ("fg", "lg", "fg+lg", "fg+lg+decor", "hinton"),
        "fractions": LOW_DATA_FRACTIONS[:2],
        "low_data_projections": ("single_slice", DEFAULT_PROJECTION),
        "low_data_seeds": 10,
        "label_noise": (0.05,),
        "noise_fraction": LOW_DATA_FRACTIONS[1],
        "teacher_fraction": "both",
        "centres": ("auto",),
        "intensities": ("occipital",),
        "teacher_epochs": 8,
        "student_epochs": 15,
    },
    "lowdata": {
        "projections": (),
        "seeds": 10,
        "teachers": 1,
        "fractions": LOW_DATA_FRACTIONS[:2],
        "low_data_projections": ("single_slice",),
        "label_noise": (0.05,),
        "noise_fraction": LOW_DATA_FRACTIONS[1],
        "teacher_fraction": "full",
        "teacher_epochs": 8,
        "student_epochs": 15,
    },
    "full": {
        "projections": PROJECTIONS,
        "seeds": 5,
        "teachers": 5,
        "variants": tuple(VARIANTS),
        "fractions": (0.1, 0.25, 0.5),
        "teacher_fraction": "both",
        "centres": ("auto",),
        "intensities": ("occipital",),
        "teacher_epochs": 100,
        "student_epochs": 100,
        "settings": {"patience": 20},
    },
}
"""Named matrices: ``demo`` (``make demo``: teacher + KD / no-KD student of the default projection on 150 subjects,
external sets of 100, ~4 min of cells on 2 CPU cores), ``cpu`` (``make study``: every part on a 2-core CPU; the
low-data sweep at ~20 and ~40 training scans on ``single_slice`` and ``joint_fusion_slices`` with 10 seeds and both
teachers, and a 5 % label-noise arm at ~40 scans; 12 teachers and 214 students, not run end to end: at most about
13.5 h with ``--jobs 2`` by the per-cell times of docs/results.md, 1,935 s a teacher and 344 s a student, and less as
the low-data students train on a tenth of the scans), ``lowdata`` (the low-data arm alone: ``single_slice`` at ~20
and ~40 training scans, KD from the full-data teacher vs no KD, then 5 % flipped labels at ~40 scans; 10 seeds),
``full`` (every projection and variant, both low-data teachers, long schedules: GPU)."""


def preset(name: str, **changes) -> MatrixSpec:
    """The :class:`MatrixSpec` of preset ``name`` with ``changes`` (``None`` values are ignored) applied."""
    base = dict(look_up_option(name, PRESETS))
    base.update({k: v for k, v in changes.items() if v is not None})
    if changes.get("seeds") is not None:
        base["low_data_seeds"] = None  # --seeds sets every part's seeds
    for key in (
        "projections",
        "variants",
        "fractions",
        "centres",
        "intensities",
        "low_data_projections",
        "label_noise",
        "adabn_shares",
    ):
        if base.get(key) is not None:
            base[key] = tuple(base[key])
    base["settings"] = dict(base.get("settings", {}))
    return MatrixSpec(**base).check()


def _unique(cells: Iterable[Cell]) -> list[Cell]:
    seen: set[Cell] = set()
    out = []
    for c in cells:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def build_cells(spec: MatrixSpec) -> list[Cell]:
    """Every cell of ``spec``, in run order: baselines, teachers, then students seed by seed (so that an
    interrupted study holds complete KD / no-KD pairs), the ablation, the low-data sweep, the centre and the
    intensity comparisons; teachers always come before the students they teach."""
    seeds, teachers = range(spec.seeds), range(spec.teachers)
    p0 = DEFAULT_PROJECTION if DEFAULT_PROJECTION in spec.projections or not spec.projections else spec.projections[0]

    def student(projection, seed, kd, variant=DEFAULT_VARIANT, fraction=1.0, tf=1.0, centre="template", inten="minmax"):
        if kd:
            return Cell("student", seed, projection, True, variant, fraction, tf, centre, inten)
        return Cell("student", seed, projection, False, NO_KD, fraction, None, centre, inten)

    cells = [Cell("baseline", baseline=b) for b in BASELINES]
    cells += [Cell("teacher", seed=t) for t in teachers]
    for s in seeds:
        for p in spec.projections:
            cells += [student(p, s, True), student(p, s, False)]
    for s in seeds:
        cells += [student(p0, s, True, variant=v) for v in spec.variants]
    teacher_fractions = {"matched": ("matched",), "full": ("full",), "both": ("matched", "full")}[spec.teacher_fraction]
    low_seeds = range(spec.seeds if spec.low_data_seeds is None else spec.low_data_seeds)
    if "matched" in teacher_fractions:
        cells += [Cell("teacher", seed=t, fraction=f) for f in spec.fractions for t in teachers]
    for s in low_seeds:  # seed by seed, so that an interrupted sweep holds every fraction with fewer seeds
        for f in spec.fractions:
            for p in spec.low_data_projections:
                for which in teacher_fractions:
                    cells.append(student(p, s, True, fraction=f, tf=f if which == "matched" else 1.0))
                cells.append(student(p, s, False, fraction=f))
    for share in spec.label_noise:
        for s in low_seeds:
            for p in spec.low_data_projections:
                f = spec.noise_fraction
                kd = Cell("student", s, p, True, DEFAULT_VARIANT, f, 1.0, label_noise=share)
                cells += [kd, Cell("student", s, p, False, NO_KD, f, None, label_noise=share)]
    for c in spec.centres if slice_based(p0) else ():
        for s in seeds:
            cells += [student(p0, s, True, centre=c), student(p0, s, False, centre=c)]
    for i in spec.intensities:
        cells += [Cell("teacher", seed=t, intensity=i) for t in teachers]
        for s in seeds:
            cells += [student(p0, s, True, inten=i), student(p0, s, False, inten=i)]
    return _unique(cells)


def count_cells(cells: Sequence[Cell]) -> dict[str, int]:
    """Cells per kind, e.g. ``{"teacher": 12, "student": 95, "baseline": 3}``."""
    out = dict.fromkeys(KINDS, 0)
    for c in cells:
        out[c.kind] += 1
    return out
