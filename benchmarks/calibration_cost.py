"""What int8 calibration costs: time and peak memory per range method (MinMax, Entropy, Percentile).

Each method calibrates and quantizes the same fp32 encoder from the same preprocessed images in a fresh process
(so its peak RSS is its own), with the ranges cache off (every run calibrates). Preprocessing is timed once,
apart. Each int8 encoder is then compared with the fp32 one on held-out generated scenes (cosine and SQNR of the
dense output, on ONNX Runtime). Random weights unless --checkpoint: speed and memory do not depend on them;
accuracy per method is judged on the trained model (`calib/README.md`).

    python benchmarks/calibration_cost.py --model sed-b --images 32 --out benchmarks/results/cpu-sed-b-calibration
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED, HELD_OUT = 1000, 2  # sed-eval's held-out scenes


def _fp32_encoder(model: str, checkpoint: Path | None, work: Path) -> Path:
    from sed_bench.graphs import bench_graphs

    return bench_graphs(model, checkpoint, "fp32", work, log=lambda m: print(m, file=sys.stderr)) / "encoder.onnx"


def _tensors(model: str, checkpoint: Path | None, images: int, encoder: Path) -> tuple[np.ndarray, float, bool]:
    from sed_export.calibration import calibration_set, calibration_tensors
    from sed_runtime.bundle import Bundle, sha256_file

    bundle = Bundle.open(encoder.parent)
    t0 = time.perf_counter()
    tensors, cached = calibration_tensors(bundle.manifest["model"]["name"],
                                          None if checkpoint is None else sha256_file(checkpoint),
                                          bundle.input_spec, calibration_set("shapes", images, 0))
    return tensors, time.perf_counter() - t0, cached


def one(args: argparse.Namespace) -> dict:
    """Child process: calibrate + quantize with one method; compare with fp32 on held-out scenes."""
    import onnxruntime as ort

    from sed_export.calibration import quantize_encoder
    from sed_runtime.bundle import Bundle
    from sed_runtime.scenes import generate_scene

    encoder = _fp32_encoder(args.model, args.checkpoint, args.work)
    tensors, _, _ = _tensors(args.model, args.checkpoint, args.images, encoder)
    out = args.work / f"calib-cost-{args.one}.onnx"
    t0 = time.perf_counter()
    record = quantize_encoder(encoder, out, tensors, "cpu", method=args.one)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del tensors
    spec = Bundle.open(encoder.parent).input_spec
    fp32 = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    cos, sqnr = [], []
    for i in range(HELD_OUT):
        x = spec.preprocess(generate_scene(HELD_OUT_SEED, i).image).tensor
        a = fp32.run(["dense"], {"image": x})[0].ravel().astype(np.float64)
        b = int8.run(["dense"], {"image": x})[0].ravel().astype(np.float64)
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        sqnr.append(float(10 * np.log10((a @ a) / max(((a - b) @ (a - b)), 1e-30))))
    out.unlink()
    return {"method": args.one, "ort_method": record["method"], "calibrate_and_quantize_s": round(seconds, 1),
            "peak_rss_gib": round(peak_gib, 2), "quantized_nodes": record["quantized_nodes"],
            "dense_cosine_vs_fp32": round(float(np.mean(cos)), 5), "dense_sqnr_db": round(float(np.mean(sqnr)), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sed-b")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--methods", default="minmax,entropy,percentile")
    ap.add_argument("--work", type=Path, default=Path("engines/bench"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.one:
        print(json.dumps(one(args)))
        return 0
    if args.out is None:
        ap.error("--out is required")
    from sed_bench.measure import machine_info, versions
    from sed_bench.report import write_script_report

    encoder = _fp32_encoder(args.model, args.checkpoint, args.work)
    _, prep_s, cached = _tensors(args.model, args.checkpoint, args.images, encoder)
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--model", args.model, "--images", str(args.images),
               "--work", str(args.work)] + (["--checkpoint", str(args.checkpoint)] if args.checkpoint else [])
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            rows.append({"method": method, "failed": r.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append({**json.loads(r.stdout.strip().splitlines()[-1]),
                         "process_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/calibration_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "machine": machine_info(), "versions": versions(), "model": args.model,
              "images": args.images, "preprocess_s": round(prep_s, 1), "preprocess_cached": cached, "rows": rows}
    m = report["machine"]
    lines = [f"# INT8 calibration cost: {args.model} encoder, {args.images} images", "",
             f"Command: `{command}`", "",
             f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs, {m['memory_gib']} GiB, load at start "
             f"{m.get('load_average_at_start')}. Weights: {'random' if args.checkpoint is None else args.checkpoint}.",
             "",
             f"Preprocessing the {args.images} generated scenes (`--calib shapes`): {prep_s:.1f} s"
             f"{' (from the cache)' if cached else ''}. Each method then runs in its own process: `quant_pre_process`, "
             "ONNX Runtime's calibration one image at a time, QDQ quantization (Conv/MatMul/Gemm, U8 activations, "
             f"S8 per-channel weights). Accuracy: the dense output against fp32 on {HELD_OUT} held-out scenes.", "",
             "| method | calibrate + quantize s | process s | peak RSS GiB | dense cosine vs fp32 | dense SQNR dB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['method']} | failed: {r['failed']} | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['calibrate_and_quantize_s']} | {r['process_s']} | "
                         f"{r['peak_rss_gib']} | {r['dense_cosine_vs_fp32']} | {r['dense_sqnr_db']} |")
    write_script_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
