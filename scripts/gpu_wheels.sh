#!/usr/bin/env bash
# Builds what the GPU check carries to a GPU machine whose image has PyTorch (Python 3.12, x86-64) but not
# vitaclip's other packages: the wheels, cut into parts .whl/1, .whl/2, ... of at most 54 MiB each (one call to the
# machine carries at most 64 MiB). Run it here, once; scripts/gpu_check.sh says how the parts travel.
#
# faiss: faiss-gpu-cu12 wheels need CUDA 12 libraries the image (CUDA 13) lacks, so faiss-cpu is carried and the
# check's FAISS section reports CPU numbers and says so. To measure faiss-gpu, carry a faiss-gpu build for the
# image's CUDA as one more part (or use an image with it) and the same section runs it on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY="${PYTHON:-.venv/bin/python}"
rm -rf .whl && mkdir -p .whl/all
WHEELS=(
    "ray==2.60.0" "av==18.1.0" "deltalake==1.6.6" "arro3-core==0.9.1" "deprecated==3.0.1" "faiss-cpu==1.15.1"
    "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.4" "boto3==1.44.8" "botocore==1.44.8"
    "s3transfer==0.19.3" "jmespath==1.1.0"
    # ray imports jsonschema (runtime-env schemas); the image has attrs but not these
    "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "referencing==0.37.0" "rpds-py==2026.9.1"
)
for wheel in "${WHEELS[@]}"; do
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/all "$wheel"
done
"$PY" scripts/pack_wheels.py .whl/all .whl --part-mib 54  # + the ~7 MiB working tree <= 64 MiB
rm -rf .whl/all
echo "next: for each part N, one call on the GPU machine carrying .whl/N: bash scripts/gpu_check.sh stage"
echo "then: bash scripts/gpu_check.sh run   (its report lands in \$OUT/gpu_check.json)"
