#!/usr/bin/env bash
# Set up (idempotent) and run the edgecam demo on the bundled clips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgecam demo "$@"
