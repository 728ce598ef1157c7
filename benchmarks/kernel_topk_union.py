"""Time the top-k-union CUDA op against the torch.topk reference at the decoder's CER sizes.

    python benchmarks/kernel_topk_union.py [--out benchmarks/results/kernel_topk_union] [--iters 200]

C = 847 classes (ADE-847), P = 576 / 2304 / 9216 pixels (the 24^2, 48^2, 96^2 CER points), k = 1, 2, 4, 8,
fp32 and fp16 logits. Both sides return the sorted kept indices on the GPU and read the count back once
(the op reads `count`, the reference's `nonzero` syncs), so each timed call is one host round trip; times are
CUDA-event medians per call. Every configuration is also checked against `topk_union_reference`. Writes
results.json and report.md naming the device. Refuses to run without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES = 847
PIXELS = (576, 2304, 9216)
KS = (1, 2, 4, 8)
DTYPES = ("float32", "float16")


def _time_ms(fn, iters: int, warmup: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Per-call CUDA-event times in ms (each call already synchronises to read its count)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_topk_union")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "kernel_topk_union: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed or written",
            file=sys.stderr,
        )
        return 2
    from sed_export.cer import topk_union
    from sed_export.cuda_ops import CudaOpUnavailable, load_topk_union_op, topk_union_cuda
    from sed_runtime.topk_union_rule import topk_union_reference

    try:
        load_topk_union_op()
    except CudaOpUnavailable as exc:
        print(f"kernel_topk_union: {exc}", file=sys.stderr)
        return 2

    dev = torch.cuda.get_device_properties(0)
    device = f"{dev.name} (sm_{dev.major}{dev.minor}, {dev.total_memory / 2**30:.0f} GiB)"
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    rows = []
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for p in PIXELS:
            logits = torch.randn(CLASSES, p, device="cuda", generator=gen).to(dtype)
            host = logits.cpu().numpy()
            for k in KS:
                got = topk_union_cuda(logits, k)
                expected = topk_union_reference(host, k)
                matches = got.cpu().tolist() == expected.tolist()
                op_t = _time_ms(lambda: topk_union_cuda(logits, k), args.iters, args.warmup)  # noqa: B023
                ref_t = _time_ms(lambda: topk_union(logits, k), args.iters, args.warmup)  # noqa: B023
                row = {
                    "dtype": dtype_name,
                    "classes": CLASSES,
                    "pixels": p,
                    "k": k,
                    "kept": int(got.numel()),
                    "matches_rule": matches,
                    "op_ms_median": statistics.median(op_t),
                    "op_ms_p90": _p(op_t, 0.9),
                    "ref_ms_median": statistics.median(ref_t),
                    "ref_ms_p90": _p(ref_t, 0.9),
                }
                row["speedup"] = row["ref_ms_median"] / row["op_ms_median"]
                rows.append(row)
                print(
                    f"{dtype_name:8s} P={p:5d} k={k}: op {row['op_ms_median']:.4f} ms, torch.topk reference "
                    f"{row['ref_ms_median']:.4f} ms, kept {row['kept']}, matches rule: {matches}"
                )

    meta = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "iters": args.iters,
        "warmup": args.warmup,
        "timing": "CUDA events per call, median; each call reads the kept count back (one sync) on both sides",
        "reference": "sed_export.cer.topk_union (torch.topk + scatter + nonzero)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Top-k-union CUDA op vs torch.topk reference",
        "",
        f"Device: **{device}**; torch {meta['torch']} (CUDA {meta['cuda']}); {meta['date']}.",
        f"{meta['timing']}; {args.iters} timed calls after {args.warmup} warm-up calls. C = {CLASSES}.",
        "",
        "| dtype | P | k | kept | op median ms | op p90 ms | reference median ms | speed-up | matches rule |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['pixels']} | {r['k']} | {r['kept']} | {r['op_ms_median']:.4f} | "
            f"{r['op_ms_p90']:.4f} | {r['ref_ms_median']:.4f} | {r['speedup']:.2f}x | {r['matches_rule']} |"
        )
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'}")
    return 0 if all(r["matches_rule"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
