# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""``python -m scripts.benchmark``: run the benchmark (see ``--help``)."""

from scripts.benchmark.runner import main

outcome = main()
raise SystemExit(1 if isinstance(outcome, dict) and outcome.get("errors") else 0)
