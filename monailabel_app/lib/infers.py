# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Inference task: the bundle's 2D student as a MONAI Label classification model."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

__all__ = ["StudentInferTask"]


class StudentInferTask(BundleInferTask):
    """MONAI Label's bundle inference on ``configs/inference.json`` (``network_def`` + ``models/model.pt``).

    The response is MONAI Label's classification result, one entry per class of the bundle metadata's
    ``channel_def``::

        {"prediction": [{"idx": 0, "label": "hc", "score": p_hc}, {"idx": 1, "label": "pd", "score": p_pd}]}

    with ``p_hc + p_pd = 1`` (softmax of the student's two logits). The settings that differ from MONAI Label's
    defaults, and why:

    - ``type=classification``: MONAI Label guesses the task type from the bundle folder's name, which need not
      contain "classification" (the repository root serves as the bundle);
    - ``add_post_restore=False``: MONAI Label's ``Restored`` post-transform maps a segmentation back onto the
      input grid and fails on a ``(2,)`` score vector;
    - ``load_strict=True``, and the 3D teacher's checkpoint is not offered as a model file: a wrong checkpoint
      gives a state-dict error instead of a partly loaded network.

    Args:
        path: the bundle folder.
        conf: the app's ``--conf`` settings (``preload`` is honoured).
        teacher_file: file name of the teacher checkpoint in ``models/`` (hidden from the model choices).
    """

    def __init__(self, path: str, conf: dict[str, str], teacher_file: str = "teacher.pt") -> None:
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False, load_strict=True)
        if self.valid:
            students = [m for m in self._config.get("model_filename", []) if m != teacher_file]
            self._config["model_filename"] = students or [BundleConstants().model_pytorch()]
