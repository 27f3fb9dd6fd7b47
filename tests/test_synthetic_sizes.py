# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Test sets sized for the claims: a 1,000-scan benchmark test split, 500-scan external sets, options honoured."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scripts.synthetic import cli, phantom
from scripts.synthetic.presets import get_preset


def test_study_sets_are_sized_for_the_claims():
    sizes = phantom._study_sizes(None)
    n, extra = sizes["benchmark"]
    p = get_preset("benchmark")
    labels, split_of, visits = phantom._dataset_design(n, 0, p.pd_fraction, p.max_visits, p.split, extra)
    scans = np.asarray(visits)
    assert [int(scans[split_of == s].sum()) for s in range(3)] == [360, 120, 1000]
    assert 0.65 < labels[split_of == 2].mean() < 0.75  # the same population: 70 % PD
    assert sizes["av133"] == (500, 0) and sizes["spect_other_site"] == (500, 0)
    # Without the extra subjects the first ones and their split are unchanged.
    base_labels, base_split, _ = phantom._dataset_design(n, 0, p.pd_fraction, p.max_visits, p.split)
    assert np.array_equal(labels[:n], base_labels) and np.array_equal(split_of[:n], base_split)
    # A set sized explicitly (e.g. the demo's) has no extra test subjects.
    assert phantom._study_sizes({"benchmark": 200})["benchmark"] == (200, 0)


def test_extra_test_subjects_option_is_honoured(tmp_path, capsys):
    common = dict(seed=2, preset="benchmark", workers=1, pd_fraction=0.5)
    base = json.loads(phantom.generate_dataset(tmp_path / "a", 10, extra_test_subjects=0, **common).read_text())
    more = json.loads(phantom.generate_dataset(tmp_path / "b", 10, extra_test_subjects=4, **common).read_text())
    assert more["metadata"]["extra_test_subjects"] == 4 and more["metadata"]["n_scans"] == 14
    for split in ("training", "validation"):
        assert [e["subject"] for e in more[split]] == [e["subject"] for e in base[split]]
    assert len(more["test"]) == len(base["test"]) + 4
    assert sum(e["label"] for e in more["test"]) == sum(e["label"] for e in base["test"]) + 2
    assert (
        cli.main(
            ["--out", str(tmp_path / "c"), "--preset", "benchmark", "--n-subjects", "10"]
            + ["--pd-fraction", "0.5", "--seed", "2", "--extra-test-subjects", "2"]
        )
        == 0
    )
    assert "test 4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="extra_test_subjects"):
        phantom.generate_dataset(tmp_path / "d", 10, extra_test_subjects=-1, **common)
    with pytest.raises(SystemExit):
        cli.main(["--study-data", str(tmp_path / "e"), "--extra-test-subjects", "3"])
