# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""One parser for every switch and typed setting the configs read: ``"false"`` is ``False`` everywhere, through
the command line and in the components that take a switch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser
from scripts.checkpoints import save_checkpoint
from scripts.networks import Student2D
from scripts.options import OPTIONS, OptionError, _defined_ids, check_options, check_value, inferred_options
from test_reliability_cli import SETTINGS, _assert_one_line, _env

COMPUTED = {"is_rank0", "is_not_rank0", "persistent_cache_dir"}
"""Ids read in a condition that are no switches: computed flags (never set by a user), a path (empty for none)."""


def _switches_read() -> set[str]:
    """Every id that a config reads as a switch: ``_disabled_`` values, ``not/and/or/if @id`` in expressions,
    and ids whose values in the configs are literal booleans."""
    found: set[str] = set()
    for path in sorted((BUNDLE_ROOT / "configs").glob("*.json")):
        text = path.read_text(encoding="utf-8")
        found |= set(re.findall(r"\b(?:not|and|or|if)\s+@(\w+)(?![\w#])", text))  # @id, not @id#sub
        found |= set(re.findall(r'"_disabled_":\s*"@(\w+)"', text))
    for key, values in _defined_ids().items():
        if any(isinstance(v, bool) for v in values):
            found.add(key)
    return found - COMPUTED


def test_every_switch_the_configs_read_is_parsed_as_a_switch():
    known = {**inferred_options(), **OPTIONS}
    switches = _switches_read()
    assert {"report", "stacked_cache", "kd_enabled", "save_projection_png"} <= switches
    missing = sorted(s for s in switches if s not in known or known[s].kind != "bool")
    assert not missing, f"switches without a boolean option: {missing}"
    for name in switches:
        assert check_value(name, "false", known[name]) is False and check_value(name, "TRUE", known[name]) is True
        with pytest.raises(OptionError, match=f"--{name} expects true or false"):
            check_value(name, "no", known[name])


def test_every_literal_number_the_configs_define_is_checked():
    known = {**inferred_options(), **OPTIONS}
    for key, values in _defined_ids().items():
        if key in ("_meta_",) or "#" in key:
            continue
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            assert key in known and known[key].kind in ("int", "float"), key


def test_false_turns_the_stacked_cache_off(tmp_path):
    from scripts.fast_data import CacheBatchLoader, PlainTensorBatch

    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE_ROOT / "configs" / "train_teacher.json"), str(BUNDLE_ROOT / "configs" / "distill.json")]
    )
    parser.update({"stacked_cache": "false", "bundle_root": str(tmp_path), "amp": "False"})
    check_options(parser)
    assert parser.get_parsed_content("stacked_cache") is False and parser.get_parsed_content("amp") is False
    # the components that take a switch read the string the same way
    from monai.data import CacheDataset

    dataset = CacheDataset([{"image": torch.zeros(1, 4, 4, 4)}], transform=None, progress=False)
    assert CacheBatchLoader(dataset, stack="false").stacked is None
    assert CacheBatchLoader(dataset, stack="true").stacked is not None
    assert PlainTensorBatch(enabled="false").enabled is False
    with pytest.raises(OptionError):
        CacheBatchLoader(dataset, stack="nope")


def test_too_few_synthetic_subjects_for_the_generator_is_refused():
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train_teacher.json"))
    parser.update({"synthetic_subjects": 3})
    with pytest.raises(
        OptionError, match=r"--synthetic_subjects expects an integer >= 18 for --synthetic_preset default"
    ):
        check_options(parser)
    parser.update({"synthetic_subjects": 18})
    check_options(parser)
    parser.update({"synthetic_subjects": 3, "synthetic_data": "false"})  # nothing is generated: no minimum
    check_options(parser)


@pytest.fixture(scope="module")
def student_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    save_checkpoint(Student2D(), root / "models" / "model.pt", SETTINGS, kind="student")
    return root


def _infer(root, scans, *args):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root",
           str(root), "--input", str(scans), "--progress_bar", "false", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_report_false_writes_no_report_and_device_cuda_without_cuda_is_one_line(
    tmp_path, student_root, tiny_phantom_dataset
):
    scans = tmp_path / "scans"
    scans.mkdir()
    for path in sorted((tiny_phantom_dataset.parent / "images").glob("*.nii.gz"))[:2]:
        shutil.copy(path, scans / path.name)
    result = _infer(student_root, scans, "--run_name", "noreport", "--report", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    run = student_root / "eval" / "noreport"
    assert (run / "predictions.csv").is_file() and not (run / "report").exists()
    assert json.loads((run / "predictions.json").read_text(encoding="utf-8"))["scored"] == 2
    if not torch.cuda.is_available():
        result = _infer(student_root, scans, "--run_name", "cuda", "--device", "cuda")
        _assert_one_line(result, "error: option --device cuda: CUDA is not available on this machine", "--device cpu")
