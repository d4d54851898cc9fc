#!/usr/bin/env bash
# The whole test suite: lint, types, then every test on the real services.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check shared services tests bench
echo "== mypy"; .venv/bin/mypy shared services
echo "== pytest"; .venv/bin/pytest -q -p no:cacheprovider "$@"
