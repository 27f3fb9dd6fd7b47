# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Event handlers that MONAI does not ship: checkpoint publishing, streaming per-scan predictions (with a row for
every scan that could not be scored), projection PNGs, the new-site adaptation of inference (:class:`SiteAdapter`).

Metric files and checkpoints of a run use MONAI's and ignite's own handlers (see the configs); the validation
metric functions those handlers call are in :mod:`scripts.metrics`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from scripts.errors import InputError, _running_cli
from scripts.site_adaptation import (
    EXIT_REFUSED,
    MIN_SCANS,
    SiteAdaptationRefusedError,
    SourceScores,
    adapt_batchnorm,
    adapt_scores,
    parse_methods,
)
from scripts.transforms import FAILED_KEY, WARNINGS_KEY

__all__ = [
    "PublishCheckpoint",
    "PredictionSaver",
    "skip_failed_scans",
    "ProjectionPNGSaver",
    "atomic_write_json",
    "SiteAdapter",
]


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
        self.scores: dict[str, float] = {}
        """P(PD) of every scored scan at full precision (the CSV rounds to 6 decimals), by its ``image`` name."""
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
        self.scores.clear()
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
                self.scores[name] = p
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


class SiteAdapter:
    """The ``--site_adaptation`` option of ``configs/inference.json`` (the methods: :mod:`scripts.site_adaptation`).

    Attached to the evaluator (after its ``CheckpointLoader``), it re-estimates the batch-norm statistics on the
    site's scans when ``adabn`` is asked for, before any scan is scored. :meth:`finish` (a ``run`` step after the
    evaluator) applies the score method to the scores :class:`PredictionSaver` collected (at full precision), writes
    ``site_adaptation.json`` (method, estimated PD share, threshold, fit details) next to ``predictions.csv``, and
    adds the adapted decision to ``predictions.csv`` (``adapted_class``, ``adapted_label``). A refusal is recorded
    there too; :meth:`raise_on_refusal` (the last ``run`` step) then ends the command line with a one-line error
    and exit status :data:`scripts.site_adaptation.EXIT_REFUSED`.

    Args:
        methods: the ``--site_adaptation`` value (see :func:`scripts.site_adaptation.parse_methods`).
        prediction_saver: the run's :class:`PredictionSaver`.
        model_file: the checkpoint (its recorded validation scores calibrate ``em`` and ``bbse``).
        min_scans: minimum number of the site's scans.
    """

    def __init__(self, methods: str, prediction_saver: Any, model_file: str = "", min_scans: int = MIN_SCANS):
        self.spec = str(methods)
        self.adabn, self.method = parse_methods(methods)
        self.saver = prediction_saver
        self.model_file = str(model_file)
        try:
            self.min_scans = int(min_scans)
        except (TypeError, ValueError):
            raise InputError(f"--site_adaptation_min_scans must be an integer, got {min_scans!r}.") from None
        self.refusal: str | None = None
        self.result: dict[str, Any] | None = None
        self.adabn_scans = 0

    @property
    def enabled(self) -> bool:
        return self.adabn or self.method != "none"

    def attach(self, engine: Any) -> None:
        if self.adabn:
            engine.add_event_handler(Events.STARTED, self._adabn)

    def _inputs(self, engine: Any) -> Iterable[torch.Tensor]:
        for batch in engine.data_loader:
            if isinstance(batch, dict):
                batch.pop(FAILED_KEY, None)
                if "image" not in batch:
                    continue
            inputs, _ = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)
            yield inputs

    def _adabn(self, engine: Any) -> None:
        try:
            self.adabn_scans = adapt_batchnorm(engine.network, self._inputs(engine), self.min_scans)
            engine.logger.info(f"adabn: batch-norm statistics re-estimated on {self.adabn_scans} site scans")
        except SiteAdaptationRefusedError as e:
            self.refusal = str(e)
            engine.logger.warning(f"site adaptation refused: {e}; scans scored with the in-domain statistics")

    def _adabn_summary(self) -> dict[str, Any] | None:
        """What AdaBN did (applied, scans used), or None when the method does not use it."""
        if not self.adabn:
            return None
        return {"applied": self.refusal is None, "scans": self.adabn_scans}

    def _source(self) -> SourceScores | None:
        if not self.model_file or not Path(self.model_file).is_file():
            return None
        return SourceScores.from_checkpoint(self.model_file)

    def finish(self) -> dict[str, Any] | None:
        """Apply the score method, write ``site_adaptation.json`` and the adapted columns; never raises for a
        refusal (see :meth:`raise_on_refusal`)."""
        if not self.enabled:
            return None
        rows = [r for r in self.saver.rows if not r.get("error")]
        scores = [self.saver.scores[r["image"]] for r in rows]
        source = self._source()
        in_domain = source.threshold if source is not None else float(self.saver.threshold)
        out: dict[str, Any] = {
            "site_adaptation": self.spec,
            "adabn": self._adabn_summary(),
            "in_domain_threshold": in_domain,
            "model_file": self.model_file,
            "min_scans": self.min_scans,
        }
        result = None
        if self.refusal is None:
            try:
                result = adapt_scores(self.method, scores, source, in_domain, self.min_scans)
            except SiteAdaptationRefusedError as e:
                self.refusal = str(e)
        out["refused"] = self.refusal
        if result is not None:
            out.update(result)
            out["called_pd_in_domain"] = float(np.mean(np.asarray(scores) >= in_domain)) if scores else 0.0
        self.result = out
        atomic_write_json(self.saver.output_dir / "site_adaptation.json", out)
        self._write_columns(None if result is None else result["threshold"])
        return out

    def _write_columns(self, threshold: float | None) -> None:
        path = self.saver.csv_path
        fields = list(self.saver.FIELDS) + ["adapted_class", "adapted_label"]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in self.saver.rows:
                adapted = {"adapted_class": "", "adapted_label": ""}
                if threshold is not None and not row.get("error"):
                    c = int(self.saver.scores[row["image"]] >= threshold)
                    adapted = {"adapted_class": c, "adapted_label": "PD" if c else "HC"}
                writer.writerow({**row, **adapted})
        os.replace(tmp, path)

    def raise_on_refusal(self) -> None:
        """End the run when the adaptation was refused: on MONAI's command line a one-line ``error:`` and exit
        status :data:`scripts.site_adaptation.EXIT_REFUSED`; elsewhere a :class:`SiteAdaptationRefusedError`."""
        if self.refusal is None:
            return
        message = f"site adaptation refused: {self.refusal} (unadapted predictions kept in {self.saver.csv_path})"
        if _running_cli():
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(EXIT_REFUSED)
        raise SiteAdaptationRefusedError(message)
