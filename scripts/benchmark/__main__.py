# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""``python -m scripts.benchmark``: run the benchmark (see ``--help``)."""

from scripts.benchmark.runner import main

outcome = main()
raise SystemExit(0 if isinstance(outcome, (int, dict)) else 1)
