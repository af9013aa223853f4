#!/usr/bin/env bash
# Builds what the GPU check carries to a GPU machine whose image has PyTorch (Python 3.12, x86-64) but not
# vitaclip's other packages: the wheels, unpacked and recompressed with xz (scripts/pack_wheels.py site) into
# site-core.tar.xz (PyAV, open_clip, FAISS: every section but the job) and site-job.tar.xz (Ray, deltalake, boto3),
# cut into parts .whl/1, .whl/2 of at most 53 MiB each (one call to the machine carries at most 64 MiB, the
# ~9 MiB working tree included). Run it here, once (about 5 minutes); scripts/gpu_check.sh says how the parts travel.
#
# faiss: faiss-gpu-cu12 wheels need CUDA 12 libraries the image (CUDA 13) lacks, so faiss-cpu is carried and the
# check's FAISS section reports CPU numbers and says so. To measure faiss-gpu, carry a faiss-gpu build for the
# image's CUDA as one more part (a .whl there is installed with pip) and the same section runs it on the GPU.
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
# Ray's Java jars, RLlib, Serve, LLM, workflows and the dashboard's web client: the job imports none of them (~55 MB unpacked).
"$PY" scripts/pack_wheels.py site .whl/all .whl/site --core av faiss_cpu open_clip_torch ftfy wcwidth \
    --drop ray/jars ray/rllib ray/serve ray/llm ray/workflow ray/dashboard/client/build '*.js.map'
"$PY" scripts/pack_wheels.py .whl/site .whl --part-mib 53  # + the ~9 MiB working tree <= 64 MiB
rm -rf .whl/all .whl/site
echo "next: one call per part carrying .whl/N: bash scripts/gpu_check.sh stage; the part holding site-core.tar.xz"
echo "last, as: bash scripts/gpu_check.sh stage && bash scripts/gpu_check.sh run   (report: \$OUT/gpu_check.json)"
