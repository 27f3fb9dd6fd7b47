# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Event handlers that MONAI does not ship: checkpoint publishing, streaming per-scan predictions, projection PNGs.

Metrics, metric files and checkpoints of a run use MONAI's and ignite's own handlers (see the configs).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

__all__ = ["PublishCheckpoint", "PredictionSaver", "ProjectionPNGSaver", "atomic_write_json"]


def atomic_write_json(path: str | os.PathLike, content: object) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2))
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


class PublishCheckpoint:
    """Copy a run's best checkpoint to the bundle's ``models/`` folder when training completes.

    Each run keeps its own best checkpoint in its run folder (never overwritten by a later run); the copy in
    ``models/`` is what the other configs, export and MONAI Label load.

    Args:
        source: the run's checkpoint file.
        destination: the bundle file to update, e.g. ``models/teacher.pt``.
    """

    def __init__(self, source: str | os.PathLike, destination: str | os.PathLike) -> None:
        self.source = Path(source)
        self.destination = Path(destination)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.source.is_file():
            engine.logger.warning(f"no checkpoint at {self.source}; {self.destination} left unchanged.")
            return
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.destination.with_suffix(self.destination.suffix + ".tmp")
        shutil.copyfile(self.source, tmp)
        os.replace(tmp, self.destination)
        engine.logger.info(f"best checkpoint {self.source} published to {self.destination}")


def _stem(path: str) -> str:
    name = os.path.basename(str(path).rstrip("/"))
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class PredictionSaver:
    """Write one row per scan (image, PD probability, predicted class, projection) to CSV and JSON.

    Files are written when the evaluator completes, to ``<output_dir>/predictions.csv`` and ``.json``. ``pred``
    must hold class probabilities (the configs' postprocessing applies the softmax); channel 1 is PD.

    Args:
        output_dir: folder of the outputs (created when needed).
        projection: the 3D→2D projection the network saw (``"none (3D)"`` for the teacher), written per row.
        model_file: the weights used, written in the JSON header.
        threshold: PD decision threshold.
    """

    def __init__(
        self, output_dir: str | os.PathLike, projection: str, model_file: str = "", threshold: float = 0.5
    ) -> None:
        self.output_dir = Path(output_dir)
        self.projection = projection
        self.model_file = str(model_file)
        self.threshold = threshold
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        preds = output["pred"] if isinstance(output, dict) else [o["pred"] for o in output]
        probs = torch.stack([torch.as_tensor(p) for p in preds]) if isinstance(preds, list) else preds
        probs = probs.float().reshape(probs.shape[0], -1)
        names = _filenames(engine.state.batch) or [f"scan_{len(self.rows) + i}" for i in range(len(probs))]
        for name, p in zip(names, probs[:, 1].tolist()):
            predicted = int(p >= self.threshold)
            self.rows.append(
                {
                    "image": name,
                    "pd_probability": round(float(p), 6),
                    "predicted_class": predicted,
                    "predicted_label": "PD" if predicted else "HC",
                    "projection": self.projection,
                }
            )

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = ["image", "pd_probability", "predicted_class", "predicted_label", "projection"]
        tmp = self.output_dir / "predictions.csv.tmp"
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.output_dir / "predictions.csv")
        atomic_write_json(
            self.output_dir / "predictions.json",
            {"model_file": self.model_file, "threshold": self.threshold, "predictions": self.rows},
        )
        engine.logger.info(f"{len(self.rows)} predictions written to {self.output_dir / 'predictions.csv'}")


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
