# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""``python -m scripts.study``: run the experiment matrix (see ``--help``)."""

from scripts.study.runner import main

if __name__ == "__main__":  # the phantom generator's worker processes re-import this module
    raise SystemExit(main())
