# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Tools around the bundle: release packaging (``python -m scripts.tools.package``)."""
