# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Tool: speed and memory of the bundle's pipelines against the raw networks (``python -m scripts.benchmark``)."""
