# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Tool: the experiment matrix run through the bundle's own configs (``python -m scripts.study --help``)."""
