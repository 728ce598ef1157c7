#!/usr/bin/env bash
# Everything a session with the lent GPU machine runs, in one call: at most 9 minutes, at most 8 result files.
#   here:   bash benchmarks/gpu_wheels.sh              (open_clip_torch, ftfy, wcwidth into .whl/, git-ignored)
#   there:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
# Results go to $OUT (the device tool brings them back), or benchmarks/results/gpu-session when $OUT is unset:
#   device.txt, session.log (every step's output), kernel_topk_union.{json,md}, bench-fp32.json, bench-fp16.json,
#   bench-chunked.json (report.md, cells.csv and the plot come back from each json here:
#   `python -m sed_bench.report FOLDER` after moving it to FOLDER/results.json). The device has torch with CUDA, nvcc and cupy but no TensorRT and no onnxruntime-gpu,
#   so TensorRT tests skip there with their reason and the bench compares torch fp32 eager with fp16 autocast.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-session}"
mkdir -p "$out"
py="${PYTHON:-python3}"
log="$out/session.log"
: > "$log"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
step() { echo "=== $* ($(date -u +%H:%M:%S))" >> "$log"; }

# 0. The device and what it lacks: our package runs from this tree; open_clip and ftfy come as carried wheels.
nvidia-smi -L > "$out/device.txt" 2>&1
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  >> "$out/device.txt" 2>&1
site=/tmp/sed-site
if ! $py -c "import open_clip, ftfy" 2>/dev/null; then
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "open_clip/ftfy are missing and no wheels were carried: run benchmarks/gpu_wheels.sh, carry .whl" | tee -a "$log"
    exit 2
  fi
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    >> "$log" 2>&1 || { echo "installing the carried wheels failed (see $log)"; exit 2; }
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
status=0

# 1. GPU tests (kernel through its torch op and its C library, random and adversarial inputs): 4 min at most.
step "pytest -m gpu"
timeout 240 $py -m pytest -q -m gpu -p no:cacheprovider tests/ >> "$log" 2>&1 || status=1

# 2. Kernel timings at C = 847, P = 576 / 2304 / 9216: 1 min at most.
step "kernel timings"
timeout 60 $py benchmarks/kernel_topk_union.py --out "$out/kernel" >> "$log" 2>&1 || status=1
[ -f "$out/kernel/results.json" ] && mv "$out/kernel/results.json" "$out/kernel_topk_union.json"
[ -f "$out/kernel/report.md" ] && mv "$out/kernel/report.md" "$out/kernel_topk_union.md"
rm -rf "$out/kernel"

# 3. sed-bench on the GPU, sed-b architecture, synthetic kept counts and text: fp32 eager vs fp16 autocast,
#    75 s each at most (the Table-7 grid, 3 warm-up and 10 timed runs a cell).
for prec in fp32 fp16; do
  step "sed-bench $prec"
  timeout 75 $py -m sed_bench.cli --model sed-b --backend torch --device cuda --precision "$prec" \
      --vocabs ade847,pc459,ade150,pc59,voc20 --topk 1,2,4,8,all --kept paper --text synthetic \
      --warmup 3 --iters 10 --no-progress --out "$out/bench-$prec" >> "$log" 2>&1 || status=1
  [ -f "$out/bench-$prec/results.json" ] && mv "$out/bench-$prec/results.json" "$out/bench-$prec.json"
  rm -rf "$out/bench-$prec"  # report.md, cells.csv and the plot are rebuilt from the json (sed_bench.report)
done

# 4. Issue 14 on the GPU: sed-b at A-847 with every class kept under a 3 GiB device budget, so the decoder runs in
#    class chunks (the torch-cuda memory model picks the chunk); its device peak against the one-pass A-847 "all"
#    cell of bench-fp32 above, on the same GPU. 60 s at most.
step "sed-bench chunked A-847 under a 3 GiB device budget"
timeout 60 $py -m sed_bench.cli --model sed-b --backend torch --device cuda --precision fp32 --vocabs ade847 \
    --topk all --kept paper --text synthetic --max-memory 3 --warmup 1 --iters 3 --no-progress \
    --out "$out/bench-chunked" >> "$log" 2>&1 || status=1
[ -f "$out/bench-chunked/results.json" ] && mv "$out/bench-chunked/results.json" "$out/bench-chunked.json"
rm -rf "$out/bench-chunked"

step "done, status $status"
tail -n 40 "$log"
exit $status
