# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""``python -m scripts.synthetic``: generate a synthetic phantom data set (see ``--help``)."""

from scripts.synthetic.cli import main

raise SystemExit(main())
