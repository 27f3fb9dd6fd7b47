# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Training task: ``configs/distill.json`` (3D teacher -> 2D student) on the labels of the MONAI Label datastore."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask

from lib.bundle import bundle_module
from lib.labels import read_label_file

__all__ = ["DistillConstants", "DistillTrainTask", "TrainRequestError"]

logger = logging.getLogger(__name__)

# request keys -> bundle config ids they override (besides the ones MONAI Label sets itself)
TUNABLE_IDS = ("spatial_size", "batch_size", "learning_rate", "seed")


class TrainRequestError(ValueError):
    """A training request cannot run: no/invalid labels, a bad option, or a missing teacher checkpoint."""


class DistillConstants(BundleConstants):
    """Ids of ``configs/distill.json``: the same as MONAI Label's defaults except the config file name."""

    def configs(self) -> Sequence[str]:
        return ["distill.json"]


class DistillTrainTask(BundleTrainTask):
    """Runs the bundle's distillation (``run`` of ``configs/distill.json``) on the datastore's labelled scans.

    Data: every image with a *final* label in the datastore; the label is a JSON file ``{"label": "PD"|"HC"|1|0}``
    (see ``lib.labels``), checked and turned into 0/1 by the bundle's datalist validation. The scans are split by
    subject (``sub-XXXX`` file-name prefix), stratified by class, into training and validation with fraction
    ``val_split`` (the bundle's ``split_by_subject`` with seed ``seed``). Both classes must be labelled.

    Request options (besides MONAI Label's ``max_epochs``, ``val_split``, ``device``, ``pretrained``,
    ``model_filename``): ``spatial_size`` (int edge of the cubic resampling grid, or three ints),
    ``batch_size``, ``learning_rate``, ``seed``; the defaults are the bundle's. ``max_epochs`` (default: the
    bundle's) also sets the cosine schedule length. Training always runs in one process (the bundle ships no
    multi-GPU config). ``pretrained`` (default true) starts from the current ``models/model.pt``.

    Writes, like ``python -m monai.bundle run training --config_file configs/distill.json``: the run folder
    ``eval/distill-...`` and the best student checkpoint ``models/model.pt``. ``models/teacher.pt`` must exist.
    """

    def __init__(self, path: str, conf: dict[str, str]) -> None:
        super().__init__(path, conf, const=DistillConstants(), load_strict=True)
        if not self.valid:
            return
        parser = ConfigParser()
        parser.read_config(self.bundle_config_path)
        parser["bundle_root"] = path
        self.teacher_checkpoint = str(parser.get_parsed_content("teacher_ckpt"))
        self.kd_enabled = bool(parser.get_parsed_content("kd_enabled"))
        self.defaults = {k: parser.get_parsed_content(k) for k in TUNABLE_IDS}
        self.default_max_epochs = int(parser.get_parsed_content("max_epochs"))

    # ---------------------------------------------------------------------------------------------------- options
    def config(self):
        c = super().config()
        teacher = os.path.basename(self.teacher_checkpoint)
        students = [m for m in c.get("model_filename", []) if m != teacher]
        c["model_filename"] = students or [self.const.model_pytorch()]
        c["max_epochs"] = self.default_max_epochs
        c["multi_gpu"] = False
        size = self.defaults["spatial_size"]
        c["spatial_size"] = int(size[0]) if len(set(size)) == 1 else list(size)
        c.update({k: self.defaults[k] for k in ("batch_size", "learning_rate", "seed")})
        return c

    @staticmethod
    def _spatial_size(value) -> list[int]:
        size = value
        if isinstance(value, int) and not isinstance(value, bool):
            size = [value] * 3
        elif isinstance(value, (list, tuple)) and len(value) == 1:
            size = list(value) * 3
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in size)
        ):
            raise TrainRequestError(f"spatial_size must be an int >= 16 or three such ints, got {value!r}.")
        return [int(v) for v in size]

    def _bundle_overrides(self, request) -> dict:
        out: dict = {"progress_bar": False}
        if "spatial_size" in request:
            out["spatial_size"] = self._spatial_size(request["spatial_size"])
        if "batch_size" in request:
            b = request["batch_size"]
            if isinstance(b, bool) or not isinstance(b, int) or b < 2:
                raise TrainRequestError(
                    f"batch_size must be an int >= 2 (the distillation loss is batch-wise), got {b!r}."
                )
            out["batch_size"] = b
        if "learning_rate" in request:
            lr = request["learning_rate"]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise TrainRequestError(f"learning_rate must be a positive number, got {lr!r}.")
            out["learning_rate"] = float(lr)
        if "seed" in request:
            seed = request["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TrainRequestError(f"seed must be an int, got {seed!r}.")
            out["seed"] = seed
        return out

    # ------------------------------------------------------------------------------------------------------- data
    def _fetch_datalist(self, request, datastore: Datastore) -> list[dict]:
        """The labelled scans as ``[{"image": path, "label": 0|1, "subject": id}]``.

        Raises:
            LabelFileError: a final label is not a JSON label file.
            DatalistError: a label value is not 0/HC or 1/PD (message names the label file and the image).
            TrainRequestError: no labelled scans, or only one class labelled.
        """
        entries = []
        with bundle_module(self.bundle_path, "scripts.data") as data:
            for item in datastore.datalist():
                raw = {"image": item["image"], "label": read_label_file(item["label"])}
                entries.extend(data.validate_datalist([raw], source=f"label file {item['label']}"))
        n_pd = sum(e["label"] for e in entries)
        n_hc = len(entries) - n_pd
        if n_pd == 0 or n_hc == 0:
            raise TrainRequestError(
                f"training needs labelled scans of both classes; the datastore has {n_hc} HC and {n_pd} PD labels. "
                'Save a final label per scan: PUT /datastore/label?image=<id>&tag=final with a JSON file {"label": '
                '"PD"} (or "HC"), or place <studies>/labels/final/<id>.json before starting the server.'
            )
        logger.info(f"Labelled scans in the datastore: {len(entries)} ({n_hc} HC, {n_pd} PD)")
        return entries

    def _partition_datalist(self, datalist, request, shuffle=False):
        val_split = request.get("val_split", 0.2)
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0.0 < val_split < 1.0:
            raise TrainRequestError(
                f"val_split must be a fraction in (0, 1) (the bundle selects the checkpoint on validation), "
                f"got {val_split!r}."
            )
        seed = request.get("seed", self.defaults["seed"])
        with bundle_module(self.bundle_path, "scripts.data") as data:
            splits = data.split_by_subject(datalist, (1.0 - val_split, val_split, 0.0), seed=seed)
        train, val = splits["training"], splits["validation"]
        if not train or not val:
            raise TrainRequestError(
                f"val_split={val_split} of {len(datalist)} labelled scans leaves {len(train)} for training and "
                f"{len(val)} for validation; label more scans or change val_split."
            )
        logger.info(f"Training scans: {len(train)}; validation scans: {len(val)} (split by subject, seed {seed})")
        strip = [{"image": e["image"], "label": e["label"]} for e in train]
        return strip, [{"image": e["image"], "label": e["label"]} for e in val]

    # ------------------------------------------------------------------------------------------------------ run
    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        if pretrained:  # MONAI Label 0.8.5 would call os.path.exists(None) when pretrained is false
            super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def __call__(self, request, datastore: Datastore):
        request = {"max_epochs": self.default_max_epochs, **request, "multi_gpu": False, "force_multi_gpu": False}
        self._bundle_overrides(request)  # validate the options before any data is read
        if self.kd_enabled and not os.path.isfile(self.teacher_checkpoint):
            raise TrainRequestError(
                f"distillation needs the 3D teacher checkpoint {self.teacher_checkpoint}; train it first "
                "(python -m monai.bundle run training --config_file configs/train_teacher.json ...)."
            )
        return super().__call__(request, datastore)

    def run_single_gpu(self, request, overrides):
        overrides = {**overrides, **self._bundle_overrides(request)}
        overrides["max_epochs"] = overrides[self.const.key_train_trainer_max_epochs()]
        logger.info(f"Bundle overrides: { {k: v for k, v in overrides.items() if not k.endswith('#data')} }")
        super().run_single_gpu(request, overrides)
