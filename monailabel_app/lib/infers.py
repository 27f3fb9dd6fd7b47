# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Inference task: the bundle's 2D student as a MONAI Label classification model."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

__all__ = ["StudentInferTask"]


class StudentInferTask(BundleInferTask):
    """Runs ``configs/inference.json`` (``network_def`` + ``models/model.pt``) on one datastore image.

    The response is MONAI Label's classification result, one entry per class of the bundle metadata's
    ``channel_def``::

        {"prediction": [{"idx": 0, "label": "hc", "score": p_hc}, {"idx": 1, "label": "pd", "score": p_pd}]}

    with ``p_hc + p_pd = 1`` (softmax of the student's two logits). Differences from a plain
    :class:`BundleInferTask`:

    - the task type is classification whatever the folder name, and MONAI Label's ``Restored`` post-transform
      (which maps a segmentation back onto the input grid) is not appended: it fails on a ``(2,)`` score vector;
    - a ``preprocessing``/``postprocessing`` given as one transform (not a ``Compose`` or a list) is accepted;
    - checkpoints load strictly, and the 3D teacher checkpoint is not offered as a model file, so a wrong file
      gives a state-dict error instead of silent nonsense.

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

    def _filter_transforms(self, transforms, filters):
        # MONAI Label unpacks a Compose into a list but iterates anything else; a bare transform is one item
        if transforms is not None and not isinstance(transforms, (list, tuple)):
            transforms = [transforms]
        return super()._filter_transforms(transforms, filters)
