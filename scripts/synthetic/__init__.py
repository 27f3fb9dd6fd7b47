# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Tool: the synthetic DaTscan / AV133 phantom generator (``python -m scripts.synthetic --help``).

Not used by the bundle's configs at run time except to create the default synthetic data set when asked to.
"""
