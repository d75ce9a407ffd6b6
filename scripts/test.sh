#!/usr/bin/env bash
# The test suite: set-up if needed (scripts/setup.sh), then pytest in that environment.
# Extra arguments go to pytest:  bash scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FSDPCK_VENV:-.venv}/bin/python" -m pytest -q "$@"
