# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Bounded fuzzing: randomly corrupted volumes, headers and datalists through the input checks and batch inference.

Every case must end in a result or a clear error (an ``InputError`` naming the file; an error row in the
predictions), never a crash, a hang or a silent score of garbage. Counts are fixed and every case is drawn from a
seeded generator, so a failure is reproducible; the inference run is a subprocess with a time limit.
"""

from __future__ import annotations

import copy
import csv
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from conftest import BUNDLE_ROOT, MNI_AFFINE
from scripts.checkpoints import save_checkpoint
from scripts.data import SPLITS, DatalistError, load_datalist
from scripts.errors import InputError
from scripts.networks import Student2D
from scripts.transforms import LoadScand

SEED = 20240601
MUST_FAIL, MUST_SCORE, EITHER = "fail", "score", "either"


def _save(path: Path, array: np.ndarray, affine: np.ndarray = MNI_AFFINE, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), affine), str(path))
    return path


def _save_without_transform(path: Path, array: np.ndarray) -> Path:
    """A NIfTI file with voxel sizes but no voxel-to-world transform (qform and sform codes 0)."""
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), None)
    image.header.set_zooms((2.0, 2.0, 2.0))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, str(path))
    return path


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[2 * c, -2 * s, 0, 0], [2 * s, 2 * c, 0, 0], [0, 0, 2, -72], [0, 0, 0, 1]])


def _save_with_sidecar(path: Path, volume: np.ndarray, modality: str) -> Path:
    """A NIfTI file and the JSON sidecar dcm2niix writes beside it, declaring ``modality``."""
    _save(path, volume)
    path.with_name(path.name.split(".nii")[0] + ".json").write_text(json.dumps({"Modality": modality}))
    return path


def _cases(folder: Path, base: np.ndarray, source: Path, rng: np.random.Generator) -> dict[str, str]:
    """Write one file per corruption (several draws of each); return ``{file name: expected outcome}``."""
    expected: dict[str, str] = {}

    def add(name: str, outcome: str, write) -> None:
        write(folder / name)
        expected[name] = outcome

    raw = source.read_bytes()
    for i in range(3):
        # control cases: valid scans in other encodings must be scored
        scale = float(rng.uniform(0.01, 1000))
        add(f"scaled_{i}.nii.gz", MUST_SCORE, lambda p, s=scale: _save(p, base * s))
        add(f"int16_{i}.nii.gz", MUST_SCORE, lambda p, s=scale: _save(p, base / base.max() * 3000, dtype=np.int16))
        # an offset small against the striatal contrast (a large one erases it: the gate refuses that)
        semantic = np.random.default_rng(SEED + 100 + i)  # its own stream: the other cases draw what they drew
        offset = float(semantic.uniform(0.0, 0.1)) * float(base.max())
        add(f"shifted_{i}.nii", MUST_SCORE, lambda p, s=offset: _save(p, base + s))
        # semantic corruptions: valid files on the MNI grid that are not a DaTscan in MNI space
        add(f"inverted_{i}.nii.gz", MUST_FAIL, lambda p, s=scale: _save(p, (base.max() - base) * s))
        add(f"negated_{i}.nii.gz", MUST_FAIL, lambda p, s=scale: _save(p, -base * s))
        add(f"upside_down_{i}.nii.gz", MUST_FAIL, lambda p: _save(p, base[:, :, ::-1]))
        add(f"front_back_{i}.nii.gz", MUST_FAIL, lambda p: _save(p, base[:, ::-1, :]))
        up = int(semantic.integers(13, 20))  # 26-40 mm
        add(f"moved_up_{i}.nii.gz", MUST_FAIL, lambda p, k=up: _save(p, np.roll(base, k, axis=2)))
        add(f"no_transform_{i}.nii.gz", MUST_FAIL, lambda p: _save_without_transform(p, base))
        gamma = semantic.gamma(2.0, float(base.mean()) / 2.0, size=base.shape)
        add(f"noise_{i}.nii.gz", MUST_FAIL, lambda p, g=gamma: _save(p, g))
        # a DaTscan image whose acquisition metadata (dcm2niix's JSON sidecar) declare another modality, and the
        # same with SPECT declared (scored)
        other = str(semantic.choice(["PT", "pt", " PT ", "CT", "MR"]))
        add(f"declared_{i}.nii.gz", MUST_FAIL, lambda p, m=other: _save_with_sidecar(p, base, m))
        add(f"declared_spect_{i}.nii.gz", MUST_SCORE, lambda p: _save_with_sidecar(p, base, "NM"))
        # broken files
        cut = int(rng.integers(10, len(raw) - 10))
        add(f"truncated_{i}.nii.gz", MUST_FAIL, lambda p, c=cut: p.write_bytes(raw[:c]))
        noise = rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes()
        add(f"random_bytes_{i}.nii.gz", MUST_FAIL, lambda p, b=noise: p.write_bytes(b))
        add(f"gzip_of_junk_{i}.nii.gz", MUST_FAIL, lambda p, b=noise: p.write_bytes(gzip.compress(b"\x01" * 50 + b)))
        # values
        bad = base.copy()
        idx = tuple(rng.integers(0, s, 5) for s in bad.shape)
        bad[idx] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
        add(f"non_finite_{i}.nii.gz", MUST_FAIL, lambda p, b=bad: _save(p, b))
        value = float(rng.choice([0.0, rng.uniform(-5, 5)]))
        add(f"constant_{i}.nii.gz", MUST_FAIL, lambda p, v=value: _save(p, np.full(base.shape, v)))
        spike = np.zeros(base.shape)
        spike[tuple(rng.integers(0, s) for s in base.shape)] = float(rng.uniform(1, 100))
        add(f"spike_{i}.nii.gz", MUST_FAIL, lambda p, v=spike: _save(p, v))
        # geometry and headers
        shape = tuple(int(v) for v in rng.integers(8, 40, 3))
        voxel = float(rng.uniform(6, 12))
        add(f"coarse_{i}.nii.gz", MUST_FAIL, lambda p, s=shape, v=voxel: _save(p, rng.random(s), np.diag([v, v, v, 1])))
        add(f"slab_{i}.nii.gz", MUST_FAIL, lambda p: _save(p, base[:, :, 30:50]))
        frames = int(rng.integers(2, 4))
        add(f"dynamic_{i}.nii.gz", MUST_FAIL, lambda p, f=frames: _save(p, np.stack([base] * f, axis=-1)))
        add(f"flat_{i}.nii.gz", MUST_FAIL, lambda p: _save(p, base[:, :, 45]))
        add(f"tiny_{i}.nii.gz", MUST_FAIL, lambda p: _save(p, rng.random((4, 5, 6))))
        broken_affine = MNI_AFFINE.copy()
        broken_affine[int(rng.integers(0, 3)), int(rng.integers(0, 3))] = float(rng.choice([0.0, np.nan, 1e9]))
        add(f"bad_affine_{i}.nii.gz", EITHER, lambda p, a=broken_affine: _save(p, base, a))
        angle = float(rng.uniform(0.3, 1.2))
        add(f"oblique_{i}.nii.gz", MUST_FAIL, lambda p, a=angle: _save(p, base, _rotation(a)))
        header = bytearray(_save(folder / f".tmp_{i}.nii", base).read_bytes())
        (folder / f".tmp_{i}.nii").unlink()
        for offset in rng.integers(40, 348, 6):  # dims, datatype, pixdim, offsets, scaling
            header[int(offset)] = int(rng.integers(0, 256))
        add(f"header_{i}.nii", EITHER, lambda p, h=bytes(header): p.write_bytes(h))
    return expected


def test_corrupted_volumes_are_scored_only_when_valid_and_never_crash_inference(tmp_path, tiny_phantom_dataset):
    rng = np.random.default_rng(SEED)
    source = sorted((tiny_phantom_dataset.parent / "images").glob("*.nii.gz"))[0]
    base = np.asarray(nib.load(str(source)).dataobj, dtype=np.float32)
    scans = tmp_path / "scans"
    scans.mkdir()
    expected = _cases(scans, base, source, rng)
    assert len(expected) == 78
    root = tmp_path / "bundle"
    torch.manual_seed(0)
    settings = {"spatial_size": [32, 32, 32], "intensity": "minmax", "projection": "joint_fusion_slices"}
    save_checkpoint(Student2D(), root / "models" / "model.pt", settings)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root",
           str(root), "--input", str(scans), "--run_name", "fuzz", "--batch_size", "8"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(BUNDLE_ROOT))
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=420)
    errors = [line for line in result.stderr.splitlines() if line.strip() and "GHSA-873f-pvrv-4x83" not in line]
    assert result.returncode == 1 and len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-3000:]
    with (root / "eval" / "fuzz" / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_name = {Path(r["image"]).name: r for r in rows}
    assert len(rows) == len(by_name) == len(expected) and set(by_name) == set(expected)
    for name, outcome in expected.items():
        row = by_name[name]
        scored = row["pd_probability"] != ""
        assert scored != bool(row["error"]), row
        if scored:
            assert 0.0 <= float(row["pd_probability"]) <= 1.0, row
        else:
            assert name in row["error"], row  # the reason names the file
        if outcome == MUST_SCORE:
            assert scored, row
        elif outcome == MUST_FAIL:
            assert not scored, row


def test_corrupted_headers_through_the_loader_end_in_a_volume_or_an_input_error(tmp_path):
    rng = np.random.default_rng(SEED + 1)
    loader = LoadScand("image")
    deadline = time.monotonic() + 20
    outcomes = {"ok": 0, "error": 0}
    for i in range(40):
        if time.monotonic() > deadline:
            break
        shape = tuple(int(v) for v in rng.integers(1, 24, int(rng.integers(1, 6))))
        affine = np.diag(np.append(rng.choice([-1, 1], 3) * rng.uniform(0.1, 12, 3), 1.0))
        if rng.random() < 0.3:
            affine[:3, :3] += rng.normal(0, 1, (3, 3))
        dtype = rng.choice([np.float32, np.float64, np.int16, np.uint8, np.int32])
        data = (rng.random(shape) * rng.choice([1, 100, 1e6])).astype(dtype)
        path = _save(tmp_path / f"h{i}.nii.gz", data, affine, dtype=dtype)
        try:
            out = loader({"image": str(path)})
        except InputError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            outcomes["error"] += 1
        else:
            image = out["image"]
            assert image.ndim == 4 and image.shape[0] == 1 and torch.isfinite(image).all()
            outcomes["ok"] += 1
    assert sum(outcomes.values()) >= 20


def _mutate(content: dict, rng: np.random.Generator) -> object:
    """One random corruption of a datalist."""
    c = copy.deepcopy(content)
    split = str(rng.choice(SPLITS))
    entries = c[split]
    kind = int(rng.integers(0, 14))
    if kind == 0 and entries:
        del entries[int(rng.integers(0, len(entries)))]["image"]
    elif kind == 1 and entries:
        bad_labels = ["maybe", 0.5, None, [1], True, -1, "2", {"x": 1}]
        entries[int(rng.integers(0, len(entries)))]["label"] = bad_labels[int(rng.integers(0, len(bad_labels)))]
    elif kind == 2 and entries:
        entries.append(copy.deepcopy(entries[int(rng.integers(0, len(entries)))]))
    elif kind == 3 and entries:
        other = str(rng.choice([s for s in SPLITS if s != split]))
        c[other].append(copy.deepcopy(entries[int(rng.integers(0, len(entries)))]))
    elif kind == 4 and entries and c["training"]:
        entries[int(rng.integers(0, len(entries)))]["subject"] = c["training"][0]["subject"]
    elif kind == 5:
        c[split] = []
    elif kind == 6 and entries:
        label = entries[0]["label"]
        c[split] = [e for e in entries if e["label"] == label]
    elif kind == 7 and entries:
        bad_images = ["", "missing.nii.gz", 5, None, "/", ["a"]]
        entries[int(rng.integers(0, len(entries)))]["image"] = bad_images[int(rng.integers(0, len(bad_images)))]
    elif kind == 8:
        c[split] = [1, "x", None][int(rng.integers(0, 3))]
    elif kind == 9 and entries:
        entries[int(rng.integers(0, len(entries)))] = ["x", 3, None, []][int(rng.integers(0, 4))]
    elif kind == 10:
        return [[], "text", 3, None][int(rng.integers(0, 4))]
    elif kind == 11:
        del c[split]
    elif kind == 12 and entries:
        good_labels = ["HC", "pd", " PD ", "control", 1.0, 0]
        entries[int(rng.integers(0, len(entries)))]["label"] = good_labels[int(rng.integers(0, len(good_labels)))]
    else:
        c[split] = entries[::-1]
    return c


def test_corrupted_datalists_load_or_give_a_datalist_error(tmp_path, tiny_phantom_dataset):
    rng = np.random.default_rng(SEED + 2)
    content = json.loads(tiny_phantom_dataset.read_text(encoding="utf-8"))
    for split in SPLITS:
        for entry in content[split]:
            entry["image"] = str(tiny_phantom_dataset.parent / entry["image"])
    path = tmp_path / "datalist.json"
    deadline = time.monotonic() + 20
    counts = {"loaded": 0, "refused": 0}
    for case in range(300):
        if time.monotonic() > deadline:
            break
        mutated = _mutate(content, rng)
        text = json.dumps(mutated)
        if rng.random() < 0.1:
            text = text[: int(rng.integers(0, len(text)))]  # truncated file
        if rng.random() < 0.05:
            text = "\ufeff" + text  # written with a byte-order mark: refused with a clear line
        path.write_text(text, encoding="utf-8")
        loaded = {}
        for split in SPLITS:
            try:
                loaded[split] = load_datalist(path, split)
            except DatalistError as e:
                assert "\n" not in str(e).strip(), str(e)
                counts["refused"] += 1
                continue
            counts["loaded"] += 1
            entries = loaded[split]
            assert entries and all(e["label"] in (0, 1) and Path(e["image"]).is_file() for e in entries), case
            assert {e["label"] for e in entries} == {0, 1} or split == "test", case
            assert len({e["image"] for e in entries}) == len(entries), case
        if len(loaded) == 3:  # all splits accepted: no scan and no subject in two of them
            subjects = [{e["subject"] for e in loaded[s]} for s in SPLITS]
            assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2]), case
    assert counts["loaded"] > 0 and counts["refused"] > 0
