# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""``python -m scripts.study``: run the experiment matrix (see ``--help``)."""

from scripts.study.runner import main

raise SystemExit(main())
