"""The class-chunked decoder against the one-graph decoder, side by side in one run (issue 14).

For each class count N, every class kept (k = all, where the decoder's memory is largest), each backend
(ONNX Runtime, OpenVINO, torch) and mode runs in a fresh process: encode one image, decode once untimed on
fewer classes (first-call allocations; OpenVINO compiled for this N, or for every chunk size), then decode the
N synthetic text embeddings, and report that decode's wall time and the peak RSS of both decodes above the
process's RSS after the encoder (so OpenVINO's compiled programs count). Backends and modes alternate per N,
so machine noise hits all alike. One graph runs without ONNX Runtime's memory arena (`--low-memory`, the
smaller of its two peaks), and only up to --one-graph-max classes; the chunked decoder gets the largest chunk
whose predicted peak fits --budget (the memory model of `sed-run --max-memory`; one chunk of N when one pass
fits).

    python benchmarks/chunked_decoder.py --model sed-b --classes 459,847 --backends ort,openvino,torch \
        --budget 3 --out benchmarks/results/x
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
from sed_runtime.memory import peak_rss_mb, reset_peak_rss, rss_mb
from sed_runtime.preprocess import load_image
if {backend!r} == "ort":
    from sed_runtime.backends.ort_backend import OrtBackend
    backend = OrtBackend({folder!r}, low_memory=True)
elif {backend!r} == "openvino":
    from sed_runtime.backends.openvino_backend import OpenVinoBackend
    backend = OpenVinoBackend({folder!r})
else:
    import torch
    torch.set_num_threads(2)
    from sed_runtime.backends.torch_backend import TorchBackend
    backend = TorchBackend({model!r})
backend.class_chunk = {chunk}
features = backend.encode_image(backend.input_spec.preprocess(load_image({image!r})).tensor)
rng = np.random.default_rng(0)
text = rng.standard_normal(({n}, {templates}, {embed_dim})).astype(np.float32)
text /= np.linalg.norm(text, axis=-1, keepdims=True)
base = rss_mb()  # after the encoder: the peak counts everything the decoder adds, compiled programs included
reset_peak_rss()
# warm-up: first-call allocations, programs compiled (OpenVINO: for this N, or for every chunk size up to the chunk)
chunk = backend.class_chunk
warm = {n} if chunk is None and {backend!r} == "openvino" else min({n}, 2 * (chunk or 32) - 1)
backend.decode(features, text[:warm], None)
t0 = time.perf_counter()
result = backend.decode(features, text, None)
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "peak_mb": peak_rss_mb() - base, "base_mb": base,
                  "compile_ms": result.timings_ms.get("decoder_compile", 0.0),
                  "rows": int(result.scores.shape[0])}}))
"""

MEMORY_MODEL = {"ort": "ort-low-memory", "openvino": "openvino", "torch": "torch"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sed-b")
    ap.add_argument("--classes", default="150,459,847")
    ap.add_argument("--backends", default="ort", help="comma-separated: ort, openvino, torch")
    ap.add_argument("--one-graph-max", type=int, default=500,
                    help="largest N run as one graph too (sed-b at 847 needs about 20 GB that way)")
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
    rows = []
    for n in (int(c) for c in args.classes.split(",")):
        for backend in args.backends.split(","):
            memory = DecoderMemory.from_settings(bundle.manifest["model"]["sed"], len(bundle.templates),
                                                 MEMORY_MODEL[backend])
            chunk = choose_class_chunk(memory, n, args.budget * GiB) or n  # fits in one pass: one chunk of N
            modes = [("one graph", None)] if n <= args.one_graph_max else []
            for mode, c in (*modes, (f"chunks of {chunk}", chunk)):
                code = CHILD.format(folder=str(folder), chunk=c, image=args.image, n=n, backend=backend,
                                    model=args.model, templates=len(bundle.templates), embed_dim=bundle.embed_dim)
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                row = {"classes": n, "backend": backend, "mode": mode, "chunk": c,
                       "process_s": round(time.perf_counter() - t0, 1),
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
    lines = [f"# Class-chunked vs one-graph decoder: {args.model}, every class kept", "",
             f"Command: `python benchmarks/chunked_decoder.py --model {args.model} --classes {args.classes} "
             f"--backends {args.backends} --budget {args.budget:g} --out {args.out}`", "",
             f"Machine: {machine}. Random weights, synthetic text (N random unit vectors), one image "
             f"({Path(args.image).name}); each row a fresh process, warmed up on fewer classes; peak RSS above the "
             "process after the encoder; ONNX Runtime without its memory arena; OpenVINO's compile time is not in the "
             "decode time.", "",
             "| N | backend | decoder | time s | peak RSS above baseline GiB | predicted GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mb'] / 1024:.2f}" if "peak_mb" in r else r.get("error", "-")
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        lines.append(f"| {r['classes']} | {r['backend']} | {r['mode']} | {secs} | {peak} | "
                     f"{r['predicted_peak_gib']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
