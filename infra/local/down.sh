#!/usr/bin/env bash
# Stops the local stack started by up.sh (only its own processes). Arguments go to `stack.py down` (--state-dir).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" infra/local/stack.py down "$@"
