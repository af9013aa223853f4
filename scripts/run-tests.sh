#!/usr/bin/env bash
# Sets up, then runs the linters and the test suite. pytest's "no tests collected" (exit 5) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# The search page is tested in Debian's headless Chromium.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver >/dev/null || exit 1
    else
        echo "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)" >&2
        exit 1
    fi
fi
# Azure outputs are tested against Azurite, Microsoft's storage emulator, from npm (Node.js >= 10).
if [ ! -x .tools/azurite/node_modules/.bin/azurite-blob ]; then
    if ! command -v npm >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                nodejs npm >/dev/null || exit 1
        else
            echo "install Node.js and npm (apt-get install nodejs npm): the Azure tests run Azurite" >&2
            exit 1
        fi
    fi
    npm install --prefix .tools/azurite --no-audit --no-fund --silent azurite@3.35.0 || exit 1
fi
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
.venv/bin/mypy || exit 1
.venv/bin/python scripts/check_function_length.py || exit 1
# Two pytest-xdist workers; the files of whole job runs are queued first and a worker that runs out takes over the
# other's queue (tests/conftest.py); tests marked `serial` run alone. VITACLIP_TEST_WORKERS=0: one process.
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${VITACLIP_TEST_WORKERS:-2}" --dist worksteal "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
