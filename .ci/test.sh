#!/usr/bin/env bash
# The README's test command: install with the test extra, lint, run the default (not slow) suite.
# pytest exits 5 when it collects no tests; that fails here like any other non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m ruff check .
python -m pytest -q -p no:cacheprovider --durations=25
