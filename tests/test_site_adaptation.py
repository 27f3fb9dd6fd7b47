# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Label-free site adaptation: prior estimation, mixture threshold, AdaBN, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scripts.errors import InputError
from scripts.site_adaptation import (
    SiteAdaptationRefusedError,
    SourceScores,
    adapt_batchnorm,
    adapt_scores,
    bbse_prior,
    em_prior,
    fit_mixture,
    parse_methods,
)
from torch import nn


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _scores(rng, n_pd, n_hc, gap=2.5, sd=1.0, shift=0.0):
    """P(PD) of a model whose logits are N(+gap, sd) for PD and N(-gap, sd) for HC (plus a site shift)."""
    z = np.concatenate([rng.normal(gap, sd, n_pd), rng.normal(-gap, sd, n_hc)]) + shift
    y = np.r_[np.ones(n_pd, int), np.zeros(n_hc, int)]
    return _sigmoid(z), y


def _source(rng, n=400, prior=0.7):
    s, y = _scores(rng, int(n * prior), n - int(n * prior))
    return SourceScores.from_arrays(s, y)


@pytest.mark.parametrize("true_prior", [0.2, 0.5, 0.8])
def test_em_recovers_a_known_prior(true_prior):
    rng = np.random.default_rng(0)
    source = _source(rng)
    n = 2000
    site, _ = _scores(rng, int(n * true_prior), n - int(n * true_prior))
    out = em_prior(site, source)
    assert out["converged"]
    assert abs(out["pd_share"] - true_prior) < 0.03
    # the threshold it leads to calls about the true share PD and keeps both classes right
    adapted = adapt_scores("em", site, source)
    assert abs(adapted["called_pd"] - true_prior) < 0.04


def test_bbse_recovers_a_known_prior_and_refuses_a_weak_model():
    rng = np.random.default_rng(1)
    source = _source(rng)
    site, _ = _scores(rng, 300, 1700)
    assert abs(bbse_prior(site, source)["pd_share"] - 0.15) < 0.04
    weak = SourceScores.from_arrays(*_scores(rng, 200, 200, gap=0.2))
    with pytest.raises(SiteAdaptationRefusedError, match="nearly singular"):
        bbse_prior(site, weak)


def test_mixture_threshold_on_separable_scores():
    rng = np.random.default_rng(2)
    # a site whose scores moved down (every logit -2): the in-domain threshold 0.5 misses PD scans
    site, y = _scores(rng, 60, 140, shift=-2.0)
    out = fit_mixture(site)
    assert abs(out["pd_share"] - 0.3) < 0.06
    # the equal-weight crossing of two equal Gaussians is the midpoint of the means: logit -2
    assert abs(out["logit_threshold"] - (-2.0)) < 0.5
    called = site >= out["threshold"]
    assert called[y == 1].mean() >= 0.95 and (~called[y == 0]).mean() >= 0.95
    assert (site[y == 1] >= 0.5).mean() < 0.8  # the in-domain threshold does miss them


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: _sigmoid(rng.normal(0.0, 1.5, 200)),  # one group
        lambda rng: _scores(rng, 100, 100, gap=0.5)[0],  # two overlapping groups
        lambda rng: np.full(200, 0.7),  # constant
    ],
)
def test_mixture_refuses_non_separable_scores(make):
    with pytest.raises(SiteAdaptationRefusedError, match="mixture"):
        fit_mixture(make(np.random.default_rng(3)))


def test_every_method_refuses_a_small_site():
    rng = np.random.default_rng(4)
    source = _source(rng)
    site, _ = _scores(rng, 10, 10)
    for method in ("em", "bbse", "mixture"):
        with pytest.raises(SiteAdaptationRefusedError, match=f"{method}: the site has 20 scored scans"):
            adapt_scores(method, site, source, min_scans=40)
    assert adapt_scores("none", site, source)["threshold"] == source.threshold


def test_em_and_bbse_need_validation_scores():
    with pytest.raises(SiteAdaptationRefusedError, match="no validation scores"):
        adapt_scores("em", np.full(50, 0.5), None)


def test_parse_methods():
    assert parse_methods("none") == (False, "none")
    assert parse_methods("adabn+em") == (True, "em")
    assert parse_methods("Mixture") == (False, "mixture")
    assert parse_methods("adabn") == (True, "none")
    for bad in ("em+bbse", "foo", "", "adabn+adabn", "adabn+none"):
        with pytest.raises(InputError, match="not a method"):
            parse_methods(bad)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.bn1d = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn1d(self.fc(self.bn(self.conv(x)).mean(dim=(2, 3))))


def test_adabn_changes_only_batchnorm_buffers():
    torch.manual_seed(0)
    net = _Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = {k: v.clone() for k, v in net.named_parameters()}
    site = [torch.randn(8, 1, 10, 10) * 3 + 5 for _ in range(6)]
    assert adapt_batchnorm(net, site, min_scans=40) == 48
    assert not net.training and all(not m.training for m in net.modules())
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "bn1d.running_mean",
        "bn1d.running_var",
        "bn1d.num_batches_tracked",
    }
    # the statistics are the site's: the first BN's mean is the conv output's mean over all site inputs
    with torch.no_grad():
        feats = torch.cat([net.conv(x) for x in site])
    assert torch.allclose(net.bn.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-4)
    assert net.bn.momentum == 0.1


def test_adabn_refuses_too_few_scans_and_restores_statistics():
    net = _Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(SiteAdaptationRefusedError, match="adabn: 16 of the site's scans"):
        adapt_batchnorm(net, [torch.randn(8, 1, 10, 10) for _ in range(2)], min_scans=40)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("decollated", [True, False])
def test_checkpoint_records_validation_scores(tmp_path, decollated):
    from ignite.engine import Engine, Events
    from scripts.checkpoints import DescribedModel, checkpoint_metadata, save_checkpoint

    net = _Net()
    model = DescribedModel(net, {"projection": "x"})
    batches = [
        (torch.tensor([[0.2, 0.8], [0.9, 0.1]]), torch.tensor([1, 0])),
        (torch.tensor([[0.3, 0.7]]), torch.tensor([1])),
    ]

    def step(engine, batch):
        pred, label = batch
        if decollated:
            return [{"pred": p, "label": y} for p, y in zip(pred, label)]
        return {"pred": pred, "label": label[:, None]}

    validator = Engine(step)
    model.attach(validator)
    validator.state.key_metric_name = "val_f1_macro"
    validator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_f1_macro=0.9))
    validator.run(batches, max_epochs=2)  # the second epoch replaces the first one's scores
    path = save_checkpoint(net, tmp_path / "m.pt", {"projection": "x"})
    assert path.is_file()
    source_state = model.state_dict()
    info = checkpoint_metadata(source_state)
    assert info["validation"]["pd_scores"] == pytest.approx([0.8, 0.1, 0.7])
    assert info["validation"]["labels"] == [1, 0, 1]
    torch.save(source_state, tmp_path / "v.pt")
    source = SourceScores.from_checkpoint(tmp_path / "v.pt")
    assert source.labels.tolist() == [1, 0, 1] and 0.1 < source.threshold <= 0.7


# ----------------------------------------------------------------------------------------------------------------
# through the command line
# ----------------------------------------------------------------------------------------------------------------
CLI_SETTINGS = {
    "spatial_size": [32, 32, 32],
    "intensity": "minmax",
    "projection": "joint_fusion_slices",
    "view": "axial",
    "num_slices": 3,
    "gap": 0,
    "student_backbone": "resnet18",
    "num_classes": 2,
}


@pytest.fixture(scope="module")
def site_root(tmp_path_factory):
    """A bundle root whose models/model.pt is a student with recorded validation scores (a 32³ grid)."""
    from scripts.checkpoints import METADATA_KEY, save_checkpoint
    from scripts.networks import Student2D

    root = tmp_path_factory.mktemp("site_bundle")
    torch.manual_seed(0)
    path = save_checkpoint(Student2D(), root / "models" / "model.pt", CLI_SETTINGS, kind="student")
    state = torch.load(path, weights_only=True)
    rng = np.random.default_rng(0)
    scores, labels = _scores(rng, 28, 12)
    state._metadata[METADATA_KEY]["validation"] = {
        "metric": "val_f1_macro",
        "score": 0.9,
        "pd_scores": scores.round(6).tolist(),
        "labels": labels.tolist(),
    }
    torch.save(state, path)
    return root


def _bundle(root, *args):
    import os
    import subprocess
    import sys

    from scripts.study.cells import BUNDLE_ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(BUNDLE_ROOT))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--bundle_root", str(root), "--spatial_size", "[32,32,32]", *args]
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_site_adaptation_reaches_the_outputs(tiny_phantom_dataset, site_root):
    import csv
    import json

    images = tiny_phantom_dataset.parent / "images"
    result = _bundle(site_root, "--input", str(images), "--run_name", "em", "--site_adaptation", "adabn+em",
                     "--site_adaptation_min_scans", "10")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = site_root / "eval" / "em"
    out = json.loads((run / "site_adaptation.json").read_text())
    assert out["site_adaptation"] == "adabn+em" and out["refused"] is None
    assert out["adabn"]["applied"] and out["adabn"]["scans"] >= 10
    assert 0.0 <= out["pd_share"] <= 1.0 and 0.0 <= out["threshold"] <= 1.0
    with (run / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == out["n_scans"]
    # the decision at the estimated threshold (on the full-precision scores; the CSV rounds them to 6 decimals)
    assert sum(int(r["adapted_class"]) for r in rows) == round(out["called_pd"] * len(rows))
    for row in rows:
        assert row["adapted_label"] == ("PD" if row["adapted_class"] == "1" else "HC")
        if abs(float(row["pd_probability"]) - out["threshold"]) > 1e-6:
            assert row["adapted_class"] == str(int(float(row["pd_probability"]) >= out["threshold"]))


def test_cli_refusal_is_one_line_with_its_own_exit_status(tiny_phantom_dataset, site_root):
    import json

    from scripts.site_adaptation import EXIT_REFUSED

    images = tiny_phantom_dataset.parent / "images"
    result = _bundle(site_root, "--input", str(images), "--run_name", "small", "--site_adaptation", "mixture",
                     "--site_adaptation_min_scans", "1000")  # fmt: skip
    assert result.returncode == EXIT_REFUSED, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.strip() and "GHSA-873f-pvrv-4x83" not in x]
    assert len(lines) == 1 and lines[0].startswith("error: site adaptation refused: mixture: the site has"), lines
    run = site_root / "eval" / "small"
    assert json.loads((run / "site_adaptation.json").read_text())["refused"].startswith("mixture: the site has")
    assert (run / "predictions.csv").is_file()  # the unadapted predictions are kept

    bad = _bundle(site_root, "--input", str(images), "--run_name", "bad", "--site_adaptation", "magic")
    assert bad.returncode == 1 and "--site_adaptation 'magic' is not a method" in bad.stderr
    assert not (site_root / "eval" / "bad").exists()  # checked before anything is written


# ----------------------------------------------------------------------------------------------------------------
# the study's measurement
# ----------------------------------------------------------------------------------------------------------------
def test_share_subset_has_the_share_and_is_as_large_as_possible():
    from scripts.study.adaptation import share_subset

    labels = np.r_[np.ones(100, int), np.zeros(100, int)]
    for share, (n_pd, n_hc) in {0.2: (25, 100), 0.5: (100, 100), 0.8: (100, 25)}.items():
        idx = share_subset(labels, share)
        assert (labels[idx].sum(), (1 - labels[idx]).sum()) == (n_pd, n_hc)
        assert np.array_equal(idx, share_subset(labels, share))  # fixed


def _record(seed, with_adabn, adabn_shares=(0.2, 0.5, 0.8)):
    from scripts.study.adaptation import ADAPTED_KEY, share_subset
    from scripts.study.matrix import DEFAULT_PROJECTION, DEFAULT_VARIANT, Cell

    rng = np.random.default_rng(seed)
    val, yv = _scores(rng, 84, 36)
    ext, ye = _scores(rng, 100, 100)
    ext_shifted = _sigmoid(np.log(ext / (1 - ext)) - 2.5)  # the site's scores moved down: PD scans missed
    files = [f"s{i:03d}.nii.gz" for i in range(200)]
    record = {
        "cell": f"kd-s{seed}",
        "axes": Cell("student", seed, DEFAULT_PROJECTION, True, DEFAULT_VARIANT, 1.0, 1.0).as_dict(),
        "predictions": {
            "bench/validation": {"files": [f"v{i}" for i in range(120)], "labels": yv.tolist(), "scores": val.tolist()},
            "ext/test": {"files": files, "labels": ye.tolist(), "scores": ext_shifted.tolist()},
        },
    }
    if with_adabn:  # AdaBN undid the shift
        adapted = {}
        for share in adabn_shares:
            idx = share_subset(ye, share)
            adapted[f"ext@{share:g}"] = {
                "files": [files[i] for i in idx],
                "labels": ye[idx].tolist(),
                "scores": ext[idx].tolist(),
            }
        record[ADAPTED_KEY] = adapted
    return record


def test_study_measurement_pairs_methods_and_recommends_one():
    from types import SimpleNamespace

    from scripts.study.adaptation import adaptation_results, adaptation_section, section_for_study

    records = [_record(0, True), _record(1, True)]
    results = adaptation_results(records, "bench", ["ext"], n_draws=8)
    model = "2D joint fusion slices, with KD"
    table = results["models"][model]
    assert sorted(table) == ["ext@0.2", "ext@0.5", "ext@0.8"] and results["seeds"][model] == 2
    for rows in table.values():
        assert rows["none"]["sens"] < 0.8  # the in-domain threshold misses the shifted PD scans
        assert rows["mixture"]["sens"] > rows["none"]["sens"] + 0.1
        assert rows["mixture"]["d_sens_ci"][0] > 0
        assert rows["adabn"]["sens"] >= 0.9 and rows["adabn"]["spec"] >= 0.9
        assert rows["none"]["d_sens"] == 0 and rows["none"]["refused"] == 0
    section = adaptation_section(results)
    assert "## Site adaptation without labels" in section and "**ext, true PD share 0.2**" in section
    assert "**Recommended method: `" in section
    assert f"### {model} (2 seeds)" in section
    res = SimpleNamespace(externals=["ext"], records={r["cell"]: r for r in records})
    assert section_for_study(res).startswith("## Site adaptation without labels")
    # without AdaBN scores only the score methods are measured
    assert "| *labelled best* |" in section and "**Ceiling.** With each draw's labels" in section
    plain = adaptation_results([_record(0, False)], "bench", ["ext"], n_draws=4)
    assert set(plain["models"][model]["ext@0.5"]) == {"none", "em", "bbse", "mixture", "labelled best"}
    assert "AdaBN was not measured" not in adaptation_section(plain)
    assert f"### {model} (1 seed)" in adaptation_section(plain)


def test_maximin_point_is_the_best_balanced_threshold_chosen_with_the_labels():
    from scripts.study.operating import maximin_point

    threshold, sens, spec = maximin_point([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    assert (sens, spec) == (1.0, 1.0) and 0.3 < threshold < 0.6
    # one PD scan among the HC scores: 4/5 PD and 4/5 HC is the best balance any threshold gives
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.4, 0.7, 0.25, 0.6, 0.8, 0.85, 0.9]
    threshold, sens, spec = maximin_point(labels, scores)
    assert (sens, spec) == (0.8, 0.8) and 0.4 < threshold < 0.7
    with pytest.raises(ValueError, match="both PD and HC"):
        maximin_point([1, 1], [0.2, 0.9])


def test_no_plain_method_beats_the_labelled_ceiling_on_any_draw():
    from scripts.study.adaptation import CEILING, METHODS, evaluate_record

    per_draw = evaluate_record(_record(3, True), "bench", ["ext"], n_draws=6)
    for rows in per_draw.values():
        ceiling = np.minimum(rows[CEILING]["sens"], rows[CEILING]["spec"])
        assert rows[CEILING]["pd_share"] == [None] * 6 and not any(rows[CEILING]["refused"])
        for method in (m for m in METHODS if not m.startswith("adabn")):  # the ceiling reads the unadapted scores
            assert np.all(np.minimum(rows[method]["sens"], rows[method]["spec"]) <= ceiling + 1e-12), method


def test_site_size_sweep_measures_mixture_on_smaller_and_larger_sites():
    from scripts.study.adaptation import site_size_section, site_size_sweep

    records = [_record(0, False), _record(1, False)]
    sweep = site_size_sweep(records, "bench", ["ext"], sizes=[10, 40, 126], n_draws=5)
    assert sorted(sweep) == ["ext@0.2", "ext@0.5", "ext@0.8"]
    for key, row in sweep.items():
        # 126 scans exceed every share's subset (125 or 200 scans, but at 0.5 only 100 of each class: 63 + 63 fit)
        assert sorted(row) == ([10, 40, 126] if key == "ext@0.5" else [10, 40]), (key, row)
        for cell in row.values():
            assert cell["draws"] == 2 * 5 and 0 <= cell["refused"] <= 1 and 0 <= cell["p10"] <= 1
    # the separated shifted scores: at 40 scans the mixture fits and finds the PD scans the in-domain threshold misses
    assert sweep["ext@0.5"][40]["refused"] == 0 and sweep["ext@0.5"][40]["p10"] > 0.8
    section = site_size_section(sweep)
    assert "| ext, 0.5 PD |" in section and "N = 126" in section and "| ext, 0.2 PD | " in section
    assert site_size_sweep(records, "bench", ["ext"], sizes=[40], model="3D teacher") == {}  # no teacher records


def test_adabn_at_some_shares_is_reported_there_and_left_out_of_the_recommendation():
    """A study that measures AdaBN at one site share (the demo's ``adabn_shares``) shows its rows there, says
    where it is missing, and recommends among the methods measured at every share."""
    from scripts.study.adaptation import adaptation_results, adaptation_section, recommend

    results = adaptation_results([_record(0, True, adabn_shares=(0.5,))], "bench", ["ext"], n_draws=4)
    table = results["models"]["2D joint fusion slices, with KD"]
    assert "adabn+mixture" in table["ext@0.5"] and "adabn" not in table["ext@0.2"] and "adabn" not in table["ext@0.8"]
    assert not recommend(results, "2D joint fusion slices, with KD")[0].startswith("adabn")
    assert "AdaBN was not measured at PD share 0.2, 0.8" in adaptation_section(results)


@pytest.mark.parametrize(
    ("datasets", "shares", "measured"),
    [
        ({"bench": "b.json", "ext": "e.json"}, None, True),
        ({"bench": "b.json", "ext": "e.json"}, [0.5], True),
        ({"bench": "b.json", "ext": "e.json"}, [], False),  # the demo: AdaBN left out
        ({"bench": "b.json"}, None, False),  # no external set to adapt to
    ],
)
def test_add_adabn_rescores_only_what_the_study_measures(tmp_path, monkeypatch, datasets, shares, measured):
    """``python -m scripts.study.adaptation RUN_DIR`` re-scores a finished cell only when its study measures
    AdaBN (external sets and at least one site share), as the cell itself does; otherwise results.jsonl is left
    as it was."""
    import json

    import scripts.study.adaptation as adaptation
    from scripts.study.cells import StudyContext
    from scripts.study.matrix import build_cells, preset

    settings = {"datasets": datasets, "shared": {}, "teacher": {}, "student": {}, "n_teachers": 1, "prevalence": {}}
    (tmp_path / "study.json").write_text(json.dumps({"settings": settings, "matrix": {"adabn_shares": shares}}))
    teacher = next(c for c in build_cells(preset("demo")) if c.kind == "teacher")
    (tmp_path / "cells" / teacher.name).mkdir(parents=True)  # a finished cell's folder
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"cell": teacher.name, "axes": teacher.as_dict(), "checkpoint": "t.pt"}) + "\n")
    before = results.read_text()
    calls = []

    def scored(ctx: StudyContext, cell, checkpoint):
        calls.append((tuple(adaptation.adabn_shares(ctx)), cell.name))
        return {"ext@0.5": {"files": [], "labels": [], "scores": []}}

    monkeypatch.setattr(adaptation, "adabn_predictions", scored)
    assert adaptation.add_adabn(tmp_path) == int(measured)
    assert (results.read_text() != before) == measured and len(calls) == int(measured)
