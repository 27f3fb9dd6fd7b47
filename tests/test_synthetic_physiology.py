# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Physiology along z in the benchmark preset: dorsal-ventral loss, dorsal-only early PD, z translation and pitch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scripts.anatomy import template_rois
from scripts.projections import template_centre, template_grid_affine
from scripts.synthetic import phantom

GRID = (64, 64, 64)


def _subject(config: phantom.PhantomConfig, label: int = 1, **latents) -> phantom.PhantomSubject:
    """A hand-made subject: seed 3's latents with ``latents`` replaced, one visit at the template pose."""
    base = phantom.sample_subject(np.random.default_rng(3), label, config)
    visit = dataclasses.replace(
        base.visits[0], translation_mm=(0.0, 0.0, 0.0), rotation_deg=(0.0, 0.0, 0.0), scale=1.0, fwhm_mm=10.0
    )
    lat = dataclasses.replace(base.latents, label=label, **latents)
    return dataclasses.replace(base, latents=lat, visits=(visit,))


def _template_z(index: int) -> float:
    """Template height (mm) of axial slice ``index`` of the bundle's 64³ grid."""
    return float((template_grid_affine(GRID) @ np.array([0.0, 0.0, index, 1.0]))[2])


def _axial_index(z_mm: float) -> int:
    aff = template_grid_affine(GRID)
    return int(round((z_mm - aff[2, 3]) / aff[2, 2]))


def test_dorsal_only_loss_is_invisible_below_it_and_visible_in_the_volume():
    cfg = phantom.preset_config("benchmark")
    aff = template_grid_affine(GRID)
    # Early PD confined to the dorsal putamen (above h = 0.6) and its healthy twin (same latents, no loss).
    pd = _subject(cfg, is_dorsal_only=True, dorsal_boundary=0.6, posterior_loss=0.8, is_mild=False, is_unilateral=False)
    hc = _subject(cfg, label=0)
    hc = dataclasses.replace(hc, latents=dataclasses.replace(pd.latents, label=0))
    act_pd, act_hc = (phantom.activity_map(s, 0, GRID, aff) for s in (pd, hc))
    striatum = template_rois(GRID, aff)["striatum"]
    # A slice 12 mm below the template centre slice: the putamen there is ventral, untouched by the loss.
    low = _axial_index(_template_z(template_centre(GRID, "axial")) - 12.0)
    assert striatum[:, :, low].any()
    assert np.allclose(act_pd[:, :, low], act_hc[:, :, low], atol=1e-6)
    # The whole striatum lost binding, visibly: more than 5 % of its specific binding.
    specific_pd, specific_hc = (float((a[striatum] - 1.0).sum()) for a in (act_pd, act_hc))
    assert specific_pd < 0.95 * specific_hc
    # Also after the PSF (noise-free rendering): the low slice differs far less than the volume.
    vol_pd, vol_hc = (phantom.render_volume(s, 0, GRID, aff, noise=False) for s in (pd, hc))
    slice_change = 1 - vol_pd[:, :, low][striatum[:, :, low]].mean() / vol_hc[:, :, low][striatum[:, :, low]].mean()
    top = _axial_index(12.0)
    top_change = 1 - vol_pd[:, :, top][striatum[:, :, top]].mean() / vol_hc[:, :, top][striatum[:, :, top]].mean()
    assert top_change > 0.1 and slice_change < top_change / 3, (slice_change, top_change)
    # The true binding of the putamen ROIs reports the loss.
    tb, tb_hc = phantom.true_binding(pd), phantom.true_binding(hc)
    side = pd.latents.affected_side
    assert tb[f"putamen_post_{side}"] < 0.9 * tb_hc[f"putamen_post_{side}"]


def test_dorsal_ventral_gradient_takes_more_from_the_dorsal_striatum():
    cfg = phantom.preset_config("benchmark")
    aff = template_grid_affine(GRID)
    pd = _subject(cfg, dv_gradient=0.4, is_dorsal_only=False, is_mild=False, posterior_loss=0.5)
    flat = dataclasses.replace(pd, latents=dataclasses.replace(pd.latents, dv_gradient=0.0))
    act, act_flat = (phantom.activity_map(s, 0, GRID, aff) for s in (pd, flat))
    put = template_rois(GRID, aff)[f"putamen_{pd.latents.affected_side}"]
    hi, lo = _axial_index(8.0), _axial_index(-8.0)
    # Dorsal slice: less binding than without the gradient; ventral slice: more.
    assert act[:, :, hi][put[:, :, hi]].mean() < act_flat[:, :, hi][put[:, :, hi]].mean() - 0.05
    assert act[:, :, lo][put[:, :, lo]].mean() > act_flat[:, :, lo][put[:, :, lo]].mean() + 0.05
    # Healthy controls never carry a loss, whatever their (drawn but unused) gradient.
    hc = dataclasses.replace(pd, latents=dataclasses.replace(pd.latents, label=0))
    assert phantom.true_binding(hc)["putamen_L"] > phantom.true_binding(flat)["putamen_L"]


def test_z_translation_and_pitch_move_what_the_template_slice_cuts():
    cfg = phantom.preset_config("benchmark")
    assert cfg.z_translation_sd_mm > cfg.translation_sd_mm and cfg.pitch_sd_deg > cfg.rotation_sd_deg
    aff = template_grid_affine(GRID)
    hc = _subject(cfg, label=0)
    centre = template_centre(GRID, "axial")

    def slice_uptake(translation=(0.0, 0.0, 0.0), rotation=(0.0, 0.0, 0.0)) -> np.ndarray:
        visit = dataclasses.replace(hc.visits[0], translation_mm=translation, rotation_deg=rotation)
        act = phantom.activity_map(dataclasses.replace(hc, visits=(visit,)), 0, GRID, aff)
        return (act[:, :, centre] - 1.0).clip(min=0)

    base = slice_uptake()
    # Shifted up 8 mm, the fixed slice holds another cut of the striatum; pitched 10 degrees about the anterior
    # commissure (near the striatum), its ends move by ~3 mm.
    assert np.abs(slice_uptake(translation=(0.0, 0.0, 8.0)) - base).sum() > 0.25 * base.sum()
    assert np.abs(slice_uptake(rotation=(10.0, 0.0, 0.0)) - base).sum() > 0.05 * base.sum()
    # The drawn population: z and pitch spread several mm / degrees, the other axes stay small.
    subjects = phantom.sample_population(400, seed=1, preset="benchmark")
    t = np.array([s.visits[0].translation_mm for s in subjects])
    r = np.array([s.visits[0].rotation_deg for s in subjects])
    assert 3.2 < t[:, 2].std() < 4.6 and t[:, 0].std() < 1.6 and np.abs(t[:, 2]).max() <= 10.0
    assert 4.0 < r[:, 0].std() < 5.8 and r[:, 1].std() < 2.8 and np.abs(r[:, 0]).max() <= 12.0


def test_dorsal_only_share_and_other_presets_keep_their_streams():
    cfg = phantom.preset_config("benchmark")
    subjects = phantom.sample_population(4000, seed=5, preset="benchmark", pd_fraction=1.0)
    dorsal = [s.latents for s in subjects if s.latents.is_dorsal_only]
    assert abs(len(dorsal) / 4000 - cfg.dorsal_only_fraction) < 0.015
    assert all(not (d.is_mild or d.is_unilateral) and d.dv_gradient == 0 for d in dorsal)
    lo, hi = cfg.dorsal_only_loss_range
    assert all(lo <= d.posterior_loss <= hi for d in dorsal)
    # The default preset draws no dorsal-ventral latents: its subjects are unchanged.
    default = phantom.sample_population(50, seed=5)
    assert all(s.latents.dv_gradient == 0 and not s.latents.is_dorsal_only for s in default)
    with pytest.raises(ValueError, match="dorsal_only_fraction"):
        phantom.default_config(mild_fraction=0.5, unilateral_fraction=0.3, dorsal_only_fraction=0.3)
