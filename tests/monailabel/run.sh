#!/usr/bin/env bash
# Copyright (c) the pd_datscan_kd_classification authors.
# Licensed under the Apache License, Version 2.0 (see LICENSE).
#
# Creates the MONAI Label environment (.venv-monailabel, from requirements-monailabel.txt) when it is missing
# or older than the requirements file, then runs the MONAI Label server test (tests/monailabel).
# Usage: bash tests/monailabel/run.sh [extra pytest arguments]
# Environment: PYTHON (interpreter used to create the venv, default python3), MONAILABEL_VENV (venv path).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${MONAILABEL_VENV:-$ROOT/.venv-monailabel}"
REQ="$ROOT/requirements-monailabel.txt"
STAMP="$VENV/.installed"

if [ ! -f "$STAMP" ] || [ "$REQ" -nt "$STAMP" ]; then
    start=$(date +%s)
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet -r "$REQ"
    "$VENV/bin/python" -m pip check || echo "warning: pip check reported conflicts (see above)" >&2
    touch "$STAMP"
    echo "monailabel environment ready in $(( $(date +%s) - start )) s at $VENV ($(du -sh "$VENV" | cut -f1))"
fi

"$VENV/bin/python" -m pytest -q tests/monailabel "$@"
