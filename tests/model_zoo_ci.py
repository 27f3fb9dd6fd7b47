# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The MONAI model zoo's bundle verification, re-implemented step for step for this bundle's tests.

The model zoo (github.com/Project-MONAI/model-zoo) verifies a submitted bundle with ``ci/verify_bundle.py``,
started from the zoo's root folder with the bundle in ``models/<name>/``::

    python ci/verify_bundle.py -b <name> -p models -m min     # CPU pre-merge
    python ci/verify_bundle.py -b <name> -p models -m full    # GPU pre-merge: also network shapes and export

This module runs the same steps with the same MONAI calls and arguments (each function names the zoo function it
mirrors), from the current working directory, so that a test can run it from a zoo-like folder that is not the
bundle root. Bundle-specific exclusion lists of the zoo (``ci/bundle_custom_data.py``) do not name this bundle,
and its ``supported_apps`` is empty, so the property check has nothing to check; both are left out.

    python tests/model_zoo_ci.py -b pd_datscan_kd_classification -p models -m full --schema SCHEMA

``--schema`` is the metadata schema that the zoo's ``ci/prepare_schema.py`` downloads from the URL in
``configs/metadata.json`` before verifying; the tests pass the vendored copy (its file name must be the URL's).
Each passed step prints one line; the first failing step raises with its message and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys

NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
PREFERRED_FILES = ("models/model.pt", "configs/inference.json")
NET_ID = "network_def"  # the zoo's _get_net_id() for every bundle without an entry of its own
WEIGHTS = ("model.pt", "model.ts")  # the zoo's _get_weights_names() likewise


def find_bundle_file(root_dir: str, name: str, suffixes=("json", "yaml", "yml")) -> str | None:
    """``_find_bundle_file``: ``name`` with a config suffix in ``root_dir`` (the last suffix found wins)."""
    found = None
    for suffix in suffixes:
        if f"{name}.{suffix}" in os.listdir(root_dir):
            found = f"{name}.{suffix}"
    return found


def download_large_files(bundle_path: str, large_file_name: str) -> None:
    """``utils.download_large_files``: every entry of the large-files config through MONAI's ``download_url``.

    Empty ``hash_val``/``hash_type`` are dropped, ``path`` becomes ``filepath`` under the bundle and ``fuzzy`` is
    set, as in the zoo; a hash mismatch raises.
    """
    from monai.apps.utils import download_url
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_path, large_file_name))
    for entry in parser.get()["large_files"]:
        entry["fuzzy"] = True
        for key in ("hash_val", "hash_type"):
            if key in entry and entry.get(key, "") == "":
                entry.pop(key)
        entry["filepath"] = os.path.join(bundle_path, entry.pop("path"))
        download_url(**entry)


def verify_bundle_directory(models_path: str, bundle: str) -> None:
    """``verify_bundle_directory``: fetch the large files, then the necessary and the preferred files."""
    bundle_path = os.path.join(models_path, bundle)
    large_files = find_bundle_file(bundle_path, "large_files")
    if large_files is not None:
        try:
            download_large_files(bundle_path, large_files)
        except Exception as e:
            raise ValueError(f"Download large files in {bundle_path} error.") from e
    for name in NECESSARY_FILES:
        if not os.path.exists(os.path.join(bundle_path, name)):
            raise ValueError(f"necessary file {name} is not existing.")
    for name in PREFERRED_FILES:
        if name == "configs/inference.json":
            if find_bundle_file(os.path.join(bundle_path, "configs"), "inference") is None:
                raise ValueError("inference config file is not existing.")
        elif not os.path.exists(os.path.join(bundle_path, name)):
            raise ValueError(f"necessary file {name} is not existing.")


def verify_version_changes(models_path: str, bundle: str) -> None:
    """``verify_version_changes``: ``version`` listed in ``changelog`` and not yet in ``models/model_info.json``."""
    with open(os.path.join(models_path, bundle, "configs", "metadata.json")) as f:
        metadata = json.load(f)
    for key in ("version", "changelog"):
        if key not in metadata:
            raise ValueError(f"'{key}' is missing in configs/metadata.json of bundle: {bundle}.")
    version = metadata["version"]
    if version not in metadata["changelog"]:
        raise ValueError(f"version number: {version} is missing in 'changelog' in configs/metadata.json of {bundle}.")
    with open(os.path.join(models_path, "model_info.json")) as f:
        released = json.load(f)
    if f"{bundle}_v{version}" in released:
        raise ValueError(f"version number: {version} is already used of bundle: {bundle}. Please change it.")


def prepare_schema(models_path: str, bundle: str, schema: str) -> None:
    """``utils.prepare_schema``: the schema named by ``metadata.json`` copied to ``<bundle>/eval/schema.json``."""
    bundle_path = os.path.join(models_path, bundle)
    with open(os.path.join(bundle_path, "configs", "metadata.json")) as f:
        url = json.load(f)["schema"]
    if os.path.basename(schema) != url.split("/")[-1]:
        raise ValueError(f"the metadata names the schema {url}, but {schema} was given.")
    os.makedirs(os.path.join(bundle_path, "eval"), exist_ok=True)
    shutil.copyfile(schema, os.path.join(bundle_path, "eval", "schema.json"))


def verify_metadata_format(bundle_path: str) -> None:
    """``verify_metadata_format``: MONAI's ``verify_metadata`` against ``eval/schema.json``."""
    from monai.bundle import verify_metadata

    verify_metadata(
        meta_file=os.path.join(bundle_path, "configs/metadata.json"),
        filepath=os.path.join(bundle_path, "eval/schema.json"),
    )


def verify_data_shape(bundle_path: str, net_id: str, config_file: str) -> None:
    """``verify_data_shape``: MONAI's ``verify_net_in_out`` on the inference config, ``bundle_root`` given."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id=net_id,
        meta_file=os.path.join(bundle_path, "configs/metadata.json"),
        config_file=os.path.join(bundle_path, config_file),
        bundle_root=bundle_path,
    )


def verify_torchscript(bundle_path: str, net_id: str, config_file: str, model_name: str, ts_name: str) -> None:
    """``verify_torchscript``: MONAI's ``ckpt_export`` of ``models/<model_name>``; a shipped ``.ts`` must load."""
    import torch
    from monai.bundle import ckpt_export

    ckpt_export(
        net_id=net_id,
        filepath=os.path.join(bundle_path, "models/verify_model.ts"),
        ckpt_file=os.path.join(bundle_path, "models", model_name),
        meta_file=os.path.join(bundle_path, "configs/metadata.json"),
        config_file=os.path.join(bundle_path, config_file),
        bundle_root=bundle_path,
    )
    print("export weights into TorchScript module successfully.")
    shipped = os.path.join(bundle_path, "models", ts_name)
    if os.path.exists(shipped):
        torch.jit.load(shipped)
        print("Provided TorchScript module is verified correctly.")


def bundle_requirements(bundle_path: str) -> list[str]:
    """``get_bundle_requirements.get_requirements``: the ``name==version`` lines the zoo installs for the bundle."""
    with open(os.path.join(bundle_path, "configs", "metadata.json")) as f:
        metadata = json.load(f)
    lines = [f"monai=={metadata['monai_version']}"] if "monai_version" in metadata else []
    if "pytorch_version" in metadata:
        lines.append(f"torch=={metadata['pytorch_version']}")
    if "numpy_version" in metadata:
        lines.append(f"numpy=={metadata['numpy_version']}")
    for key in ("optional_packages_version", "required_packages_version"):
        lines += [f"{name}=={version}" for name, version in metadata.get(key, {}).items()]
    return lines


def verify_requirements_installed(bundle_path: str) -> None:
    """Every line of :func:`bundle_requirements` is what this environment has installed (local labels aside).

    The zoo installs exactly these versions before verifying; the check makes sure that the metadata names the
    versions the bundle is tested with here.
    """
    wrong = []
    for line in bundle_requirements(bundle_path):
        name, version = line.split("==")
        try:
            installed = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong.append(f"{line} (installed: {installed})")
    if wrong:
        raise ValueError(f"configs/metadata.json names versions other than the installed ones: {wrong}")


def verify(bundle: str, models_path: str = "models", mode: str = "full", schema: str | None = None) -> None:
    """``verify``: the steps of the zoo's pre-merge checks, in the zoo's order."""
    print(f"start verifying {bundle}:")
    sys.path = [os.path.join(models_path, bundle)] + sys.path  # the bundle's `scripts`, as the zoo does
    bundle_path = os.path.join(models_path, bundle)
    verify_bundle_directory(models_path, bundle)
    print("directory is verified correctly.")
    if mode != "regular":
        verify_version_changes(models_path, bundle)
        print("version and changelog are verified correctly.")
    if schema is not None:
        prepare_schema(models_path, bundle, schema)
    verify_metadata_format(bundle_path)
    print("metadata format is verified correctly.")
    verify_requirements_installed(bundle_path)
    print("required package versions are the installed ones.")
    if mode in ("min", "regular"):
        return
    config_file = os.path.join("configs", find_bundle_file(os.path.join(bundle_path, "configs"), "inference"))
    verify_data_shape(bundle_path, NET_ID, config_file)
    print("data shape is verified correctly.")
    verify_torchscript(bundle_path, NET_ID, config_file, *WEIGHTS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--b", type=str, required=True, help="bundle name")
    parser.add_argument("-p", "--p", type=str, default="models", help="models path")
    parser.add_argument("-m", "--mode", type=str, default="full", help="min, regular or full")
    parser.add_argument("--schema", type=str, default=None, help="metadata schema to copy to eval/schema.json")
    args = parser.parse_args(argv)
    verify(args.b, args.p, args.mode, args.schema)


if __name__ == "__main__":
    main()
