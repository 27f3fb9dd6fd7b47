# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The model zoo's unit test of this bundle, kept in the zoo as ``ci/unit_tests/test_<bundle name>.py``.

Run from the zoo's root (``python ci/unit_tests/runner.py --b pd_datscan_kd_classification``, the bundle folder on
``PYTHONPATH``), as the zoo's other ``test_<bundle>.py`` do: the training configs (3D teacher, then the 2D student
distilled from it), the evaluation override and inference run through ``ConfigWorkflow`` on a tiny synthetic set
that the teacher config's ``initialize`` generates (32³ grid, one epoch), with their properties checked. Weights and
run folders go to a temporary folder, not into the bundle.
"""

import os
import shutil
import tempfile
import unittest

from monai.bundle import ConfigWorkflow

BUNDLE_ROOT = os.path.abspath(os.environ.get("BUNDLE_ROOT", "models/pd_datscan_kd_classification"))
TINY = {"spatial_size": [32, 32, 32], "batch_size": 6, "num_workers": 0, "progress_bar": False, "max_epochs": 1}


def _workflow(config_files, workflow_type, **override):
    files = [os.path.join(BUNDLE_ROOT, "configs", name) for name in config_files]
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=files if len(files) > 1 else files[0],
        logging_file=os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
        meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
        bundle_root=BUNDLE_ROOT,
        **override,
    )


def _run(workflow):
    workflow.initialize()
    check_result = workflow.check_properties()
    if check_result is not None and len(check_result) > 0:
        raise ValueError(f"check properties failed: {check_result}")
    workflow.run()
    workflow.finalize()


class TestPDDaTscanKDClassification(unittest.TestCase):
    def setUp(self):
        self.work_dir = tempfile.mkdtemp()
        self.override = {
            **TINY,
            "dataset_dir": os.path.join(self.work_dir, "data"),
            "ckpt_dir": os.path.join(self.work_dir, "models"),
            "synthetic_subjects": 24,
        }
        # the training configs include blocks of configs/inference.json by MONAI macros ("%configs/..."), which
        # MONAI resolves against the working directory
        self.previous_dir = os.getcwd()
        os.chdir(BUNDLE_ROOT)

    def tearDown(self):
        os.chdir(self.previous_dir)
        shutil.rmtree(self.work_dir)

    def test_train_distill_evaluate_infer(self):
        out = os.path.join(self.work_dir, "eval")
        _run(_workflow(["train_teacher.json"], "train", output_dir=os.path.join(out, "teacher"), **self.override))
        self.assertTrue(os.path.isfile(os.path.join(self.work_dir, "models", "teacher.pt")))

        _run(_workflow(["distill.json"], "train", output_dir=os.path.join(out, "student"), **self.override))
        self.assertTrue(os.path.isfile(os.path.join(self.work_dir, "models", "model.pt")))

        evaluation = os.path.join(out, "evaluate")
        _run(_workflow(["distill.json", "evaluate.json"], "train", output_dir=evaluation, **self.override))
        self.assertTrue(os.path.isfile(os.path.join(evaluation, "metrics.csv")))

        inference = os.path.join(out, "inference")
        _run(_workflow(["inference.json"], "infer", output_dir=inference, **self.override))
        self.assertTrue(os.path.isfile(os.path.join(inference, "predictions.csv")))


if __name__ == "__main__":
    unittest.main()
