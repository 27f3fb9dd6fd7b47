# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Shared fixtures of the MONAI Label server tests."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def forget_bundle_modules():
    """Forget the bundle's ``scripts`` package after each test.

    A test imports it from its own copy of the bundle (MONAI Label's bundle tasks and the helpers put that copy on
    ``sys.path``), and a passing test's ``tmp_path`` is removed when it ends; a later test must import the package
    from its own copy, never reuse one whose files are gone."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "scripts" or name.startswith("scripts."):
            del sys.modules[name]
