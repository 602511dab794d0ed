#!/usr/bin/env bash
# Install with the test tools, then run every check: generated code fresh, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
export PATH="$PWD/.venv/bin:$PATH"

echo "== generated protos are fresh"
python scripts/gen_protos.py --check
echo "== ruff"
ruff check tvixfs tests bench scripts
ruff format --check tvixfs tests bench scripts
echo "== mypy --strict"
mypy
echo "== pytest"
pytest -q "$@"
