# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Model-zoo readiness: the bundle as the MONAI model zoo's CI sees it (``make zoo-check`` runs this module).

A zoo submission is the bundle folder ``models/pd_datscan_kd_classification/`` of the zoo repository, with
``large_files.yml`` instead of the weights. Here that folder is the release archive of
``python -m scripts.tools.package`` (weights listed with their URL and SHA-256) unpacked into a zoo-like root;
the weights (freshly initialised, as the zoo's own ``_produce_fake_weights`` makes them) are served on
127.0.0.1. From that root, another working directory than the bundle's, the tests run:

- the zoo's verification steps (``tests/model_zoo_ci.py``, a step-for-step re-implementation of the zoo's
  ``ci/verify_bundle.py``): large-file download with hash check, necessary and preferred files, version and
  changelog, metadata against the schema, network input/output shapes, TorchScript export;
- the zoo's code-format checks (``runtests.sh --codeformat`` without pytype): isort, black with
  ``--skip-magic-trailing-comma`` and flake8 with its plugins, under the zoo's settings;
- the file checks of the zoo's pre-commit hooks;
- and, in this repository, the completeness of ``configs/metadata.json`` and of the model card.

With ``MODEL_ZOO_DIR`` pointing at a checkout of the model zoo, the zoo's own ``ci/verify_bundle.py`` also runs
on the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUNDLE_ROOT, serve_directory
from monai.bundle import ConfigParser

NAME = "pd_datscan_kd_classification"
CONFIGS = BUNDLE_ROOT / "configs"
METADATA = json.loads((CONFIGS / "metadata.json").read_text())
VERSION = METADATA["version"]
SCHEMA = BUNDLE_ROOT / "tests" / "schema" / "meta_schema_20240725.json"
ZOO_CI = BUNDLE_ROOT / "tests" / "model_zoo_ci.py"
MODEL_CARD = BUNDLE_ROOT / "docs" / "README.md"

# the model zoo's tool settings: setup.cfg ([flake8], [isort]) and pyproject.toml ([tool.black]) of its root
ZOO_SETUP_CFG = """\
[flake8]
select = B,C,E,F,N,P,T4,W,B9
max_line_length = 120
ignore =
    E203
    E501
    E741
    W503
    W504
    C408
    N812
    B023
    B905
    B028
    B907
    C419
per_file_ignores = __init__.py: F401, __main__.py: F401
exclude = *.pyi,.git,.eggs,monai/_version.py,versioneer.py,venv,.venv,_version.py

[isort]
known_first_party = models
profile = black
line_length = 120
skip = .git, .eggs, venv, .venv, versioneer.py, _version.py, conf.py
skip_glob = *.pyi
"""
ZOO_PYPROJECT = """\
[tool.black]
line-length = 120
target-version = ['py37', 'py38', 'py39']
include = '\\.pyi?$'
"""

# eval_metrics of configs/metadata.json: the default student (with distillation, full training split) on the
# test split of the synthetic benchmark preset, mean over the study's seeds, as the README's results table reports it
EVAL_METRICS = {
    "synthetic_benchmark_test_accuracy": "accuracy",
    "synthetic_benchmark_test_f1_macro": "macro-F1",
    "synthetic_benchmark_test_roc_auc": "ROC AUC",
}
RESULTS_ROW = ("2D joint fusion slices, with KD (teacher on 100 %)", "100 %")

# sections of the model zoo's readme template (docs/readme_template.md) and of its CONTRIBUTING guide
MODEL_CARD_SECTIONS = (
    "Model Overview",
    "Data",
    "Preprocessing",
    "Training configuration",
    "Input",
    "Output",
    "Performance",
    "MONAI Bundle Commands",
    "System Requirements",
    "Limitations",
    "References",
    "License",
)


def _env(**extra: str) -> dict[str, str]:
    """The environment of a zoo step: nothing of this repository on the Python path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update({"OMP_NUM_THREADS": "1", "MONAI_FAIL_ON_DUPLICATE_CONFIG": "1", **extra})
    return env


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def _ok(args: list[str], cwd: Path, timeout: float = 300) -> str:
    result = _run(args, cwd, timeout)
    if result.returncode != 0:
        pytest.fail(f"failed ({result.returncode}) in {cwd}: {' '.join(args)}\n{result.stdout[-5000:]}")
    return result.stdout


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def produce_fake_weights(folder: Path) -> dict[str, Path]:
    """Fresh weights as the zoo's ``_produce_fake_weights`` makes them: the state dict of the parsed network.

    ``model.pt`` is ``network_def`` of ``configs/inference.json`` (the student), ``teacher.pt`` its ``teacher_def``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    out = {}
    for name, net_id, seed in (("model.pt", "network_def", 0), ("teacher.pt", "teacher_def", 1)):
        torch.manual_seed(seed)
        out[name] = folder / name
        torch.save(parser.get_parsed_content(net_id).state_dict(), out[name])
    return out


@dataclass(frozen=True)
class Zoo:
    root: Path  # the zoo-like root: models/<name>/, models/model_info.json, setup.cfg, pyproject.toml
    bundle: Path  # root/models/<name>, the unpacked release archive (large_files.yml, no weights)
    weights: dict[str, Path]  # the served weight files
    base_url: str


def _unpack_submission(archive: Path, models: Path) -> Path:
    models.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(models)
    return models / NAME


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    """A zoo-like root holding this bundle as a submission, its weights served on 127.0.0.1 meanwhile."""
    top = tmp_path_factory.mktemp("zoo")
    serve, root = top / "serve", top / "zoo"
    weights = produce_fake_weights(serve / "weights")
    with serve_directory(serve) as port:
        base = f"http://127.0.0.1:{port}"
        _ok(
            [
                sys.executable,
                "-m",
                "scripts.tools.package",
                "--out",
                str(serve),
                "--weights-dir",
                str(serve / "weights"),
                "--weights-url",
                f"{base}/weights",
                "--release-url",
                base,
            ],
            cwd=BUNDLE_ROOT,
        )
        bundle = _unpack_submission(serve / f"{NAME}_v{VERSION}.zip", root / "models")
        (root / "models" / "model_info.json").write_text("{}\n")  # the zoo's list of released versions
        (root / "setup.cfg").write_text(ZOO_SETUP_CFG)
        (root / "pyproject.toml").write_text(ZOO_PYPROJECT)
        yield Zoo(root=root, bundle=bundle, weights=weights, base_url=base)


def _verify(root: Path, mode: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ZOO_CI), "-b", NAME, "-p", "models", "-m", mode, "--schema", str(SCHEMA)]
    return _run(args, cwd=root)


# --------------------------------------------------------------------------------------------------------------------
# the zoo's verification (ci/verify_bundle.py), from the zoo's root
# --------------------------------------------------------------------------------------------------------------------
def test_submission_lists_the_weights_with_their_sha256_and_holds_no_weights(zoo):
    listed = yaml.safe_load((zoo.bundle / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in listed] == ["models/model.pt", "models/teacher.pt"]
    for entry in listed:
        served = zoo.weights[Path(entry["path"]).name]
        assert entry["url"] == f"{zoo.base_url}/weights/{served.name}"
        assert entry["hash_type"] == "sha256" and entry["hash_val"] == _sha256(served)
    assert not (zoo.bundle / "models").exists()
    for required in ("LICENSE", "README.md", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
        assert (zoo.bundle / required).is_file(), required


TOOL_TREES = ("scripts/study/", "scripts/benchmark/", "scripts/tools/")
ZOO_UNIT_TEST = BUNDLE_ROOT / "ci" / "unit_tests" / f"test_{NAME}.py"


def test_submission_holds_the_runtime_only_and_every_module_a_config_names(zoo):
    files = sorted(p.relative_to(zoo.bundle).as_posix() for p in zoo.bundle.rglob("*") if p.is_file())
    assert not [f for f in files if f.startswith(TOOL_TREES)], "the repository's tools must not ship"
    assert not [f for f in files if f.startswith(("tests/", "ci/", "monailabel_app/"))]
    assert "scripts/synthetic/__init__.py" in files  # train_teacher.json's initialize generates the synthetic set
    # every name a config gives (``scripts.<module>[.<attribute>]``) resolves in the unpacked archive, and every
    # shipped module imports there, without the tools and without this repository on the path
    named = set()
    for config in (zoo.bundle / "configs").glob("*.json"):
        named |= {m.rstrip(".") for m in re.findall(r"\bscripts(?:\.\w+)+\.?", config.read_text())}
    modules = [f[:-3].replace("/", ".").removesuffix(".__init__") for f in files if f.endswith(".py")]
    modules = [m for m in modules if not m.endswith("__main__")]
    check = (
        "import importlib, pydoc, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"missing = [n for n in {sorted(named)!r} if pydoc.locate(n) is None]\n"
        "assert not missing, missing\n"
        "ours = [m.__file__ for n, m in sys.modules.items() if n == 'scripts' or n.startswith('scripts.')]\n"
        f"assert all(f.startswith({str(zoo.bundle)!r}) for f in ours), ours\n"
    )
    env = _env(PYTHONPATH=str(zoo.bundle))
    result = subprocess.run([sys.executable, "-c", check], cwd=zoo.root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(named) > 10 and "scripts.synthetic.ensure_dataset" in named


@pytest.mark.slow
def test_zoo_unit_test_passes_from_the_zoo_root(zoo, tmp_path):
    """``ci/unit_tests/test_<bundle>.py`` as the zoo's runner runs it: from the zoo's root, the bundle on the path."""
    root = tmp_path / "zoo"
    bundle = _copy_submission(zoo, root)
    shutil.copytree(ZOO_UNIT_TEST.parent, root / "ci" / "unit_tests")
    env = _env(PYTHONPATH=str(bundle))
    args = [sys.executable, "-m", "unittest", "-v", f"test_{NAME}"]
    result = subprocess.run(
        args, cwd=root / "ci" / "unit_tests", env={**env, "BUNDLE_ROOT": str(bundle)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_zoo_verification_passes_from_the_zoo_root(zoo):
    result = _verify(zoo.root, "full")
    assert result.returncode == 0, result.stdout[-5000:]
    for step in (
        "directory is verified correctly.",
        "version and changelog are verified correctly.",
        "metadata format is verified correctly.",
        "required package versions are the installed ones.",
        "data shape is verified correctly.",
        "export weights into TorchScript module successfully.",
    ):
        assert step in result.stdout, f"{step!r} missing:\n{result.stdout[-3000:]}"
    for name, served in zoo.weights.items():
        assert _sha256(zoo.bundle / "models" / name) == _sha256(served)  # downloaded and checked
    exported = torch.jit.load(str(zoo.bundle / "models" / "verify_model.ts"))
    image = METADATA["network_data_format"]["inputs"]["image"]
    with torch.no_grad():
        out = exported.eval()(torch.rand(1, image["num_channels"], *image["spatial_shape"]))
    assert out.shape == (1, METADATA["network_data_format"]["outputs"]["pred"]["num_channels"])


def _copy_submission(zoo: Zoo, dest: Path) -> Path:
    ignore = shutil.ignore_patterns("models", "eval", "__pycache__")
    shutil.copytree(zoo.bundle, dest / "models" / NAME, ignore=ignore)
    shutil.copy(zoo.root / "models" / "model_info.json", dest / "models" / "model_info.json")
    return dest / "models" / NAME


def test_zoo_verification_rejects_a_wrong_hash_and_an_already_released_version(zoo, tmp_path):
    bundle = _copy_submission(zoo, tmp_path / "wrong-hash")
    listed = yaml.safe_load((bundle / "large_files.yml").read_text())
    listed["large_files"][0]["hash_val"] = "0" * 64
    (bundle / "large_files.yml").write_text(yaml.safe_dump(listed, sort_keys=False))
    result = _verify(tmp_path / "wrong-hash", "min")
    assert result.returncode != 0 and "Download large files" in result.stdout, result.stdout[-3000:]

    bundle = _copy_submission(zoo, tmp_path / "released")
    (bundle.parent / "model_info.json").write_text(json.dumps({f"{NAME}_v{VERSION}": {"checksum": "", "source": ""}}))
    result = _verify(tmp_path / "released", "min")
    assert result.returncode != 0 and f"version number: {VERSION} is already used" in result.stdout, result.stdout


@pytest.mark.skipif(not os.environ.get("MODEL_ZOO_DIR"), reason="set MODEL_ZOO_DIR to a model-zoo checkout")
def test_the_zoo_own_verify_bundle_passes(zoo, tmp_path):
    """The zoo's own ``ci/verify_bundle.py`` (``MODEL_ZOO_DIR``) on a copy of the same submission."""
    script = Path(os.environ["MODEL_ZOO_DIR"]) / "ci" / "verify_bundle.py"
    bundle = _copy_submission(zoo, tmp_path)
    (bundle / "eval").mkdir()
    shutil.copyfile(SCHEMA, bundle / "eval" / "schema.json")  # what the zoo's ci/prepare_schema.py downloads
    out = _ok([sys.executable, str(script), "-b", NAME, "-p", "models", "-m", "full"], cwd=tmp_path)
    assert "export weights into TorchScript module successfully." in out


# --------------------------------------------------------------------------------------------------------------------
# the zoo's code-format checks and pre-commit hooks
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tool",
    [
        ["isort", "--check", "."],
        ["black", "--skip-magic-trailing-comma", "--check", "."],
        ["flake8", ".", "--count", "--statistics"],
    ],
    ids=["isort", "black", "flake8"],
)
def test_code_passes_the_zoo_format_checks(zoo, tool):
    # the zoo's `runtests.sh --codeformat` runs these from its root on the whole repository
    _ok([sys.executable, "-m", *tool], cwd=zoo.root)


def test_flake8_runs_with_the_zoo_plugins():
    out = _ok([sys.executable, "-m", "flake8", "--version"], cwd=BUNDLE_ROOT)
    for plugin in ("flake8-bugbear", "flake8-comprehensions", "flake8-executable", "pep8-naming"):
        assert plugin in out, f"{plugin} is not installed (requirements-dev.txt)"


def test_files_pass_the_zoo_pre_commit_hooks(zoo):
    """end-of-file-fixer, trailing-whitespace, mixed-line-ending, check-yaml, check-added-large-files (1024 KB),
    check-executables-have-shebangs, pretty-format-json (--indent=4 --no-sort-keys) on the submitted files."""
    problems = []
    for path in sorted(p for p in zoo.bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(zoo.bundle)
        if rel.parts[0] in ("models", "eval"):
            continue  # downloaded or written by a verification run, not submitted
        data = path.read_bytes()
        if len(data) > 1024 * 1024:
            problems.append(f"{rel}: {len(data) // 1024} KB, above the 1024 KB limit")
        try:
            text = data.decode()
        except UnicodeDecodeError:  # a binary file (a figure): the text hooks do not apply (pre-commit's types)
            continue
        if text and (not text.endswith("\n") or text.endswith("\n\n")):
            problems.append(f"{rel}: must end with exactly one newline")
        if "\r" in text:
            problems.append(f"{rel}: carriage returns")
        lines = text.split("\n")
        problems += [f"{rel}:{i}: trailing whitespace" for i, line in enumerate(lines, 1) if line.rstrip() != line]
        if path.suffix in (".yml", ".yaml"):
            yaml.safe_load(text)
        if path.suffix == ".json" and text != json.dumps(json.loads(text), indent=4) + "\n":
            problems.append(f"{rel}: not formatted as json.dumps(indent=4)")
        source = BUNDLE_ROOT / rel
        if source.is_file() and os.access(source, os.X_OK) and not text.startswith("#!"):
            problems.append(f"{rel}: executable without a shebang")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------------------------
# metadata and model card
# --------------------------------------------------------------------------------------------------------------------
def _results_row(text: str, row: tuple[str, ...]) -> dict[str, float]:
    """The mean values of one row of a markdown results table (``| model | subjects | metric ... |``)."""
    header = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(EVAL_METRICS.values()) <= set(cells):
            header = cells
        elif header and tuple(cells[: len(row)]) == row:
            return {name: float(value.split("±")[0]) for name, value in zip(header, cells) if name in header[2:]}
    raise AssertionError(f"no results row {row} under a header with {sorted(EVAL_METRICS.values())}")


def test_metadata_names_the_project_and_reports_the_measured_test_metrics():
    authors = METADATA["authors"]
    assert authors and authors != f"{NAME} contributors", "authors must name who makes the bundle, not a placeholder"
    assert authors in MODEL_CARD.read_text().split("### **Authors**", 1)[1].split("###", 1)[0], "model card authors"
    assert METADATA["copyright"].startswith("Copyright (c) ")
    assert METADATA["version"] in METADATA["changelog"]
    newest = max(METADATA["changelog"], key=lambda v: tuple(int(x) for x in v.split(".")))
    assert newest == METADATA["version"], "version must be the newest changelog entry"
    metrics = METADATA["eval_metrics"]
    assert set(metrics) == set(EVAL_METRICS), "eval_metrics: accuracy, macro-F1 and ROC AUC on the benchmark test split"
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics
    # the numbers are those of the README's results table (the study's report) and of the model card
    for source in (BUNDLE_ROOT / "README.md", MODEL_CARD):
        reported = _results_row(source.read_text(), RESULTS_ROW)
        for key, column in EVAL_METRICS.items():
            assert metrics[key] == pytest.approx(reported[column], abs=5e-4), f"{key} differs from {source.name}"


def test_model_card_has_the_zoo_sections_and_its_commands_name_existing_configs():
    text = MODEL_CARD.read_text()
    headings = [m.group(1).strip().strip("*").strip() for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)]
    missing = [s for s in MODEL_CARD_SECTIONS if s not in headings]
    assert not missing, f"model card sections missing: {missing}"
    commands = text.split("# MONAI Bundle Commands", 1)[1]
    named = set(re.findall(r"configs/[\w.]+\.json", commands))
    assert {"configs/train_teacher.json", "configs/distill.json", "configs/multi_gpu.json"} <= named
    assert {"configs/evaluate.json", "configs/inference.json"} <= named and "ckpt_export" in commands
    assert all((BUNDLE_ROOT / n).is_file() for n in named), sorted(n for n in named if not (BUNDLE_ROOT / n).is_file())
    licence = (BUNDLE_ROOT / "docs" / "data_license.txt").read_text()
    assert "PPMI" in licence and "https://www.ppmi-info.org" in licence
