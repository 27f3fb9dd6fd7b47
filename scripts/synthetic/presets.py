# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Named phantom presets: :class:`~scripts.synthetic.phantom.PhantomConfig` overrides plus data-set design defaults.

A preset is applied on top of a modality's defaults (:func:`scripts.synthetic.phantom.default_config`):

    config = default_config(modality, **preset.overrides, **preset.modality_overrides[modality], **user_overrides)

``overrides`` describe the *population* (the PD severity mix) and hold for every modality; ``modality_overrides``
describe the *acquisition* (PSF, counts, residual pose) of one modality, so that e.g. the benchmark's SPECT site
mix is never applied to a PET-like volume. The design defaults (``pd_fraction``, ``split``, ``max_visits``,
``n_subjects``) are used by :func:`scripts.synthetic.phantom.generate_dataset` and the CLI for every argument left
unset. ``docs/calibration.md`` lists the measured statistics of each preset and the commands that reproduce them.

Presets:

* ``default``: the calibrated parameters of ``docs/calibration.md`` (80 % PD, 7 % mild PD, FWHM 10-14 mm). The
  lowest-putamen SBR threshold reaches ~0.96 accuracy, and the CNNs saturate on its small test split.
* ``benchmark``: a harder, non-saturating SPECT set with physiology along z: 6 % mild PD (posterior loss
  15-50 %), 20 % early unilateral PD (strong loss on the most affected side, a quarter to a half of it on the other
  side), 10 % early PD confined to the dorsal striatum, a dorsal > ventral gradient of every PD loss, a multi-site
  acquisition mix (FWHM 9-18 mm, 12-60 counts per voxel) and the between-subject height (z SD 4 mm) and pitch
  (SD 5 deg) of imperfectly normalised clinical scans. The lowest-putamen threshold sits at ~0.88-0.92 accuracy.
  600 subjects at 70 % PD, split 60/20/20 by subject (360 / 120 / 120 scans), plus 880 test-only subjects: a
  1,000-scan test split.
* ``av133_external``: AV133-like VMAT2 PET (the ``av133`` modality) with the benchmark's PD severity mix,
  balanced classes, 500 subjects, every scan in the ``test`` split (an external test set for models trained on
  ``benchmark``).
* ``spect_other_site``: SPECT from a lower-resolution, lower-count site (FWHM 16-20 mm, 10-30 counts) with the
  benchmark's population, balanced, 500 subjects, every scan in the ``test`` split.

The same seed gives the same latent subjects whatever the preset or modality (presets only change how the
latents' uniform draws are mapped), so external sets must be generated with another seed than the set they test:
:data:`STUDY_SETS` and :func:`study_seed` derive distinct seeds for
:func:`scripts.synthetic.phantom.make_study_data`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["Preset", "PRESETS", "get_preset", "STUDY_SETS", "study_seed"]


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Preset:
    """A named set of generator overrides and data-set design defaults.

    Args:
        name: registry key.
        description: one line, shown by ``python -m scripts.synthetic --help``.
        modality: the modality used when none is given.
        overrides: :class:`~scripts.synthetic.phantom.PhantomConfig` fields applied for every modality.
        modality_overrides: ``{modality: {field: value}}`` applied on top of ``overrides`` for that modality only.
        pd_fraction: default fraction of PD subjects.
        split: default (training, validation, test) fractions of subjects.
        max_visits: default maximum number of scans per subject.
        n_subjects: recommended (default) number of subjects.
        extra_test_subjects: subjects added to the test split only (same population), so that the test split can
            be sized for the claims without changing the training and validation splits.
    """

    name: str
    description: str
    modality: str = "spect"
    overrides: Mapping[str, object] = field(default_factory=dict)
    modality_overrides: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    pd_fraction: float = 0.8
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    max_visits: int = 1
    n_subjects: int = 300
    extra_test_subjects: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", _frozen(self.overrides))
        object.__setattr__(
            self, "modality_overrides", _frozen({k: _frozen(v) for k, v in self.modality_overrides.items()})
        )

    def config_overrides(self, modality: str | None = None) -> dict[str, object]:
        """The :class:`~scripts.synthetic.phantom.PhantomConfig` overrides of this preset for ``modality``."""
        modality = self.modality if modality is None else modality
        return {**self.overrides, **self.modality_overrides.get(modality, {})}


#: PD severity mix of the benchmark population (all modalities). The default preset has 7 % mild PD with a
#: posterior loss of 20-50 % and no unilateral subtype.
BENCHMARK_POPULATION: Mapping[str, object] = _frozen(
    {
        "mild_fraction": 0.06,
        "mild_loss_range": (0.15, 0.5),
        "unilateral_fraction": 0.2,
        "unilateral_ipsilateral_range": (0.25, 0.55),
        # Physiology along z: dorsal > ventral loss in every PD subject, and early PD confined to the dorsal
        # striatum (docs/calibration.md, "Physiology along z").
        "dv_gradient_range": (0.1, 0.4),
        "dorsal_only_fraction": 0.1,
        "dorsal_only_loss_range": (0.4, 0.8),
        "dorsal_only_boundary_range": (0.45, 0.6),
    }
)
#: Multi-site SPECT acquisition of the benchmark: PSF and counts of several cameras, slightly larger residual pose.
BENCHMARK_SPECT_SITES: Mapping[str, object] = _frozen(
    {
        "fwhm_range_mm": (9.0, 18.0),
        "counts_range": (12.0, 60.0),
        "translation_sd_mm": 1.25,
        "translation_clip_mm": 4.0,
        "rotation_sd_deg": 2.25,
        "rotation_clip_deg": 7.0,
        # Between-subject height and pitch of imperfectly normalised clinical scans: z SD 4 mm (clip 10), pitch SD
        # 5 deg (clip 12), so that fixed template slices cut the striatum at different heights.
        "z_translation_sd_mm": 4.0,
        "z_translation_clip_mm": 10.0,
        "pitch_sd_deg": 5.0,
        "pitch_clip_deg": 12.0,
    }
)
#: A lower-resolution, lower-count SPECT site (Wenzel et al. 2019 emulated such a site with an 18 mm Gaussian).
OTHER_SITE_SPECT: Mapping[str, object] = _frozen(
    {**BENCHMARK_SPECT_SITES, "fwhm_range_mm": (16.0, 20.0), "counts_range": (10.0, 30.0)}
)

#: The preset registry, keyed by name.
PRESETS: Mapping[str, Preset] = _frozen(
    {
        p.name: p
        for p in (
            Preset(
                name="default",
                description="calibrated PPMI-like DaTscan phantoms (80 % PD, FWHM 10-14 mm); threshold ~0.96",
                pd_fraction=0.8,
                n_subjects=300,
            ),
            Preset(
                name="benchmark",
                description="SPECT benchmark: z physiology, 6 % mild + 10 % dorsal + 20 % unilateral PD, FWHM 9-18 mm",
                overrides=BENCHMARK_POPULATION,
                modality_overrides={"spect": BENCHMARK_SPECT_SITES},
                pd_fraction=0.7,
                n_subjects=600,
                extra_test_subjects=880,
            ),
            Preset(
                name="av133_external",
                description="AV133-like PET, benchmark population, balanced, all scans in the test split",
                modality="av133",
                overrides=BENCHMARK_POPULATION,
                pd_fraction=0.5,
                split=(0.0, 0.0, 1.0),
                n_subjects=500,
            ),
            Preset(
                name="spect_other_site",
                description="SPECT from another site (FWHM 16-20 mm, 10-30 counts), balanced, all scans in test",
                overrides=BENCHMARK_POPULATION,
                modality_overrides={"spect": OTHER_SITE_SPECT},
                pd_fraction=0.5,
                split=(0.0, 0.0, 1.0),
                n_subjects=500,
            ),
        )
    }
)


def get_preset(name: str | Preset) -> Preset:
    """The :class:`Preset` called ``name`` (a :class:`Preset` is returned unchanged).

    Raises:
        ValueError: for an unknown name, listing the valid presets (and the closest match, if any).
    """
    if isinstance(name, Preset):
        return name
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unsupported preset {name!r}, available presets are {list(PRESETS)}.{hint}")


#: The sets of a study folder: ``{set name: (preset, seed offset)}``. Each set uses ``seed + offset``, so the
#: external sets hold other subjects than the benchmark (whose seed is the study seed itself).
STUDY_SETS: Mapping[str, tuple[str, int]] = _frozen(
    {
        "benchmark": ("benchmark", 0),
        "av133": ("av133_external", 1_000_000),
        "spect_other_site": ("spect_other_site", 2_000_000),
    }
)


def study_seed(seed: int, set_name: str) -> int:
    """The seed of ``set_name`` (a key of :data:`STUDY_SETS`) in the study with master seed ``seed``."""
    if set_name not in STUDY_SETS:
        raise ValueError(f"Unsupported study set {set_name!r}, available sets are {list(STUDY_SETS)}.")
    return int(seed) + STUDY_SETS[set_name][1]
