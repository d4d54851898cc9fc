#!/usr/bin/env bash
# The whole test suite: lint, types, the layers, then every test on the real services.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "== ruff"; .venv/bin/ruff check shared services ferry tests bench
echo "== mypy"; .venv/bin/mypy shared services ferry
echo "== layers"; .venv/bin/lint-imports
echo "== pytest"; .venv/bin/pytest -q -p no:cacheprovider "$@"
