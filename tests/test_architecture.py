# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The bundle as a library: no global side effects for the program that imports it or runs its configs in-process,
optional matplotlib, and docs/architecture.md naming modules and files that exist."""

from __future__ import annotations

import importlib
import logging
import re
import sys

import pytest
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigWorkflow
from scripts.errors import InputError

CONFIGS = BUNDLE_ROOT / "configs"
RUNTIME_MODULES = sorted(
    f"scripts.{p.stem}" for p in (BUNDLE_ROOT / "scripts").glob("*.py") if p.stem not in ("__init__", "__main__")
)


def _log_filters() -> dict[tuple[str, int], list[logging.Filter]]:
    """Every handler's filters, by (logger name, handler id), over the root logger and every logger created so far."""
    loggers = {"": logging.getLogger()} | {
        name: logger for name, logger in logging.root.manager.loggerDict.items() if isinstance(logger, logging.Logger)
    }
    filters = {(name, id(h)): list(h.filters) for name, logger in loggers.items() for h in logger.handlers}
    filters |= {(name, 0): list(logger.filters) for name, logger in loggers.items()}
    return filters


def test_importing_the_bundle_and_running_a_config_in_process_leaves_hooks_and_log_filters_alone(
    tiny_phantom_dataset, tmp_path
):
    hook = sys.excepthook
    for name in ["scripts", *RUNTIME_MODULES, "scripts.synthetic"]:
        importlib.import_module(name)
    before = _log_filters()
    assert sys.excepthook is hook

    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train_teacher.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(tiny_phantom_dataset.parent),
        spatial_size=[32, 32, 32],
        batch_size=6,
        max_epochs=1,
        progress_bar=False,
        num_workers=0,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    assert (tmp_path / "models" / "teacher.pt").is_file()

    assert sys.excepthook is hook, "running a config in-process replaced sys.excepthook"
    after = _log_filters()
    changed = {key: (before.get(key), f) for key, f in after.items() if key in before and f != before[key]}
    assert not changed, f"log filters changed: {changed}"
    added = {key: f for key, f in after.items() if key not in before and f}
    assert not added, f"new loggers with filters: {added}"


def test_reports_without_matplotlib_stop_with_the_install_command_and_the_study_skips_its_figures(
    monkeypatch, tmp_path, capsys
):
    from scripts.report import ReportWriter, require_matplotlib
    from scripts.study.figures import draw_figures

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importlib.util.find_spec("matplotlib") is None
    with pytest.raises(InputError, match=r"need matplotlib, which is not installed: pip install 'matplotlib=="):
        require_matplotlib()
    with pytest.raises(InputError, match="pip install"):
        ReportWriter(output_dir=tmp_path / "report", network=None, volume_transforms=[])
    assert not (tmp_path / "report").exists()
    assert draw_figures(None, None, tmp_path / "figures") == []
    assert "no figures: matplotlib is not installed" in capsys.readouterr().out


def test_architecture_page_names_only_modules_and_configs_that_exist():
    text = (BUNDLE_ROOT / "docs" / "architecture.md").read_text()
    modules = set(re.findall(r"`(scripts(?:\.\w+)+)`", text))
    files = set(re.findall(r"`((?:scripts|configs|docs|tests|monailabel_app|ci)/[\w./-]+)`", text))
    assert len(modules) >= 10 and len(files) >= 10, (sorted(modules), sorted(files))
    for name in sorted(modules):
        parts = name.split(".")
        path = BUNDLE_ROOT.joinpath(*parts)
        found = path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
        if not found:  # scripts.<module>.<attribute>
            module = importlib.import_module(".".join(parts[:-1]))
            found = hasattr(module, parts[-1])
        assert found, f"docs/architecture.md names {name}, which does not exist"
    missing = [f for f in sorted(files) if not (BUNDLE_ROOT / f.rstrip("/")).exists()]
    assert not missing, f"docs/architecture.md names missing files: {missing}"
    # the tool packages are described (a runtime module added later shows up in the table when it is described)
    for name in ("scripts.synthetic", "scripts.study", "scripts.benchmark", "scripts.tools"):
        assert name in modules or f"{name.replace('.', '/')}/" in files, f"{name} is not described"
