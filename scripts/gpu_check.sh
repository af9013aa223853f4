#!/usr/bin/env bash
# The GPU check on a GPU machine (benchmarks/gpu_check.py). The packages come in parts (scripts/gpu_wheels.sh, run
# here first), one part per call because one call carries at most 64 MiB:
#
#   bash scripts/gpu_check.sh stage     # in each call that carries a part (.whl/N): keeps it under .gpu-stage/,
#                                       # which stays on the machine between calls while it is warm (30 s)
#   bash scripts/gpu_check.sh run       # last: unpacks what is whole into .gpu-site/ and runs the check
#   bash scripts/gpu_check.sh run --sections model faiss --compile    # options go to gpu_check.py
#
# Carry the part holding site-core.tar.xz last: if the machine went back between calls and the other part is gone,
# every section but the job still runs (the job's section then fails, saying that Ray is missing).
#
# The report goes to $OUT/gpu_check.json (the device tool brings $OUT back), else ./gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
case "${1:-run}" in
    stage)
        mkdir -p .gpu-stage
        found=0
        for part in .whl/*/; do
            [ -d "$part" ] || continue
            cp "$part"* .gpu-stage/ && found=1
        done
        [ "$found" = 1 ] || { echo "no .whl/N part was carried in this call" >&2; exit 2; }
        ls -la .gpu-stage
        ;;
    run)
        shift || true
        if [ -d .gpu-stage ]; then
            "$PY" scripts/pack_wheels.py --join .gpu-stage
            mkdir -p .gpu-site
            for archive in .gpu-stage/*.tar.xz; do
                [ -f "$archive" ] || continue
                # Python's own xz and tar readers: the image need not have the xz program; a damaged archive stops here
                "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="tar")' \
                    "$archive" .gpu-site || { echo "could not unpack $archive: build the parts again" >&2; exit 1; }
                rm "$archive"
            done
            if compgen -G ".gpu-stage/*.whl" > /dev/null; then
                "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                    --target .gpu-site .gpu-stage/*.whl
            fi
        fi
        export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
        exec "$PY" benchmarks/gpu_check.py "$@" --out "${OUT:-.}/gpu_check.json"
        ;;
    *)
        echo "usage: $0 stage | run [gpu_check.py options]" >&2
        exit 2
        ;;
esac
