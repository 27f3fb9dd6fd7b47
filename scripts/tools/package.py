# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Build the distributable archive of the bundle, in the layout the MONAI model zoo uses.

    python -m scripts.tools.package --out dist/ [--with-weights] [--weights-dir models/]
                              [--weights-url URL] [--release-url URL]

writes ``<out>/pd_datscan_kd_classification_v<version>.zip`` (``version`` from ``configs/metadata.json``) and
``<out>/model_info.json``. The archive unpacks into one top-level folder ``pd_datscan_kd_classification/``
holding ``LICENSE``, ``README.md`` (when present), ``configs/``, the runtime of ``scripts/`` (Python sources and
data files, no ``__pycache__``) and ``docs/``, which is what ``python -m monai.bundle download --url ...`` expects.
The repository's tools (``scripts/study``, ``scripts/benchmark``, ``scripts/tools``: the study, the benchmarks and
this packager) stay in the repository; no config references them. The synthetic generator (``scripts/synthetic``)
ships, because the training configs' ``initialize`` calls ``scripts.synthetic.ensure_dataset``. The weights
(``models/*.pt`` and ``models/*.ts``; ``models/model.pt``, the 2D student, is required) are either

* stored in the archive (``--with-weights``), or
* listed in a generated ``large_files.yml`` at the bundle root, one entry per file with the download URL
  ``<weights-url>/<file name>`` and its SHA-256, so that ``python -m monai.bundle download_large_files
  --bundle_path <bundle>`` fetches and checks them after the download.

``model_info.json`` gets the model-zoo entry ``{"<name>_v<version>": {"checksum": <SHA-1 of the zip>,
"source": <release-url>/<zip name>}}`` (entries of other versions already in the file are kept).

The archive is reproducible: entries are sorted by path, every entry has the same timestamp (2022-05-30
00:00:00, the model zoo's) and permissions (0644), no directory entries, deflate level 9; building twice from
the same files gives the same bytes and checksum.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = [
    "BUNDLE_NAME",
    "ZIP_TIMESTAMP",
    "TOOL_TREES",
    "PackagingError",
    "BundleArchive",
    "file_digest",
    "bundle_version",
    "collect_bundle_files",
    "collect_weight_files",
    "large_files_entries",
    "build_archive",
    "update_model_info",
]

BUNDLE_NAME = "pd_datscan_kd_classification"
"""Name of the bundle: the archive's top-level folder and the prefix of its file name."""

ZIP_TIMESTAMP = (2022, 5, 30, 0, 0, 0)
"""Modification time written for every archive entry (the model zoo resets files to this date)."""

REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json")
OPTIONAL_FILES = ("README.md",)
TREES = ("configs", "scripts", "docs")
WEIGHT_PATTERNS = ("*.pt", "*.ts")
STUDENT_WEIGHTS = "model.pt"
_EXCLUDED_DIRS = {"__pycache__"}
_EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp")
_EXCLUDED_FILES = {"configs/monailabel_train.json"}  # written into a served bundle by MONAI Label (multi-GPU)
TOOL_TREES = ("scripts/study", "scripts/benchmark", "scripts/tools")
"""Repository tools that no config references: never part of the archive."""


class PackagingError(RuntimeError):
    """The bundle cannot be packaged; the message names the file or option at fault and what was expected."""


@dataclass(frozen=True)
class BundleArchive:
    """What :func:`build_archive` produced.

    Attributes:
        path: the ``.zip`` file.
        sha1: hexadecimal SHA-1 of the archive (the model zoo's ``checksum``).
        model_info: the ``model_info.json`` written beside the archive.
        entries: archive member names, in archive order.
        source: the download URL recorded in ``model_info.json``.
    """

    path: Path
    sha1: str
    model_info: Path
    entries: tuple[str, ...]
    source: str


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hexadecimal digest of a file (``algorithm`` is any ``hashlib`` name, e.g. ``"sha1"``, ``"sha256"``)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The ``version`` of ``configs/metadata.json``, checked to be ``x.y.z`` and listed in ``changelog``.

    Raises:
        PackagingError: when the metadata is missing or unreadable, or the version is malformed or has no
            changelog entry.
    """
    meta_path = Path(bundle_root) / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise PackagingError(f"{meta_path} not found; is {bundle_root} the bundle root?") from None
    except json.JSONDecodeError as e:
        raise PackagingError(f"{meta_path} is not valid JSON: {e}") from None
    version = meta.get("version")
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise PackagingError(f"{meta_path}: 'version' must be a string 'x.y.z', got {version!r}.")
    if version not in meta.get("changelog", {}):
        raise PackagingError(
            f"{meta_path}: version {version} has no entry in 'changelog' (found {sorted(meta.get('changelog', {}))})."
        )
    return version


def _is_excluded(relative: Path) -> bool:
    parts = relative.parts
    return (
        any(p in _EXCLUDED_DIRS or p.startswith(".") for p in parts)
        or relative.name.endswith(_EXCLUDED_SUFFIXES)
        or relative.name.endswith("~")
        or relative.as_posix() in _EXCLUDED_FILES
        or any(relative.as_posix().startswith(tree + "/") for tree in TOOL_TREES)
    )


def collect_bundle_files(bundle_root: str | os.PathLike) -> dict[str, Path]:
    """The bundle's source files to distribute, as ``{path inside the bundle: file}``.

    ``LICENSE``, ``configs/metadata.json`` and ``configs/inference.json`` are required, ``README.md`` is taken
    when present, and every file under ``configs/``, ``scripts/`` and ``docs/`` is included except the tools
    (:data:`TOOL_TREES`), hidden files and folders, ``__pycache__`` folders, compiled Python files, temporary
    files and the ``configs/monailabel_train.json`` that MONAI Label writes for multi-GPU training. Run outputs
    (``eval/``, ``data/``), tests and weights are never collected here.

    Raises:
        PackagingError: when a required file is missing.
    """
    root = Path(bundle_root)
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise PackagingError(f"{root.resolve()} is missing the required bundle file(s) {missing}.")
    files = {name: root / name for name in REQUIRED_FILES + OPTIONAL_FILES if (root / name).is_file()}
    for tree in TREES:
        base = root / tree
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            relative = path.relative_to(root)
            if path.is_file() and not _is_excluded(relative):
                files[relative.as_posix()] = path
    return dict(sorted(files.items()))


def collect_weight_files(weights_dir: str | os.PathLike) -> dict[str, Path]:
    """The weight files to distribute, as ``{"models/<name>": file}`` (``*.pt`` and ``*.ts`` of ``weights_dir``).

    Raises:
        PackagingError: when ``weights_dir`` holds no ``model.pt`` (the student, the bundle's primary network).
    """
    folder = Path(weights_dir)
    found = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    weights = {f"models/{p.name}": p for p in found}
    if f"models/{STUDENT_WEIGHTS}" not in weights:
        raise PackagingError(
            f"no {STUDENT_WEIGHTS} (the 2D student weights) in {folder}; found {[p.name for p in found]}. Train it "
            "with `python -m monai.bundle run training --config_file configs/distill.json`, or pass --weights-dir."
        )
    return weights


def _join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def large_files_entries(weights: dict[str, Path], weights_url: str) -> list[dict[str, str]]:
    """``large_files.yml`` entries (``path``, ``url``, ``hash_val``, ``hash_type``) for ``weights``.

    The URL of ``models/<name>`` is ``<weights_url>/<name>``; the hash is the file's SHA-256.
    """
    return [
        {
            "path": arcname,
            "url": _join_url(weights_url, Path(arcname).name),
            "hash_val": file_digest(path, "sha256"),
            "hash_type": "sha256",
        }
        for arcname, path in sorted(weights.items())
    ]


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, so that the permission bits below are honoured
    info.external_attr = 0o100644 << 16
    return info


def update_model_info(path: str | os.PathLike, key: str, checksum: str, source: str) -> Path:
    """Add or replace ``{key: {"checksum", "source"}}`` in a model-zoo style ``model_info.json``.

    Raises:
        PackagingError: when an existing file is not a JSON object.
    """
    path = Path(path)
    info: dict = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PackagingError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(info, dict):
            raise PackagingError(f"{path} must hold a JSON object, got {type(info).__name__}.")
    info[key] = {"checksum": checksum, "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(info.items())), indent=4) + "\n")
    return path


def build_archive(
    bundle_root: str | os.PathLike = ".",
    out_dir: str | os.PathLike = "dist",
    with_weights: bool = False,
    weights_dir: str | os.PathLike | None = None,
    weights_url: str | None = None,
    release_url: str | None = None,
    name: str = BUNDLE_NAME,
) -> BundleArchive:
    """Build ``<out_dir>/<name>_v<version>.zip`` and update ``<out_dir>/model_info.json``.

    Args:
        bundle_root: the bundle folder (holding ``configs/metadata.json``).
        out_dir: output folder, created when needed.
        with_weights: store the weights in the archive; otherwise list them in ``large_files.yml``.
        weights_dir: folder of the weight files; default ``<bundle_root>/models``.
        weights_url: base URL the weight files are downloaded from (needed without ``with_weights``).
        release_url: base URL the archive will be downloaded from; the ``source`` of ``model_info.json`` is
            ``<release_url>/<zip name>``. Default: the archive's own ``file://`` URI.
        name: bundle name (top-level folder of the archive).

    Raises:
        PackagingError: for a missing required file, missing student weights, a malformed version, or a
            missing ``weights_url`` when the weights are not stored in the archive.
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise PackagingError(f"bundle name must hold only letters, digits and '_', got {name!r}.")
    root = Path(bundle_root)
    version = bundle_version(root)
    files: dict[str, Path | bytes] = dict(collect_bundle_files(root))
    weights = collect_weight_files(root / "models" if weights_dir is None else weights_dir)
    if with_weights:
        files.update(weights)
    else:
        if not weights_url:
            raise PackagingError(
                "without --with-weights the weights are listed in large_files.yml and need a download location: "
                "pass --weights-url (e.g. https://github.com/<owner>/<repo>/releases/download/v<version>)."
            )
        entries = large_files_entries(weights, weights_url)
        files["large_files.yml"] = yaml.safe_dump({"large_files": entries}, sort_keys=False).encode()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_v{version}"
    archive = out / f"{stem}.zip"
    tmp = archive.with_name(archive.name + ".tmp")
    names = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for relative in sorted(files):
            content = files[relative]
            data = content if isinstance(content, bytes) else Path(content).read_bytes()
            member = f"{name}/{relative}"
            zf.writestr(_zip_entry(member), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            names.append(member)
    os.replace(tmp, archive)

    sha1 = file_digest(archive, "sha1")
    source = _join_url(release_url, archive.name) if release_url else archive.resolve().as_uri()
    model_info = update_model_info(out / "model_info.json", stem, sha1, source)
    return BundleArchive(path=archive, sha1=sha1, model_info=model_info, entries=tuple(names), source=source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tools.package",
        description=f"Build {BUNDLE_NAME}_v<version>.zip (model-zoo layout) and model_info.json.",
    )
    parser.add_argument("--out", default="dist", help="output folder (default: dist)")
    parser.add_argument("--bundle-root", default=".", help="bundle folder (default: the current folder)")
    parser.add_argument("--with-weights", action="store_true", help="store models/*.pt|*.ts in the archive")
    parser.add_argument("--weights-dir", default=None, help="folder of the weight files (default: <bundle>/models)")
    parser.add_argument("--weights-url", default=None, help="base URL of the weight files, for large_files.yml")
    parser.add_argument("--release-url", default=None, help="base URL the archive is published at")
    args = parser.parse_args(argv)
    try:
        result = build_archive(
            bundle_root=args.bundle_root,
            out_dir=args.out,
            with_weights=args.with_weights,
            weights_dir=args.weights_dir,
            weights_url=args.weights_url,
            release_url=args.release_url,
        )
    except PackagingError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {result.path} ({len(result.entries)} files, sha1 {result.sha1})")
    print(f"updated {result.model_info}: source {result.source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
