#!/usr/bin/env bash
# Everything a session with the lent GPU machine should run, in one go (see /work/.library/device/README.md):
#   run: bash benchmarks/gpu_session.sh        (results under $OUT, or benchmarks/results when $OUT is unset)
# The device has torch with CUDA and nvcc but no TensorRT and no onnxruntime-gpu, so the GPU report compares the
# torch backend fp32 eager with fp16 autocast; TensorRT tests stay skipped there with their reason.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
nvidia-smi -L | tee "$out/device.txt"
# 1. GPU tests: the top-k-union kernel through its torch op (random and adversarial inputs, fp32/fp16).
$py -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu_tests.log"
# 2. Kernel timings at C = 847, P = 576 / 2304 / 9216.
$py benchmarks/kernel_topk_union.py --out "$out/kernel_topk_union" 2>&1 | tail -20
# 3. sed-bench on the GPU, sed-b architecture, synthetic kept counts and text: fp32 eager vs fp16 autocast.
for prec in fp32 fp16; do
  $py -m sed_bench.cli --model sed-b --backend torch --device cuda --precision "$prec" \
      --vocabs ade847,pc459,ade150,pc59,voc20 --topk 1,2,4,8,all --kept paper --text synthetic \
      --warmup 3 --iters 10 --no-progress --out "$out/gpu-sed-b-synthetic-$prec" 2>&1 | tail -5
done
