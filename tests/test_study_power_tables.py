# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""One command fills the README's and the model card's results tables from the results file; they equal the
report's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scripts.metrics import classification_report
from scripts.study import report
from scripts.study.matrix import Cell


def _record(cell: Cell, quality: float, rng: np.random.Generator, labels: np.ndarray) -> dict:
    scores = np.clip(labels * quality + rng.normal(0.5 - quality / 2, 0.25, labels.size), 0, 1)
    files = [f"sub-{i:04d}.nii.gz" for i in range(labels.size)]
    key = "benchmark/test"
    metrics = {key: {"validation": classification_report(labels.tolist(), scores.tolist(), 0.5)}}
    return {
        "cell": cell.name,
        "axes": cell.as_dict(),
        "metrics": metrics,
        "thresholds": {"default": 0.5, "validation": 0.5},
        "predictions": {key: {"files": files, "labels": labels.tolist(), "scores": scores.tolist()}},
        "seconds": {"wall": 1.0, "train": 0.5},
        "cpu_seconds": 1.0,
        "hardware": {"cpu": "test", "cpu_count": 2, "torch_threads": 1},
    }


@pytest.fixture()
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(60, int), np.ones(140, int)]
    cells = [(Cell("teacher"), 0.6)]
    for s in range(4):
        cells += [(Cell("student", s, "single_slice", True, "fg+lg", 0.0556, 1.0), 0.45)]
        cells += [(Cell("student", s, "single_slice", False, fraction=0.0556), 0.4)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(_record(c, q, rng, labels)) + "\n" for c, q in cells))
    settings = {"datasets": {"benchmark": str(tmp_path / "datalist.json")}, "n_teachers": 1, "shared": {}}
    settings.update(teacher={"max_epochs": 1, "patience": 1}, student={"max_epochs": 1, "patience": 1})
    study = {"settings": settings, "invocations": [{"command": "python -m scripts.study run --matrix lowdata"}]}
    (run / "study.json").write_text(json.dumps(study))
    return run


def test_generated_tables_equal_the_report(run_dir, tmp_path):
    block = f"intro\n{report.TABLE_START}\nstale table\n{report.TABLE_END}\noutro\n"
    readme, card = tmp_path / "README.md", tmp_path / "card.md"
    readme.write_text("# Bundle\n" + block)
    card.write_text("# Model card\n" + block)
    # Without --tables the report leaves every other file alone.
    assert report.main([str(run_dir), "--no-figures"]) == 0
    assert "stale table" in readme.read_text() and "stale table" in card.read_text()
    assert (run_dir / "report.md").is_file()
    preface = tmp_path / "preface.md"
    preface.write_text("> What this page is.\n")
    argv = [str(run_dir), "--no-figures", "--title", "Results: low data", "--preface", str(preface)]
    assert report.main([*argv, "--tables", str(readme), str(card)]) == 0
    written = (run_dir / "report.md").read_text()
    assert written.startswith("# Results: low data\n\n> What this page is.\n")
    assert "## Gallery" not in written  # no figures, no empty gallery section
    tables = report.summary_tables(report.StudyResults.load(run_dir))
    for path in (readme, card):
        text = path.read_text()
        assert "stale table" not in text and text.endswith(f"{report.TABLE_END}\noutro\n")
        inner = text.split(report.TABLE_START + "\n", 1)[1].split("\n" + report.TABLE_END, 1)[0]
        assert inner == tables
    assert "| 2D single slice, with KD (teacher on 100 %) | 5.6 % | 4 |" in tables
    assert "single slice, 5.6 %, teacher on 100 %" in tables and "MDE" in tables
    # The report carries the very same tables.
    out = tmp_path / "results.md"
    report.write_report(run_dir, out, tmp_path / "figures", figures=False)
    assert tables in out.read_text()
    # A file without the block is refused before anything is written.
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no .* block"):
        report.write_tables(report.StudyResults.load(run_dir), [readme, bare])
    assert bare.read_text() == "no markers\n"
    # ... and through the command, before the report itself is written (no half-done run).
    before = (run_dir / "report.md").read_text()
    with pytest.raises(SystemExit, match="bare.md has no .* block"):
        report.main([str(run_dir), "--no-figures", "--title", "Another title", "--tables", str(readme), str(bare)])
    assert (run_dir / "report.md").read_text() == before


def test_the_low_data_claim_is_measured_on_the_low_data_projection_beside_a_full_data_pair_of_another(run_dir):
    """Claim (5) with full-data pairs of the default projection only and a low-data sweep of ``single_slice``: the
    single-slice KD − no-KD at the smallest fraction is measured, not reported as missing."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(60, int), np.ones(140, int)]
    extra = []
    for s in range(4):
        extra += [
            Cell("student", s, "joint_fusion_slices", True, "fg+lg", 1.0, 1.0),
            Cell("student", s, "joint_fusion_slices"),
        ]
    with (run_dir / "results.jsonl").open("a") as f:
        f.write("".join(json.dumps(_record(c, 0.5, rng, labels)) + "\n" for c in extra))
    table, verdicts = report._claims(report._Builder(report.StudyResults.load(run_dir)))
    row = next(line for line in table.splitlines() if line.startswith("| (5)"))
    assert "single slice at 0.0556 of the training subjects (full-data teacher): KD − no-KD ROC AUC" in row
    assert verdicts[5] in ("supported", "not shown", "contradicted")
