#!/usr/bin/env bash
# Creates .venv and installs vitaclip with its test tools. Safe to re-run; needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "vitaclip needs Python >= 3.10")'
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch/torchvision pairs that install on this project's machines (open_clip needs torchvision).
if ! .venv/bin/python -c 'import torch, torchvision' 2>/dev/null; then
    case "$(uname -m)" in
        aarch64|arm64) "${PIP[@]}" torch==2.9.1 torchvision==0.24.1 ;;
        *) "${PIP[@]}" torch==2.14.1 torchvision==0.29.1 ;;
    esac
fi
"${PIP[@]}" -e ".[dev,serve]"
# Bytecode for the project's own modules (pip compiles only what it installs): where PYTHONDONTWRITEBYTECODE is set,
# every process (each Ray worker of a run) would otherwise compile them again, ~0.15 s for the job's modules.
.venv/bin/python -m compileall -q -j 0 vitaclip jobs index >/dev/null
echo "vitaclip is installed in .venv"
