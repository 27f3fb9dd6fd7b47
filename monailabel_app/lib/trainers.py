# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Training task: ``configs/distill.json`` (3D teacher -> 2D student) on the labels of the MONAI Label datastore."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence

import monai.bundle
from lib.bundle import bundle_module, resolved_config
from lib.labels import read_label_file
from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask

__all__ = ["DistillConstants", "DistillTrainTask", "TrainRequestError", "TrainingFailedError"]

logger = logging.getLogger(__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# the options of distill.json's `displayable_configs`: the check of a value, what the error message asks for
OPTION_RULES = {
    "max_epochs": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 2, "an int >= 2 (the distillation loss compares scans)"),
    "learning_rate": (lambda v: _is_number(v) and v > 0, "a number > 0"),
}


class TrainRequestError(ValueError):
    """A training request cannot run: no or invalid labels, a bad option value, a split without validation."""


class TrainingFailedError(RuntimeError):
    """The multi-GPU training command ended with an error."""


class DistillConstants(BundleConstants):
    """The bundle's config files: ``distill.json`` to train, ``multi_gpu.json`` merged after it under torchrun."""

    def configs(self) -> Sequence[str]:
        return ["distill.json"]

    def multi_gpu_configs(self) -> Sequence[str]:
        return ["multi_gpu.json"]


class DistillTrainTask(BundleTrainTask):
    """MONAI Label's bundle training on ``configs/distill.json``, with the datastore's labelled scans.

    MONAI Label's :class:`BundleTrainTask` does the work: it offers the options of the config's
    ``displayable_configs`` block (``max_epochs``, ``batch_size``, ``learning_rate``) besides its own
    (``val_split``, ``device``, ``pretrained``, ``model_filename``, ``multi_gpu``, ``gpus``, tracking), puts the
    data, device and options into the config, starts from the current student checkpoint, and runs the bundle's
    ``run`` in one process, or, with more than one GPU, under ``torchrun`` with ``configs/multi_gpu.json`` merged
    after the training config. What this class adds, and why:

    - ``_load_bundle_config``: distill.json includes blocks of other config files by MONAI macros, whose paths
      MONAI resolves against the working directory; the macros are expanded against the bundle folder, so the
      config MONAI Label reads, shows and exports for torchrun is the bundle's whatever the server's folder;
    - ``run_single_gpu``: runs that expanded config (MONAI Label would read the file again, macros and all);
    - ``run_multi_gpu``: fails the task when torchrun fails (MONAI Label 0.8.5 logs the exit code and reports
      the training as done);
    - ``__call__``: fills in the displayable options that a request leaves out (MONAI Label reads each one from
      the request and fails on a missing one);
    - ``_update_overrides``: checks the option values; turns off the progress bar (the task log keeps lines)
      and the ``initialize`` step that generates the synthetic data set when ``dataset_dir`` has no datalist
      (the datastore gives the data);
    - ``_fetch_datalist``: the datastore's final labels are JSON files (``lib.labels``), turned into 0/1 classes
      by the bundle's datalist validation (MONAI Label passes label file paths);
    - ``_partition_datalist``: validation by subject and stratified by class, with the bundle's own split
      (MONAI Label splits scans at random), and never empty (the bundle selects the checkpoint on validation);
    - ``_load_checkpoint``: ``pretrained: false`` works (MONAI Label 0.8.5 calls ``os.path.exists(None)``);
    - ``config``: the teacher's checkpoint is not offered as the student to start from.

    Writes, like ``python -m monai.bundle run training --config_file configs/distill.json``: the run folder
    ``eval/distill-...`` and the best student checkpoint ``models/model.pt``. ``models/teacher.pt`` must exist.
    """

    def __init__(self, path: str, conf: dict[str, str]) -> None:
        super().__init__(path, conf, const=DistillConstants(), load_strict=True)
        if self.valid:
            self.teacher_file = os.path.basename(self.bundle_config.get_parsed_content("teacher_ckpt"))
            self.data_seed = int(self.bundle_config.get_parsed_content("data_seed"))

    def _load_bundle_config(self, path, config):
        bundle_config = resolved_config(path, config)
        bundle_config.config.update({self.const.key_bundle_root(): path})
        return bundle_config

    def _displayable_defaults(self) -> dict:
        defaults: dict = {}
        for key in self.const.key_displayable_configs():
            if self.bundle_config.get(key):
                defaults.update(self.bundle_config.get_parsed_content(key, instantiate=True))
        return defaults

    # ---------------------------------------------------------------------------------------------------- options
    def config(self):
        c = super().config()
        c["model_filename"] = [m for m in c["model_filename"] if m != self.teacher_file] or [self.const.model_pytorch()]
        return c

    def __call__(self, request, datastore: Datastore):
        return super().__call__({**self._displayable_defaults(), **request}, datastore)

    def _update_overrides(self, overrides):
        for key, value in overrides.get("displayable_configs", {}).items():
            valid, expected = OPTION_RULES.get(key, (lambda v: True, ""))
            if not valid(value):
                raise TrainRequestError(f"{key} must be {expected}, got {value!r}.")
        overrides["progress_bar"] = False  # the task log keeps lines, not a redrawn bar
        overrides["synthetic_data"] = False  # the datastore gives the data: no synthetic set to generate first
        logger.info(f"Bundle overrides: { {k: v for k, v in overrides.items() if not k.endswith('#data')} }")
        return overrides

    # ------------------------------------------------------------------------------------------------------- data
    def _fetch_datalist(self, request, datastore: Datastore) -> list[dict]:
        """The labelled scans as ``[{"image": path, "label": 0|1, "subject": id}]``.

        Raises:
            LabelFileError: a final label is not a JSON label file.
            DatalistError: a label value is not 0/HC or 1/PD (message names the label file and the image).
            TrainRequestError: only one class labelled.
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
        if not _is_number(val_split) or not 0.0 < val_split < 1.0:
            raise TrainRequestError(
                f"val_split must be a fraction in (0, 1) (the bundle selects the checkpoint on validation), "
                f"got {val_split!r}."
            )
        with bundle_module(self.bundle_path, "scripts.data") as data:
            splits = data.split_by_subject(datalist, (1.0 - val_split, val_split, 0.0), seed=self.data_seed)
        train, val = splits["training"], splits["validation"]
        if not train or not val:
            raise TrainRequestError(
                f"val_split={val_split} of {len(datalist)} labelled scans leaves {len(train)} for training and "
                f"{len(val)} for validation; label more scans or change val_split."
            )
        logger.info(f"Training scans: {len(train)}; validation scans: {len(val)} (split by subject)")
        return [{"image": e["image"], "label": e["label"]} for e in train], [
            {"image": e["image"], "label": e["label"]} for e in val
        ]

    # -------------------------------------------------------------------------------------------------------- run
    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        if pretrained:
            super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def run_single_gpu(self, request, overrides):
        logging_file = os.path.join(self.bundle_path, "configs", "logging.conf")
        with tempfile.TemporaryDirectory() as tmp:
            config_file = os.path.join(tmp, self.const.configs()[0])
            ConfigParser.export_config_file(self.bundle_config.config, config_file, indent=4)
            monai.bundle.run(
                run_id=request.get("run_id", "run"),
                meta_file=self.bundle_metadata_path,
                config_file=config_file,
                logging_file=logging_file if os.path.isfile(logging_file) else False,
                **overrides,
            )

    def run_multi_gpu(self, request, cmd, env):
        logger.info(f"RUNNING COMMAND:: {cmd}")
        returncode = subprocess.run(cmd, env=env).returncode  # its output goes to the task log, as MONAI Label's
        if returncode != 0:
            raise TrainingFailedError(f"multi-GPU training failed (exit code {returncode}): {' '.join(cmd)}")
