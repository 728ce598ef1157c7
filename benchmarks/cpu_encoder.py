"""The CPU encoder paths side by side: torch eager fp32, ONNX Runtime fp32 / int8, OpenVINO fp32 / bf16 / int8.

The encoder is what a CPU run of sed-b spends its time on, and what int8 quantizes. All paths run the same
preprocessed image, interleaved per iteration so machine noise hits all alike; the first call of each is a
warm-up and not counted. Bundles are built here (random weights: speed does not depend on them; accuracy is
judged on the trained model, see calib/README.md).

    python benchmarks/cpu_encoder.py --model sed-b --iters 5 --out benchmarks/results/cpu-sed-b-encoder
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sed-b")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("engines/bench-cpu"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sed_bench.measure import machine_info, versions
    from sed_bench.report import write_script_report
    from sed_export.bundle import build_bundle
    from sed_export.calibration import CalibrationRequest
    from sed_runtime.backends.openvino_backend import OpenVinoBackend
    from sed_runtime.backends.ort_backend import OrtBackend
    from sed_runtime.backends.torch_backend import TorchBackend
    from sed_runtime.preprocess import load_image
    from sed_runtime.vocab import Vocabulary

    vocab = Vocabulary("two", ("cat", "dog"))
    bundles = {}
    for precision in ("fp32", "int8"):
        path = args.work / f"{args.model}-{precision}"
        if not (path / "manifest.json").is_file():
            t0 = time.perf_counter()
            build_bundle(args.model, vocab, path, precision=precision, force=True, progress=False,
                         calibration=CalibrationRequest("shapes", args.calib_images) if precision == "int8" else None,
                         log=lambda *_: None)
            print(f"built {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        bundles[precision] = path
    paths = {
        "torch eager fp32": TorchBackend(args.model),
        "onnxruntime fp32": OrtBackend(bundles["fp32"]),
        "onnxruntime int8": OrtBackend(bundles["int8"]),
        "openvino fp32": OpenVinoBackend(bundles["fp32"]),
        "openvino bf16 hint": OpenVinoBackend(bundles["fp32"], precision="bf16"),
        "openvino int8": OpenVinoBackend(bundles["int8"]),
    }
    image = paths["onnxruntime fp32"].input_spec.preprocess(
        load_image(Path(__file__).resolve().parents[1] / "examples" / "images" / "shapes.jpg")).tensor
    times: dict[str, list[float]] = {k: [] for k in paths}
    outputs: dict[str, np.ndarray] = {}
    for it in range(args.iters + 1):
        for name, backend in paths.items():
            t0 = time.perf_counter()
            feats = backend.encode_image(image)
            ms = (time.perf_counter() - t0) * 1e3
            if it:
                times[name].append(ms)
            else:
                data = feats.data
                outputs[name] = np.asarray(data.dense.float().numpy() if hasattr(data, "dense") else data["dense"])
    ref = outputs["onnxruntime fp32"].ravel()
    ref_median = float(np.median(times["torch eager fp32"]))
    rows = []
    for name in paths:
        med = float(np.median(times[name]))
        out = outputs[name].ravel()
        cos = float(np.dot(out, ref) / (np.linalg.norm(out) * np.linalg.norm(ref)))
        rows.append({"path": name, "median_ms": round(med, 1), "min_ms": round(min(times[name]), 1),
                     "vs_torch_eager": round(ref_median / med, 2), "dense_cosine_vs_ort_fp32": round(cos, 5)})
    report = {"command": "python benchmarks/cpu_encoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "versions": versions(), "model": args.model, "iters": args.iters,
              "input": list(image.shape), "rows": rows}
    m = report["machine"]
    lines = [f"# CPU encoder paths: {args.model}, {image.shape[-1]} x {image.shape[-1]}", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs, {m['memory_gib']} GiB, load at start "
             f"{m.get('load_average_at_start')}; {args.iters} timed iterations after one warm-up, paths interleaved.",
             "Random weights (speed does not depend on them); the cosine compares each path's dense output with "
             "ONNX Runtime fp32 on the same image.", "",
             "| path | median ms | min ms | speed-up vs torch eager | dense cosine vs ORT fp32 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['median_ms']} | {r['min_ms']} | {r['vs_torch_eager']}x | "
              f"{r['dense_cosine_vs_ort_fp32']} |"
              for r in rows]
    write_script_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
