#!/usr/bin/env bash
# Set up (idempotent) and run edgecam's checks and full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The PostgreSQL of the fleet server's storage tests: running, with its test role.
bash scripts/postgres.sh
# The storage tests run on SQLite and on this PostgreSQL (made by scripts/postgres.sh).
export EDGECAM_TEST_PG="${EDGECAM_TEST_PG:-postgresql://edgecam_test:edgecam_test@127.0.0.1:5432/edgecam_test}"
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
