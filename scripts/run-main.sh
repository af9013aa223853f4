#!/usr/bin/env bash
# Sets up, then runs the main flow on an embedded default (local files, no credentials).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vitaclip quickstart "$@"
