# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Components of the MONAI Label app for the pd_datscan_kd_classification bundle."""
