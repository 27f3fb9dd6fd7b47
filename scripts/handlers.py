# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Event handlers that MONAI does not ship: checkpoint publishing, streaming per-scan predictions (with a row for
every scan that could not be scored), projection PNGs.

Metrics, metric files and checkpoints of a run use MONAI's and ignite's own handlers (see the configs).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from scripts.errors import InputError
from scripts.transforms import FAILED_KEY, WARNINGS_KEY

__all__ = [
    "PublishCheckpoint",
    "PredictionSaver",
    "skip_failed_scans",
    "ProjectionPNGSaver",
    "atomic_write_json",
    "f1_macro",
    "accuracy",
    "roc_auc",
    "sensitivity",
    "specificity",
    "SELECTION_METRICS",
]

SELECTION_METRICS = ("f1_macro", "auc", "auc_ce", "accuracy")
"""Validation metrics a training run may select its best checkpoint (and stop early) by: the ``selection_metric``
option; ``validate#metrics`` in ``configs/train_teacher.json`` holds them. ``f1_macro`` and ``accuracy`` score the
arg-max class, so a network that still calls every validation scan PD scores the same epoch after epoch and the
first such epoch is kept; ``auc`` (ROC AUC) is threshold-free and moves with the ranking, which is what the
operating point chosen on validation uses. On a small validation split ROC AUC saturates too (every epoch after
the first perfect ranking scores 1.000, and the first is kept); ``auc_ce`` (:func:`roc_auc_then_ce`) breaks such
ties by the validation cross-entropy (the study's low-data cells select by it)."""


def atomic_write_json(path: str | os.PathLike, content: object) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _batch_images(batch, key: str = "image") -> list:
    """The per-scan images of an engine batch (MONAI engines decollate ``state.batch`` into a list of dicts)."""
    if isinstance(batch, list):
        return [item[key] for item in batch if isinstance(item, dict) and key in item]
    if isinstance(batch, dict) and key in batch:
        return list(batch[key])
    return []


def _filenames(batch, key: str = "image") -> list[str]:
    """The source file of each scan in an engine batch, from the image meta data (empty when unknown)."""
    if isinstance(batch, dict) and isinstance(batch.get(key), MetaTensor):
        names = batch[key].meta.get("filename_or_obj")
        names = names if isinstance(names, (list, tuple)) else [names]
        return [str(n) for n in names] if all(names) else []
    names = []
    for image in _batch_images(batch, key):
        name = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
        if not name:
            return []
        names.append(str(name))
    return names


@contextlib.contextmanager
def _exclusive(folder: Path):
    """An exclusive inter-process lock on ``folder`` itself (POSIX ``flock``; no lock where it is unavailable)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _replace_atomically(source: Path, destination: Path) -> None:
    """Copy ``source`` over ``destination`` through a uniquely named temporary file in the same folder."""
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _score(info: dict | None) -> tuple[str | None, str | None, float | None]:
    validation = (info or {}).get("validation") or {}
    score = validation.get("score")
    return validation.get("metric"), validation.get("split"), float(score) if isinstance(score, (int, float)) else None


def _better_backup(backup: Path, current: Path) -> bool:
    """Whether ``backup`` (``models/previous/<name>``) scored better than ``current`` on the same metric and split,
    so that replacing ``current`` must not push it out (a better model never leaves ``models/`` and
    ``models/previous/`` through publishing)."""
    from scripts.checkpoints import read_checkpoint

    if not backup.is_file():
        return False
    try:
        (_, old), (_, new) = read_checkpoint(backup, "previous"), read_checkpoint(current, "published")
    except InputError:
        return False
    (m0, s0, v0), (m1, s1, v1) = _score(old), _score(new)
    return m0 == m1 and s0 == s1 and v0 is not None and v1 is not None and v0 > v1


class PublishCheckpoint:
    """Publish a run's best checkpoint to the bundle's ``models/`` folder when training completes.

    Each run keeps its own best checkpoint in its run folder; the copy in ``models/`` is what the other configs,
    export and MONAI Label load, so publishing is careful:

    * it is refused (a warning, the run's own checkpoint stays) when the published model scored better on the same
      validation split with the same metric (as recorded in both checkpoints, see
      :class:`scripts.checkpoints.DescribedModel`), unless ``overwrite``;
    * the previous file is kept as ``models/previous/<name>``;
    * the copy goes through a uniquely named temporary file and an atomic rename, under an inter-process lock, so
      concurrent runs never mix their files and a reader never sees a half-written one.

    Args:
        source: the run's checkpoint file.
        destination: the bundle file to update, e.g. ``models/teacher.pt``.
        overwrite: publish even when the published model scored better.

    A run that wrote no checkpoint (its validation never ran) leaves the destination unchanged, with a warning.
    """

    def __init__(self, source: str | os.PathLike, destination: str | os.PathLike, overwrite: bool = False) -> None:
        from scripts.options import parse_bool

        self.source = Path(source)
        self.destination = Path(destination)
        self.overwrite = parse_bool(overwrite, "overwrite")
        self.backup = self.destination.parent / "previous" / self.destination.name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        logger = getattr(engine, "logger", None) or logging.getLogger(__name__)
        if not self.source.is_file():
            logger.warning(
                f"training finished without a checkpoint in {self.source}: no validation ran (is val_interval larger "
                f"than max_epochs?); {self.destination} left unchanged."
            )
            return
        try:
            self.publish(logger)
        except OSError as e:  # a full disk, a read-only models/: the published files are untouched
            raise InputError(
                f"cannot publish {self.source} to {self.destination}: {e.strerror or e}; {self.destination} is "
                f"unchanged and this run's best checkpoint is in {self.source}: copy it there when the folder is "
                "writable and has space."
            ) from None

    def publish(self, logger: logging.Logger | None = None) -> bool:
        """Apply the policy; return whether the destination now holds the source."""
        from scripts.checkpoints import read_checkpoint

        logger = logger or logging.getLogger(__name__)
        _, new = read_checkpoint(self.source, "run")
        metric, split, score = _score(new)
        with _exclusive(self.destination.parent):
            if self.destination.is_file() and not self.overwrite:
                try:
                    _, old = read_checkpoint(self.destination, "published")
                except InputError as e:
                    logger.warning(f"{e} It will be replaced (and kept as {self.backup}).")
                    old = None
                old_metric, old_split, old_score = _score(old)
                # scores on two known, different splits are not comparable; an unrecorded split is not taken as
                # different (a better model is never replaced on a guess)
                comparable = old_metric == metric and (split is None or old_split is None or split == old_split)
                if comparable and score is not None and old_score is not None and old_score > score:
                    where = (
                        "on the same validation split" if split == old_split else "(a validation split is not recorded)"
                    )
                    logger.warning(
                        f"{self.destination} kept: it scored {metric} {old_score:.4f} {where}, "
                        f"this run's best is {score:.4f} ({self.source}). Pass --overwrite true to publish it anyway."
                    )
                    return False
            self.destination.parent.mkdir(parents=True, exist_ok=True)
            kept = ""
            if self.destination.is_file():
                self.backup.parent.mkdir(parents=True, exist_ok=True)
                if _better_backup(self.backup, self.destination):
                    kept = f"; {self.backup} (a better model) is kept"
                else:
                    _replace_atomically(self.destination, self.backup)
                    kept = f"; the previous one is kept as {self.backup}"
            _replace_atomically(self.source, self.destination)
        scored = f" ({metric} {score:.4f})" if score is not None else ""
        logger.info(f"best checkpoint {self.source}{scored} published to {self.destination}{kept}")
        return True


def _stem(path: str) -> str:
    name = os.path.basename(str(path).rstrip("/"))
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def skip_failed_scans(engine: Engine, batchdata: dict) -> Any:
    """``iteration_update`` of the inference evaluator: MONAI's iteration on the scans that were read.

    The batch comes from :func:`scripts.transforms.collate_with_failures`: its failures (scans the preprocessing
    refused) are moved to ``engine.state.failed_scans`` for :class:`PredictionSaver`; the network runs on the rest
    through the evaluator's own ``_iteration`` (every MONAI event fires as usual). A batch of failures only gives
    an empty output.
    """
    failed = batchdata.pop(FAILED_KEY, []) if isinstance(batchdata, dict) else []
    engine.state.failed_scans = failed
    if isinstance(batchdata, dict) and "image" not in batchdata:
        return []
    return engine._iteration(engine, batchdata)


class PredictionSaver:
    """Write one row per scan to ``<output_dir>/predictions.csv`` as the scans are scored, and a JSON summary.

    Columns: ``image``, ``pd_probability``, ``predicted_class``, ``predicted_label``, ``projection``, ``warnings``
    (checks a scan failed but was used anyway, ``--allow_nonstandard_input``), ``error`` (why a scan could not be
    scored; its probability and class are then empty). Rows are appended and flushed after every iteration, so an
    interrupted run keeps what it scored. ``predictions.json`` (model file, threshold, counts, rows) is written when
    the evaluator completes. ``pred`` must hold class probabilities (the configs' postprocessing applies the
    softmax); channel 1 is PD. :meth:`raise_on_failures` (the inference config's last step) ends the run with an
    error, hence a non-zero exit status, when a scan could not be scored.

    Args:
        output_dir: folder of the outputs (created when needed).
        projection: the 3D→2D projection the network saw (``"none (3D)"`` for the teacher), written per row.
        model_file: the weights used, written in the JSON header.
        threshold: PD decision threshold.
    """

    FIELDS = ("image", "pd_probability", "predicted_class", "predicted_label", "projection", "warnings", "error")

    def __init__(
        self, output_dir: str | os.PathLike, projection: str, model_file: str = "", threshold: float = 0.5
    ) -> None:
        self.output_dir = Path(output_dir)
        self.projection = projection
        self.model_file = str(model_file)
        self.threshold = threshold
        self.rows: list[dict] = []
        self.csv_path = self.output_dir / "predictions.csv"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    @property
    def failures(self) -> list[dict]:
        return [row for row in self.rows if row["error"]]

    def _start(self, engine: Engine) -> None:
        self.rows.clear()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("w", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writeheader()

    def _collect(self, engine: Engine) -> None:
        new = []
        output = engine.state.output
        if output:
            preds = output["pred"] if isinstance(output, dict) else [o["pred"] for o in output]
            probs = torch.stack([torch.as_tensor(p) for p in preds]) if isinstance(preds, list) else preds
            probs = probs.float().reshape(probs.shape[0], -1)
            names = _filenames(engine.state.batch) or [f"scan_{len(self.rows) + i}" for i in range(len(probs))]
            warnings = _batch_values(engine.state.batch, WARNINGS_KEY, len(probs))
            for name, p, warning in zip(names, probs[:, 1].tolist(), warnings):
                predicted = int(p >= self.threshold)
                new.append(
                    {
                        "image": name,
                        "pd_probability": round(float(p), 6),
                        "predicted_class": predicted,
                        "predicted_label": "PD" if predicted else "HC",
                        "projection": self.projection,
                        "warnings": warning,
                        "error": "",
                    }
                )
        for failure in getattr(engine.state, "failed_scans", None) or []:
            new.append(
                {
                    "image": failure["image"],
                    "pd_probability": "",
                    "predicted_class": "",
                    "predicted_label": "",
                    "projection": self.projection,
                    "warnings": "",
                    "error": failure["reason"],
                }
            )
            engine.logger.warning(f"not scored: {failure['reason']}")
        if not new:
            return
        self.rows.extend(new)
        with self.csv_path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerows(new)
            f.flush()

    def _write(self, engine: Engine) -> None:
        failed = len(self.failures)
        atomic_write_json(
            self.output_dir / "predictions.json",
            {
                "model_file": self.model_file,
                "threshold": self.threshold,
                "scored": len(self.rows) - failed,
                "failed": failed,
                "predictions": self.rows,
            },
        )
        engine.logger.info(f"{len(self.rows) - failed} predictions and {failed} error rows written to {self.csv_path}")

    def raise_on_failures(self) -> None:
        """Raise an :class:`InputError` when a scan could not be scored (after every other scan was)."""
        failures = self.failures
        if failures:
            first = failures[0]["error"].rstrip(".")
            raise InputError(
                f"{len(failures)} of {len(self.rows)} scans could not be scored (first: {first}); every other scan "
                f"has its prediction in {self.csv_path}, and each failed scan an error row."
            )


def _batch_values(batch: Any, key: str, n: int) -> list[str]:
    """The ``key`` string of each scan of an engine batch (``""`` where absent)."""
    if isinstance(batch, list):
        values = [str(item.get(key, "")) if isinstance(item, dict) else "" for item in batch]
    elif isinstance(batch, dict) and isinstance(batch.get(key), (list, tuple)):
        values = [str(v) for v in batch[key]]
    else:
        values = []
    return values + [""] * (n - len(values)) if len(values) < n else values[:n]


class ProjectionPNGSaver:
    """Save the 2D image each scan was given to the student as a PNG, so a reader sees what it saw.

    Channels are min–max scaled per channel and placed side by side; each image is rotated by 90° so that
    anterior / superior points up. Written to ``<output_dir>/<scan name>.png``.
    """

    def __init__(self, output_dir: str | os.PathLike, image_key: str = "image") -> None:
        self.output_dir = Path(output_dir)
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from PIL import Image

        images = _batch_images(engine.state.batch, self.image_key)
        names = _filenames(engine.state.batch, self.image_key)
        names = names or [f"scan_{engine.state.iteration}_{i}" for i in range(len(images))]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name, image in zip(names, images):
            x = torch.as_tensor(image).detach().float().cpu()
            if x.ndim != 3:
                raise ValueError(f"{name}: expected a (C, H, W) 2D input to save as PNG, got shape {tuple(x.shape)}.")
            tiles = []
            for channel in x:
                lo, hi = channel.min(), channel.max()
                channel = (channel - lo) / (hi - lo) if hi > lo else channel * 0
                tiles.append(torch.rot90(channel, 1, dims=(0, 1)))
            array = (torch.cat(tiles, dim=1).numpy() * 255).round().astype("uint8")
            Image.fromarray(array).save(self.output_dir / f"{_stem(name)}.png")


# --------------------------------------------------------------------------------------------------------------------
# validation metrics computed once per validation, on device tensors
# --------------------------------------------------------------------------------------------------------------------
def _scores_and_labels(pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities ``(N, C)`` as float32 and integer labels ``(N,)`` of a whole validation."""
    pred = pred.float()
    if pred.ndim == 1:  # ignite's EpochMetric squeezes a single-column prediction
        pred = pred[:, None]
    return pred, label.reshape(-1).long()


def _onehot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(label, num_classes).float()


def _item(value: Any) -> float:
    """A metric's value as MONAI's metric handlers report it (first of a list, a squeezed tensor as a number)."""
    if isinstance(value, (list, tuple)):
        value = value[0]
    if isinstance(value, torch.Tensor):
        value = value.squeeze()
        return float(value.item()) if value.ndim == 0 else value
    return float(value)


def f1_macro(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Macro F1 of every prediction of a validation at once: the mean over classes of the per-class F1, as ignite's
    ``Fbeta(beta=1, average=True)`` computes it (same epsilons).

    Written with tensor operations rather than by calling ignite's metric: ``EpochMetric`` calls this on rank 0 only
    after gathering every rank's predictions, and ignite's own metrics would then wait for an all-reduce that the
    other ranks never join (a multi-GPU run hung at its first validation)."""
    pred, label = _scores_and_labels(pred, label)
    classes = torch.arange(pred.shape[1], device=pred.device)
    predicted = pred.argmax(dim=1)[:, None] == classes
    actual = label[:, None] == classes
    tp = (predicted & actual).sum(dim=0).double()
    precision = tp / (predicted.sum(dim=0).double() + 1e-20)
    recall = tp / (actual.sum(dim=0).double() + 1e-20)
    return float((2 * precision * recall / (precision + recall + 1e-15)).mean().item())


def accuracy(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Accuracy of the arg-max class over a whole validation (tensor operations; see :func:`f1_macro` for why not
    ignite's ``Accuracy``)."""
    pred, label = _scores_and_labels(pred, label)
    return float((pred.argmax(dim=1) == label).double().mean().item())


def roc_auc(pred: torch.Tensor, label: torch.Tensor) -> float:
    """ROC AUC (MONAI ``compute_roc_auc``, macro over the one-hot classes) of a whole validation.

    MONAI's functional forms, not its ``Cumulative`` metric classes: those gather every rank's buffer when they
    aggregate, and ``EpochMetric`` calls this on rank 0 only (see :func:`f1_macro`)."""
    from monai.metrics import compute_roc_auc

    pred, label = _scores_and_labels(pred, label)
    return _item(compute_roc_auc(pred, _onehot(label, pred.shape[1]), average="macro"))


def roc_auc_then_ce(pred: torch.Tensor, label: torch.Tensor) -> float:
    """ROC AUC with ties broken by the lower cross-entropy: ``auc - step / 4 * ce / (1 + ce)`` (not below 0).

    With ``step = 1 / (n_PD * n_HC)``, two ROC AUCs of this split differ by at least ``step / 2`` (a tied PD/HC
    pair counts half), and the penalty stays below ``step / 4``, so the order of two different AUCs never changes;
    among epochs of equal AUC (a saturated 1.000 on a small split) the better-calibrated one scores higher. The
    value is at most the AUC and within ``step / 4`` of it. ``pred`` holds class probabilities (the validation
    postprocessing's softmax)."""
    probs, labels = _scores_and_labels(pred, label)
    auc = roc_auc(pred, label)
    n_pd = int((labels == 1).sum())
    step = 1.0 / max(1, n_pd * (labels.numel() - n_pd))
    picked = probs.gather(1, labels[:, None]).clamp_min(1e-12)
    ce = float(-picked.log().mean())
    return max(0.0, auc - 0.25 * step * ce / (1.0 + ce))


def _confusion(pred: torch.Tensor, label: torch.Tensor, name: str) -> float:
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    pred, label = _scores_and_labels(pred, label)
    onehot = _onehot(pred.argmax(dim=1), pred.shape[1])
    counts = get_confusion_matrix(onehot, _onehot(label, pred.shape[1]), include_background=False).sum(dim=0)
    return _item(compute_confusion_matrix_metric(name, counts).nanmean())


def sensitivity(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Sensitivity of the PD class (MONAI ``ConfusionMatrixMetric``, background excluded) of a whole validation."""
    return _confusion(pred, label, "sensitivity")


def specificity(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Specificity of the PD class (MONAI ``ConfusionMatrixMetric``, background excluded) of a whole validation."""
    return _confusion(pred, label, "specificity")
