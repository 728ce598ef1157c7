#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, timm, onnx, cupy, ... but not open_clip_torch or ftfy, and no
# network), downloaded here into .whl/ (ignored by git) for Python 3.12 there. Carry them with the session call:
#   bash benchmarks/gpu_wheels.sh     then     run(command="bash benchmarks/gpu_session.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.2.14"
ls -la .whl
