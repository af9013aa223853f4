#!/usr/bin/env bash
# Starts the local stack: an S3 server and a Ray head on 127.0.0.1, a bucket with sample videos; prints the commands
# to run against it. Arguments go to `stack.py up` (--state-dir, --s3-port, --dashboard-port, --no-ray, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" infra/local/stack.py up "$@"
