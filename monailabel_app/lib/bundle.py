# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Locating the bundle, reading its configs independently of the working directory, importing its ``scripts``."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

from monai.bundle import ConfigParser
from monailabel.utils.others.class_utils import unload_module

__all__ = [
    "BUNDLE_NAME",
    "REQUIRED_CONFIGS",
    "BundleNotFoundError",
    "resolve_bundle_path",
    "working_directory",
    "resolved_config",
    "bundle_module",
]

BUNDLE_NAME = "pd_datscan_kd_classification"
REQUIRED_CONFIGS = ("metadata.json", "inference.json", "distill.json")


class BundleNotFoundError(FileNotFoundError):
    """No usable copy of the bundle was found where the app looked."""


def _is_bundle(path: Path) -> bool:
    return all((path / "configs" / name).is_file() for name in REQUIRED_CONFIGS)


def resolve_bundle_path(app_dir: str | os.PathLike, conf: Mapping[str, str]) -> str:
    """The absolute path of the bundle served by the app; nothing is ever downloaded.

    Looked up in this order:

    1. ``--conf bundle_path DIR``;
    2. ``<app_dir>/model/pd_datscan_kd_classification`` (a copy or a symbolic link);
    3. the folder holding ``<app_dir>`` (the app ships inside the bundle's repository).

    Raises:
        BundleNotFoundError: naming the candidates and the config files a bundle must have.
    """
    app = Path(app_dir).resolve()
    if conf.get("bundle_path"):
        candidates = [Path(conf["bundle_path"]).expanduser()]
    else:
        candidates = [app / "model" / BUNDLE_NAME, app.parent]
    for candidate in candidates:
        if _is_bundle(candidate):
            return str(candidate.resolve())
    looked = ", ".join(str(c) for c in candidates)
    raise BundleNotFoundError(
        f"no {BUNDLE_NAME} bundle found (looked in: {looked}); a bundle folder needs configs/"
        f"{', configs/'.join(REQUIRED_CONFIGS)}. Pass --conf bundle_path DIR or link the bundle to "
        f"{app / 'model' / BUNDLE_NAME}."
    )


@contextlib.contextmanager
def working_directory(path: str | os.PathLike) -> Iterator[None]:
    """Run the ``with`` block in ``path``, then return to the previous working directory."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def resolved_config(bundle_path: str, config_file: str) -> ConfigParser:
    """``config_file`` read with its macros (``"%configs/other.json#id"``) expanded against ``bundle_path``.

    MONAI expands a macro's file path relative to the current working directory, so a training config of this
    bundle read from anywhere else would fail, or include the blocks of whatever ``configs/`` lies there. The
    expansion runs inside ``bundle_path``; the returned parser holds no macro any more and parses the same from
    any working directory.
    """
    parser = ConfigParser()
    parser.read_config(config_file)
    with working_directory(bundle_path):
        parser.resolve_macro_and_relative_ids()
    return parser


@contextlib.contextmanager
def bundle_module(bundle_path: str, name: str) -> Iterator[ModuleType]:
    """Import ``name`` (e.g. ``"scripts.data"``) from the bundle at ``bundle_path``, for the ``with`` block.

    The bundle folder is put first on ``sys.path`` and any previously imported ``scripts`` modules are dropped,
    as MONAI Label's bundle tasks do, so the module comes from this bundle and not from another one.
    """
    sys.path.insert(0, bundle_path)
    unload_module("scripts")
    try:
        yield importlib.import_module(name)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(bundle_path)
