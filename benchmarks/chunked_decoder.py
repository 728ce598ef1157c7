"""The class-chunked ONNX Runtime decoder against the one-graph decoder, side by side in one run (issue 14).

For each class count N, every class kept (k = all, where the decoder's memory is largest), each mode runs in a
fresh process: encode one image, decode once untimed (sessions loaded, first-call allocations done), then
decode again with the same N synthetic text embeddings, and report that decode's wall time and its peak RSS
above the process's RSS before it. Modes alternate per N, so machine noise hits both alike. One graph runs
without ONNX Runtime's memory arena (`--low-memory`, the smaller of its two peaks); the chunked decoder gets
the largest chunk whose predicted peak fits --budget (the memory model of `sed-run --max-memory`; one chunk
of N when one pass fits).

    python benchmarks/chunked_decoder.py --model sed-b --classes 150,459,847 --budget 3 --out benchmarks/results/x
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, time
import numpy as np
from sed_runtime.backends.ort_backend import OrtBackend
from sed_runtime.memory import peak_rss_mb, reset_peak_rss, rss_mb
from sed_runtime.preprocess import load_image
backend = OrtBackend({folder!r}, low_memory=True)
backend.class_chunk = {chunk}
features = backend.encode_image(backend.input_spec.preprocess(load_image({image!r})).tensor)
rng = np.random.default_rng(0)
text = rng.standard_normal(({n}, len(backend.bundle.templates), backend.bundle.embed_dim)).astype(np.float32)
text /= np.linalg.norm(text, axis=-1, keepdims=True)
backend.decode(features, text, None)  # warm-up: sessions loaded, first-call allocations done
base = rss_mb()
reset_peak_rss()
t0 = time.perf_counter()
result = backend.decode(features, text, None)
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "peak_mb": peak_rss_mb() - base, "base_mb": base,
                  "rows": int(result.scores.shape[0])}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sed-b")
    ap.add_argument("--classes", default="150,459,847")
    ap.add_argument("--budget", type=float, default=3.0, help="decoder budget in GiB for the chunk choice")
    ap.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "examples/images/astronaut.jpg"))
    ap.add_argument("--work", default="engines/bench")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from sed_bench.graphs import bench_graphs
    from sed_bench.measure import cpu_model
    from sed_runtime.bundle import Bundle
    from sed_runtime.memory import DecoderMemory, GiB, choose_class_chunk

    folder = bench_graphs(args.model, None, "fp32", Path(args.work))
    bundle = Bundle.open(folder)
    memory = DecoderMemory.from_settings(bundle.manifest["model"]["sed"], len(bundle.templates), "ort-low-memory")
    rows = []
    for n in (int(c) for c in args.classes.split(",")):
        chunk = choose_class_chunk(memory, n, args.budget * GiB) or n  # fits in one pass: one chunk of N
        for mode, c in (("one graph", None), (f"chunks of {chunk}", chunk)):
            code = CHILD.format(folder=str(folder), chunk=c, image=args.image, n=n)
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            row = {"classes": n, "mode": mode, "chunk": c, "process_s": round(time.perf_counter() - t0, 1),
                   "predicted_peak_gib": round((memory.peak_bytes(n) if c is None else
                                                memory.chunked_peak_bytes(n, c)) / GiB, 2)}
            if r.returncode == 0:
                row.update(json.loads(r.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs"
    (out / "results.json").write_text(json.dumps({"model": args.model, "budget_gib": args.budget,
                                                  "image": args.image, "machine": machine, "rows": rows}, indent=2))
    lines = [f"# Class-chunked vs one-graph ONNX Runtime decoder: {args.model}, every class kept", "",
             f"Command: `python benchmarks/chunked_decoder.py --model {args.model} --classes {args.classes} "
             f"--budget {args.budget:g} --out {args.out}`", "",
             f"Machine: {machine}. Random weights, synthetic text (N random unit vectors), one image "
             f"({Path(args.image).name}); each row a fresh process; one graph without the ORT arena.", "",
             "| N | decoder | time s | peak RSS above baseline GB | predicted GB |", "|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mb'] / 1024:.2f}" if "peak_mb" in r else r.get("error", "-")
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        lines.append(f"| {r['classes']} | {r['mode']} | {secs} | {peak} | {r['predicted_peak_gib']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
