# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""One cell of the study: train it through the bundle's configs, score it on every test set, return its record.

Every network cell runs MONAI's own bundle workflow (``monai.bundle.ConfigWorkflow``, what ``python -m
monai.bundle run`` builds) on the bundle's configs; there is no second training loop:

* training: ``configs/train_teacher.json`` (teacher) or ``configs/distill.json`` (student, with or without KD),
  run ``training``;
* scoring: the same config plus ``configs/evaluate.json`` with ``--eval_checkpoint`` set to the cell's own best
  checkpoint, once per test set and split (in-domain validation and test, every external set's test split).

Each cell is isolated in its own folder ``<run dir>/cells/<cell name>/``, passed as ``--bundle_root``: its
``eval/`` (runs, checkpoints, metrics, predictions) lands there; nothing is published to a ``models/`` folder
(``--publish false``). A KD student reads its teacher from that teacher cell's own best checkpoint (``--teacher_ckpt``).
MONAI macros in the configs are resolved from the current directory, so the workflows run with the repository
root as working directory (``bundle_root`` only says where outputs go). The equivalent command lines are kept in
the record (``commands``).

Baseline cells score the lowest-putamen SBR threshold (fitted on the training split), always-PD, and record the
slice centres ``slice_centre: auto`` and ``template`` pick for every scan.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from scripts.data import load_datalist
from scripts.metrics import classification_report
from scripts.study.matrix import Cell
from scripts.study.operating import prevalence_threshold, youden_threshold

__all__ = [
    "BUNDLE_ROOT",
    "StudyContext",
    "cell_dir",
    "bundle_command",
    "run_bundle",
    "run_cell",
    "score_added_sets",
    "unscored_sets",
    "hardware",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = {"teacher": "train_teacher.json", "student": "distill.json"}
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


@dataclass
class StudyContext:
    """What every cell of one study shares.

    Attributes:
        run_dir: the study folder.
        datasets: ``{name: datalist path}``; the first is the in-domain set (training, validation, test), the
            others are external sets scored on their ``test`` split.
        settings: config overrides for every network cell (grid, batch sizes, ...).
        teacher_settings, student_settings: overrides of the teacher / student trainings (epochs, ...).
        n_teachers: number of teacher seeds (a KD student of seed ``s`` learns from teacher ``s mod n``).
        prevalence: assumed PD prevalence per external set for the label-free recalibrated threshold.
        adabn_shares: site PD shares whose AdaBN scores are measured (``None``: every share; empty: none), see
            :class:`scripts.study.matrix.MatrixSpec`.
    """

    run_dir: Path
    datasets: dict[str, str]
    settings: dict = field(default_factory=dict)
    teacher_settings: dict = field(default_factory=dict)
    student_settings: dict = field(default_factory=dict)
    n_teachers: int = 1
    prevalence: dict[str, float] = field(default_factory=dict)
    adabn_shares: tuple[float, ...] | None = None

    @property
    def in_domain(self) -> str:
        return next(iter(self.datasets))

    def eval_sets(self) -> list[tuple[str, str]]:
        """``(set name, split)`` of every scoring: in-domain validation and test, then each external test split."""
        return [(self.in_domain, "validation"), (self.in_domain, "test")] + [
            (name, "test") for name in self.datasets if name != self.in_domain
        ]


def cell_dir(run_dir: str | os.PathLike, cell: Cell) -> Path:
    """``<run dir>/cells/<cell name>``: the cell's ``bundle_root``."""
    return Path(run_dir) / "cells" / cell.name


def _cli_value(value: object) -> str:
    """A value as ``python -m monai.bundle run`` (python-fire) reads it back."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli_value(v) for v in value) + "]"
    return str(value)


def bundle_command(config_files: list[str], run_id: str | None, overrides: Mapping[str, object]) -> str:
    """The ``python -m monai.bundle run ...`` command line equivalent to :func:`run_bundle`."""
    files = [f"configs/{f}" for f in config_files]
    config = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    parts = ["python", "-m", "monai.bundle", "run"] + ([run_id] if run_id else []) + ["--config_file", config]
    for key, value in overrides.items():
        parts += [f"--{key}", _cli_value(value)]
    return " ".join(shlex.quote(p) for p in parts)


@contextlib.contextmanager
def _in_bundle_root() -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Send the process's standard output and error (MONAI's handlers log there) and every ``logging`` record to
    ``path`` meanwhile, so that a study's console shows its progress only."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.setLevel(saved_root[0])
            root.handlers = saved_root[1]
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            os.close(saved_fds[0])
            os.close(saved_fds[1])


def run_bundle(config_files: list[str], run_id: str, overrides: Mapping[str, object], workflow_type: str):
    """Run the bundle's configs with MONAI's ``ConfigWorkflow`` (as ``python -m monai.bundle run`` does), from the
    repository root; returns the finished workflow."""
    from monai.bundle import ConfigWorkflow

    with _in_bundle_root():
        workflow = ConfigWorkflow(
            config_file=[f"configs/{f}" for f in config_files],
            meta_file="configs/metadata.json",
            logging_file=False,  # the study routes logs to the cell's log file (see log_to)
            run_id=run_id,
            workflow_type=workflow_type,
            **overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    return workflow


def hardware() -> dict:
    """Where a cell ran: CPU model and cores, torch threads, GPU, library versions, load average."""
    import monai
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _predictions(run_dir: Path, datalist: str, split: str) -> dict:
    """Per-scan PD scores of an evaluation run (MONAI ``ClassificationSaver``: file, P(HC), P(PD)) with labels."""
    path = run_dir / "predictions.csv"
    if not path.is_file():
        raise RuntimeError(f"the evaluation wrote no predictions at {path}.")
    with path.open() as f:
        scores = {row[0]: float(row[2]) for row in csv.reader(f) if row}
    entries = load_datalist(datalist, split)
    missing = [e["image"] for e in entries if e["image"] not in scores]
    if missing:
        raise RuntimeError(f"{path} has no prediction for {len(missing)} scan(s), e.g. {missing[0]}.")
    return _scored(entries, [scores[e["image"]] for e in entries])


def _scored(entries: list[dict], scores: list[float]) -> dict:
    order = sorted(range(len(entries)), key=lambda i: str(entries[i]["image"]))
    return {
        "files": [Path(str(entries[i]["image"])).name for i in order],
        "labels": [int(entries[i]["label"]) for i in order],
        "scores": [float(scores[i]) for i in order],
    }


def development_prevalence(datalist: str) -> float:
    """PD share of the in-domain training and validation scans (the default assumed prevalence of a new site)."""
    labels = [e["label"] for split in ("training", "validation") for e in load_datalist(datalist, split)]
    return sum(labels) / len(labels)


def operating_metrics(
    ctx: StudyContext, predictions: dict[str, dict], default_threshold: float, fixed: bool = False
) -> tuple[dict, dict]:
    """Thresholds and metrics of a cell at every operating point (see :mod:`scripts.study.operating`).

    Returns:
        ``(thresholds, metrics)``: ``thresholds = {"default": t, "validation": t}`` and ``metrics[set/split][op]``
        the :func:`scripts.metrics.classification_report` at operating point ``op``; test sets also get
        ``"recalibrated"`` (with the assumed prevalence in ``metrics[set/split]["assumed_prevalence"]``). With
        ``fixed`` (a rule without a ranking, always-PD) every operating point is the default threshold.
    """
    val = predictions[f"{ctx.in_domain}/validation"]
    youden = float(default_threshold) if fixed else youden_threshold(val["labels"], val["scores"])
    thresholds = {"default": float(default_threshold), "validation": youden}
    dev = development_prevalence(ctx.datasets[ctx.in_domain])
    metrics: dict[str, dict] = {}
    for key, pred in predictions.items():
        name, split = key.split("/")
        if split == "training":
            continue
        out = {op: classification_report(pred["labels"], pred["scores"], t) for op, t in thresholds.items()}
        if split == "test":
            prevalence = float(ctx.prevalence.get(name, dev))
            t = float(default_threshold) if fixed else prevalence_threshold(pred["scores"], prevalence)
            out["recalibrated"] = {**classification_report(pred["labels"], pred["scores"], t), "threshold": t}
            out["assumed_prevalence"] = prevalence
        metrics[key] = out
    return thresholds, metrics


# ----------------------------------------------------------------------------------------------------------------
# network cells
# ----------------------------------------------------------------------------------------------------------------
def volumes_dir(ctx: StudyContext) -> str:
    """The study's preprocessed scans, shared by its cells: each scan is decoded, resampled and normalised once per
    preprocessing chain (data set, grid, intensity, projection), in files named by the hash of the scan's entry and
    of the transforms (:class:`scripts.fast_data.PreprocessedOnce`, MONAI ``PersistentDataset``).

    ``""`` (nothing shared: every cell preprocesses its own scans, as before the study shared them) when the study
    was started with ``--set shared_cache_dir=``; the benchmark of study throughput compares the two."""
    if ctx.settings.get("shared_cache_dir") == "":
        return ""
    return str(Path(ctx.run_dir) / "volumes")


def network_overrides(ctx: StudyContext, cell: Cell) -> dict:
    """Every override of a network cell's training run, in command-line order."""
    root = cell_dir(ctx.run_dir, cell)
    datalist = Path(ctx.datasets[ctx.in_domain])
    kind_settings = ctx.teacher_settings if cell.kind == "teacher" else ctx.student_settings
    out = {
        "bundle_root": str(root),
        "dataset_dir": str(datalist.parent),
        "datalist_file": str(datalist),
        "synthetic_data": False,
        "run_name": "train",
        "publish": False,  # the cell's models are read from its run folder (best_checkpoint): no second copy
        "progress_bar": False,
        "shared_cache_dir": volumes_dir(ctx),
        **ctx.settings,
        **cell.schedule(kind_settings),
        **cell.overrides(),
    }
    teacher = cell.teacher(ctx.n_teachers)
    if teacher is not None:
        out["teacher_ckpt"] = str(best_checkpoint(ctx.run_dir, teacher))
    return out


def best_checkpoint(run_dir: str | os.PathLike, cell: Cell) -> Path:
    """The cell's own best checkpoint (by the validation ``selection_metric``), written by the training run's
    ``CheckpointSaver``."""
    name = "teacher.pt" if cell.kind == "teacher" else ("model.pt" if cell.kd else "model_nokd.pt")
    return cell_dir(run_dir, cell) / "eval" / "train" / name


def _validation_log(workflow) -> dict:
    parser = workflow.parser
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    return {
        "epochs": int(trainer.state.epoch),
        "selection_metric": str(evaluator.state.key_metric_name),
        "best_val_metric": float(evaluator.state.best_metric),
        "best_epoch": int(evaluator.state.best_metric_epoch),
    }


def _run_network_cell(ctx: StudyContext, cell: Cell, record: dict) -> None:
    config = TRAIN_CONFIG[cell.kind]
    overrides = network_overrides(ctx, cell)
    if cell.kind == "student" and cell.kd and not Path(overrides["teacher_ckpt"]).is_file():
        raise RuntimeError(f"{cell.name}: its teacher's checkpoint {overrides['teacher_ckpt']} does not exist.")
    record["overrides"] = overrides
    record["commands"].append(bundle_command([config], "training", overrides))
    start = time.perf_counter()
    workflow = run_bundle([config], "training", overrides, "train")
    record["training"] = _validation_log(workflow)
    del workflow
    gc.collect()
    record["seconds"]["train"] = time.perf_counter() - start
    checkpoint = best_checkpoint(ctx.run_dir, cell)
    if not checkpoint.is_file():
        raise RuntimeError(f"{cell.name}: training wrote no best checkpoint at {checkpoint}.")
    record["checkpoint"] = str(checkpoint)
    if "teacher_ckpt" in overrides:
        record["teacher_checkpoint"] = overrides["teacher_ckpt"]

    start = time.perf_counter()
    record["predictions"] = score_network(ctx, cell, checkpoint, overrides, record["commands"], ctx.eval_sets())
    record["seconds"]["evaluate"] = time.perf_counter() - start
    record["thresholds"], record["metrics"] = operating_metrics(ctx, record["predictions"], 0.5)
    from scripts.study.adaptation import ADAPTED_KEY, adabn_predictions, measures_adabn

    if measures_adabn(ctx, cell):  # the external sets re-scored after AdaBN (site adaptation)
        start = time.perf_counter()
        record[ADAPTED_KEY] = adabn_predictions(ctx, cell, checkpoint)
        gc.collect()
        record["seconds"]["adabn"] = time.perf_counter() - start


def _free_run_name(eval_dir: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... when an earlier (interrupted) scoring left that run folder: a run never
    writes into another run's folder (:func:`scripts.runs.claim_run_folder`)."""
    name, k = base, 1
    while (eval_dir / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def score_network(
    ctx: StudyContext,
    cell: Cell,
    checkpoint: Path,
    overrides: Mapping[str, object],
    commands: list[str],
    sets: list[tuple[str, str]],
) -> dict[str, dict]:
    """Score ``checkpoint`` on every ``(set name, split)`` of ``sets`` through ``configs/evaluate.json`` (the
    equivalent command lines appended to ``commands``); ``{"<set>/<split>": {"files", "labels", "scores"}}``."""
    config = TRAIN_CONFIG[cell.kind]
    predictions = {}
    for name, split in sets:
        datalist = ctx.datasets[name]
        run_name = _free_run_name(cell_dir(ctx.run_dir, cell) / "eval", f"eval-{name}-{split}")
        evaluation = {
            **overrides,
            "run_name": run_name,
            "dataset_dir": str(Path(datalist).parent),
            "datalist_file": str(datalist),
            "eval_split": split,
            "eval_checkpoint": str(checkpoint),
            "evaluate#dataset": {  # read from (or written once to) the study's preprocessed scans
                "_target_": "scripts.fast_data.cached_dataset",
                "data": "@evaluate#datalist",
                "transform": "@validate#preprocessing",
                "shared_dir": volumes_dir(ctx),
            },
        }
        commands.append(bundle_command([config, "evaluate.json"], None, evaluation))
        run_bundle([config, "evaluate.json"], "run", evaluation, "infer")
        gc.collect()
        predictions[f"{name}/{split}"] = _predictions(cell_dir(ctx.run_dir, cell) / "eval" / run_name, datalist, split)
    return predictions


# ----------------------------------------------------------------------------------------------------------------
# baseline cells
# ----------------------------------------------------------------------------------------------------------------
# Each runner scores the ``(set name, split)`` pairs it is given, adds them to the record's predictions (or
# centres) and recomputes the metrics of every set the record holds.
def _run_sbr(ctx: StudyContext, record: dict, sets: list[tuple[str, str]]) -> None:
    from scripts.sbr import SBRThresholdClassifier, datalist_sbr

    start = time.perf_counter()
    if "sbr_threshold" in record:  # fitted when the cell ran (a set added later): not read and fitted again
        clf = SBRThresholdClassifier(record["sbr_threshold"])
    else:
        entries, feats = datalist_sbr(ctx.datasets[ctx.in_domain], "training")
        clf = SBRThresholdClassifier().fit([f["lowest_putamen"] for f in feats], [e["label"] for e in entries])
    predictions = record.setdefault("predictions", {})
    for name, split in sets:
        entries, feats = datalist_sbr(ctx.datasets[name], split)
        predictions[f"{name}/{split}"] = _scored(entries, list(clf.pd_score([f["lowest_putamen"] for f in feats])))
    record["sbr_threshold"] = clf.threshold
    record["thresholds"], record["metrics"] = operating_metrics(ctx, predictions, -clf.threshold)
    record["seconds"]["evaluate"] = record["seconds"].get("evaluate", 0.0) + time.perf_counter() - start


def _run_always_pd(ctx: StudyContext, record: dict, sets: list[tuple[str, str]]) -> None:
    predictions = record.setdefault("predictions", {})
    for name, split in sets:
        entries = load_datalist(ctx.datasets[name], split)
        predictions[f"{name}/{split}"] = _scored(entries, [1.0] * len(entries))
    record["thresholds"], record["metrics"] = operating_metrics(ctx, predictions, 0.5, fixed=True)


def _run_centres(ctx: StudyContext, record: dict, sets: list[tuple[str, str]]) -> None:
    """The centre slice of every view under ``slice_centre: auto`` and ``template``, for every scored scan."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose
    from scripts.projections import VIEWS, AdjacentSlices

    parser = ConfigParser()
    with _in_bundle_root():
        parser.read_config("configs/inference.json")
    parser.update({k: v for k, v in ctx.settings.items() if k in ("spatial_size", "num_slices")})
    preprocessing = Compose(parser.get_parsed_content("volume_transforms"))
    num_slices = int(parser.get_parsed_content("num_slices"))
    finders = {c: AdjacentSlices(VIEWS, centre=c, num_slices=num_slices) for c in ("auto", "template")}
    start = time.perf_counter()
    centres = record.setdefault("centres", {})
    for name, split in sets:
        entries = load_datalist(ctx.datasets[name], split)
        rows = {c: {v: [] for v in VIEWS} for c in finders}
        for entry in entries:
            image = preprocessing({"image": entry["image"]})["image"]
            for c, finder in finders.items():
                for v, index in finder.centres(image).items():
                    rows[c][v].append(index)
        scored = _scored(entries, [0.0] * len(entries))
        order = sorted(range(len(entries)), key=lambda i: str(entries[i]["image"]))
        centres[f"{name}/{split}"] = {
            "files": scored["files"],
            "labels": scored["labels"],
            **{c: {v: [rows[c][v][i] for i in order] for v in VIEWS} for c in finders},
        }
    record["seconds"]["evaluate"] = record["seconds"].get("evaluate", 0.0) + time.perf_counter() - start


BASELINE_RUNNERS = {"sbr": _run_sbr, "always_pd": _run_always_pd, "centres": _run_centres}


def run_cell(ctx: StudyContext, cell: Cell) -> dict:
    """Train and score ``cell`` (in this process) and return its results record.

    The record holds the cell's axes, its config overrides and the equivalent commands, per-scan PD scores and
    labels of every scored split, thresholds and metrics at every operating point, training log (epochs, best
    validation F1), wall and CPU seconds, hardware and the finishing time. Logs go to ``<cell dir>/log.txt``.
    """
    folder = cell_dir(ctx.run_dir, cell)
    folder.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "cell": cell.name,
        "group": cell.group,
        "axes": cell.as_dict(),
        "commands": [],
        "seconds": {},
        "hardware": hardware(),
    }
    if cell.kind != "baseline":
        teacher = cell.teacher(ctx.n_teachers)
        record["teacher_cell"] = teacher.name if teacher is not None else None
    wall, cpu = time.perf_counter(), time.process_time()
    with log_to(folder / "log.txt"):
        if cell.kind == "baseline":
            BASELINE_RUNNERS[cell.baseline](ctx, record, ctx.eval_sets())
        else:
            _run_network_cell(ctx, cell, record)
    record["seconds"]["total"] = time.perf_counter() - wall
    record["cpu_seconds"] = time.process_time() - cpu
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


@contextlib.contextmanager
def _logged_failure(name: str) -> Iterator[None]:
    """Write the traceback of an exception leaving the block to the log (the cell's ``log.txt``), then re-raise."""
    try:
        yield
    except Exception:
        logging.getLogger(__name__).exception("%s: scoring failed", name)
        raise


_FOLDER_OVERRIDES = ("bundle_root", "shared_cache_dir", "teacher_ckpt")
"""Overrides that name places in the study folder: taken from where the folder is now, the others from the record."""


def unscored_sets(record: Mapping, names: list[str]) -> list[str]:
    """The external sets of ``names`` whose test split ``record`` has not scored yet."""
    scored = record.get("centres") if record.get("axes", {}).get("baseline") == "centres" else record.get("predictions")
    return [n for n in names if f"{n}/test" not in (scored or {})]


def score_added_sets(ctx: StudyContext, record: dict, names: list[str]) -> dict:
    """Score a finished cell's ``record`` on the external sets ``names`` (test splits) added to its study after it
    ran (``python -m scripts.study add-external``), with the cell's own best checkpoint and config overrides (the
    ones naming places in the study folder taken from where it is now);
    returns the record with those sets' predictions and every set's metrics. Logs go to the cell's ``log.txt``.

    Raises:
        RuntimeError: when a network cell's best checkpoint is no longer on disk.
    """
    cell = Cell.from_dict(record["axes"])
    sets = [(name, "test") for name in names]
    start = time.perf_counter()
    with log_to(cell_dir(ctx.run_dir, cell) / "log.txt"), _logged_failure(cell.name):
        if cell.kind == "baseline":
            BASELINE_RUNNERS[cell.baseline](ctx, record, sets)
        else:
            checkpoint = best_checkpoint(ctx.run_dir, cell)  # where the folder is now (it may have been moved)
            if not checkpoint.is_file():
                raise RuntimeError(f"{cell.name}: its best checkpoint {checkpoint} is no longer on disk.")
            here = {k: v for k, v in network_overrides(ctx, cell).items() if k in _FOLDER_OVERRIDES}
            added = score_network(ctx, cell, checkpoint, {**record["overrides"], **here}, record["commands"], sets)
            record["predictions"].update(added)
            record["thresholds"], record["metrics"] = operating_metrics(ctx, record["predictions"], 0.5)
    record["seconds"]["added_sets"] = record["seconds"].get("added_sets", 0.0) + time.perf_counter() - start
    record.setdefault("added_sets", []).extend(names)
    return record
