# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Custom components of the ``pd_datscan_kd_classification`` MONAI bundle.

Configs reference them as ``"_target_": "scripts.<module>.<Name>"`` so that the bundle runs from any
working directory once the bundle root is on ``sys.path`` (``python -m monai.bundle run`` adds it).
"""
