# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""MONAI Label app serving the pd_datscan_kd_classification bundle (PD vs HC from DaTscan SPECT).

Start (from the repository root, in the MONAI Label environment)::

    monailabel start_server --app monailabel_app --studies STUDIES_DIR --conf models pd_datscan_kd_classification

``--conf`` settings:

- ``models``: the model name; only ``pd_datscan_kd_classification`` is served (default).
- ``bundle_path``: the bundle folder; default ``<app>/model/pd_datscan_kd_classification``, else the folder that
  holds the app (the repository root). Nothing is downloaded: no model zoo lookup, no SAM2.
- ``skip_trainers``: ``true`` to serve inference only.
- ``preload``: ``true`` to load the student at start-up.

Models: ``infer`` classifies one scan with the 2D student (``models/model.pt``); ``train`` runs
``configs/distill.json`` on the datastore's labelled scans (``configs/multi_gpu.json`` under torchrun with more
than one GPU). Labels are JSON files ``{"label": "PD"|"HC"}`` saved as each scan's final label (see
``lib/labels.py``). The server may start in any working directory.
"""

from __future__ import annotations

import json
import logging
import os

from lib.bundle import BUNDLE_NAME, resolve_bundle_path
from lib.infers import StudentInferTask
from lib.labels import register_label_files
from lib.trainers import DistillTrainTask
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)


class PDDaTscanKDApp(MONAILabelApp):
    """One bundle, two tasks: student inference (classification) and distillation training."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        names = [n.strip() for n in conf.get("models", BUNDLE_NAME).split(",") if n.strip()]
        if names != [BUNDLE_NAME]:
            raise ValueError(f"this app serves only the model {BUNDLE_NAME!r}; got --conf models {conf['models']!r}.")
        self.model_name = BUNDLE_NAME
        self.bundle_dir = resolve_bundle_path(app_dir, conf)
        with open(os.path.join(self.bundle_dir, "configs", "metadata.json")) as f:
            metadata = json.load(f)
        logger.info(f"Serving bundle {BUNDLE_NAME} {metadata.get('version')} from {self.bundle_dir}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="PD DaTscan 3D-to-2D KD classification",
            description=metadata.get("task", ""),
            version=metadata.get("version", ""),
        )

    def init_datastore(self) -> Datastore:
        """MONAI Label's datastore; in a local one, JSON labels placed on disk are registered too."""
        datastore = super().init_datastore()
        if isinstance(datastore, LocalDatastore) and not settings.MONAI_LABEL_DATASTORE_READ_ONLY:
            label_dir = os.path.join(self.studies, "labels", DefaultLabelTag.FINAL.value)
            added = register_label_files(datastore, label_dir)
            if added:
                logger.info(f"Registered {len(added)} JSON label file(s) found in {label_dir}")
        return datastore

    def init_infers(self) -> dict[str, InferTask]:
        task = StudentInferTask(self.bundle_dir, self.conf)
        if not task.is_valid():
            logger.warning(
                f"{self.model_name}: no student checkpoint in {self.bundle_dir}/models (model.pt); inference is "
                "offered after a checkpoint exists and the server is restarted."
            )
            return {}
        return {self.model_name: task}

    def init_trainers(self) -> dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        task = DistillTrainTask(self.bundle_dir, self.conf)
        return {self.model_name: task} if task.is_valid() else {}
