# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Shared fixtures: tiny synthetic volumes, a tiny phantom dataset, a loopback HTTP server."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))
os.environ.setdefault("MONAI_FAIL_ON_DUPLICATE_CONFIG", "1")
# A shell without job control starts a background command (`make test &`, a CI runner) with SIGINT ignored, and the
# processes it starts inherit that: the tests that press Ctrl-C on a run (this process or a child) would wait for
# an interruption that never comes. Restore Python's handler; children then start with SIGINT at its default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# the MNI 2 mm grid affine (FSL convention): x is stored right-to-left
MNI_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = MNI_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))
    return path


@pytest.fixture(autouse=True)
def _seeded_random_state():
    """Every test starts from the same random state (Python, NumPy, torch): a test's inputs do not depend on the
    tests that ran before it or on the machine."""
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_ray_at_a_time(tmp_path_factory) -> Iterator[None]:
    """Held by every module that starts Ray: the workers of a parallel run (``make test``, pytest-xdist) start one
    Ray instance at a time, as two on one machine would contend for Ray's fixed default ports. The lock file is in
    the folder every worker's temporary folder shares."""
    lock = tmp_path_factory.getbasetemp().parent / "ray.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny networks run fastest (and steadiest on a busy CPU) without threading."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_phantom_dataset(tmp_path_factory) -> Path:
    """A small synthetic DaTscan set (datalist + NIfTI files), generated once per test session."""
    from scripts.synthetic.phantom import generate_dataset

    out = tmp_path_factory.mktemp("phantoms")
    return generate_dataset(out, n_subjects=30, seed=3, workers=1)


def config_preprocessing(spatial_size=(64, 64, 64), intensity="minmax", projection=None, **overrides):
    """The bundle's preprocessing as ``configs/inference.json`` defines it (``volume_transforms``, then the
    projection when ``projection`` is given), with the grid, the intensity mode and any other overrides."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.update({"spatial_size": list(spatial_size), "intensity": intensity, **overrides})
    transforms = list(parser.get_parsed_content("volume_transforms"))
    if projection is not None:
        parser["projection"] = projection
        transforms.append(parser.get_parsed_content("projection_transform"))
    return Compose(transforms)


RAY_FIXED_PORTS = frozenset({6379, 8265, 10001, 52365, *range(10002, 20000)})
"""Ports a Ray head takes by default besides its GCS port (GCS, dashboard, client server, dashboard agent, workers):
a GCS port equal to one of them makes ``ray start`` fail with "port ... used by other components"."""


def free_ray_head_port() -> int:
    """A free local port for a Ray head's ``--port``, none of :data:`RAY_FIXED_PORTS` (the operating system's pick
    can be any free port, 52365 included)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_FIXED_PORTS:
            return port


@contextlib.contextmanager
def serve_directory(directory: Path, timeout: float = 20.0) -> Iterator[int]:
    """``python -m http.server`` on 127.0.0.1 serving ``directory``; yields the port, always stops the server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(directory), str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the HTTP server on port {port} did not start (exit code {proc.poll()}).")
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
