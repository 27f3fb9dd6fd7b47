# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""A local MONAI Label datastore that also recognises JSON classification label files on disk."""

from __future__ import annotations

import os

from monailabel.datastore.local import LocalDatastore

from lib.labels import LABEL_FILE_SUFFIX

__all__ = ["ClassificationLabelDatastore"]


class ClassificationLabelDatastore(LocalDatastore):
    """:class:`LocalDatastore` whose label folders also accept ``<image id>.json`` label files.

    The stock local datastore registers label files found on disk only when they have an image extension
    (``*.nii.gz``, ``*.nii``); JSON labels uploaded through ``PUT /datastore/label`` are kept, but JSON labels
    copied into ``<studies>/labels/final/`` by hand would be ignored. This class adds ``*.json`` to the patterns
    used for label folders (never for the image folder, which also holds the datastore's own JSON file), so a
    studies folder prepared offline is complete when the server starts.
    """

    def _list_files(self, path, patterns):
        if os.path.realpath(path) != os.path.realpath(self._datastore.image_path()):
            patterns = [*patterns, f"*{LABEL_FILE_SUFFIX}"]
        return super()._list_files(path, patterns)
