"""`sed-bench`: the paper's Table 7 grid (vocabularies x top-k) per backend, end to end and per stage.

    sed-bench --model sed-b --backend torch,ort --vocabs ade847,pc459,ade150,pc59,voc20 \
        --topk 1,2,4,8,all --kept paper --text synthetic --out benchmarks/results/NAME

Writes report.md (Table 7 layout, the paper's A6000 numbers beside ours), cells.csv, results.json and
latency_vs_k.png into --out. Without the official checkpoint CER keeps almost every class, so use
`--kept paper` (or explicit counts) for a SYNTHETIC latency-versus-k; with `--checkpoint` and your own
images the kept counts are measured. Heavy imports happen inside the command, so `--help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sed_runtime.cli_common import check_output_folder, user_errors

app = typer.Typer(help="Benchmark SED latency per stage over vocabularies x top-k (the paper's Table 7 grid).",
                  add_completion=False)

DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "images" / "astronaut.jpg"
SHAPES_IMAGE = DEFAULT_IMAGE.with_name("shapes.jpg")  # the default for the trained model's vocabulary


@app.command()
@user_errors
def main(
    bundle: Annotated[Optional[Path], typer.Argument(
        help="Bundle folder from `sed-export build` (ort runs it; torch runs the model it was built from).")] = None,
    model: Annotated[str, typer.Option(help="Built-in model or model JSON file (without a bundle).")] = "sed-tiny",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Official checkpoint (random weights otherwise).")] = None,
    backend: Annotated[str, typer.Option(
        help="torch, ort, openvino, trt (a bundle with TensorRT plans), or several: torch,ort. Variants: ort:int8, "
             "openvino:int8 (encoder calibrated with --calib), openvino:bf16 (bf16 inference), openvino:int8+bf16."
    )] = "torch",
    vocabs: Annotated[str, typer.Option(help="Comma-separated built-in names or class-list files.")] = "voc20",
    topk: Annotated[str, typer.Option(help="Comma-separated k values; 'all' = every class, no CER.")] = "1,2,4,8,all",
    images: Annotated[Optional[str], typer.Option(
        help="Image file, folder or glob (default: the shipped example).")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls per cell.")] = 1,
    iters: Annotated[int, typer.Option(min=1, help="Timed passes over the images per cell.")] = 3,
    kept: Annotated[Optional[str], typer.Option(
        help="SYNTHETIC mode: force the kept counts, 'CER0,CER1,CER2' or 'paper' (implied by Table 7).")] = None,
    text: Annotated[str, typer.Option(help="real (text tower / cache) or synthetic (random unit vectors).")] = "real",
    device: Annotated[str, typer.Option(help="Torch device: cpu or cuda[:i].")] = "cpu",
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers: cpu, cuda, tensorrt or auto.")] = "cpu",
    precision: Annotated[str, typer.Option(
        help="fp32 or fp16: torch runs under autocast; ort exports such graphs (without a bundle).")] = "fp32",
    threads: Annotated[Optional[int], typer.Option(
        min=1, help="CPU threads for torch and ORT (default: theirs).")] = None,
    ort_profile: Annotated[bool, typer.Option(
        help="Split ORT's decoder time into stages with its node profiler.")] = True,
    low_memory: Annotated[bool, typer.Option(
        "--low-memory", help="ONNX Runtime decoder without the CPU memory arena (as sed-run --low-memory).")] = False,
    max_rss_gb: Annotated[Optional[float], typer.Option(
        help="Skip cells whose peak RSS, extrapolated from the cells measured before, would exceed this.")] = None,
    max_memory: Annotated[Optional[float], typer.Option(
        help="Decoder memory budget in GiB (its working set, beyond what the process holds): a cell whose one-pass "
             "decoder is predicted to exceed it runs class-chunked (torch, ort, openvino, trt); the report says with "
             "what chunk.")] = None,
    class_chunk: Annotated[Optional[int], typer.Option(
        help="Run every cell class-chunked with this many classes per step (capped at N), whatever --max-memory "
             "would choose: what a chunk size costs.")] = None,
    calib: Annotated[str, typer.Option(
        help="int8 variants without a bundle: calibration images, a folder or 'shapes' (generated scenes).")] = (
        "shapes"),
    calib_images: Annotated[int, typer.Option(min=1, help="int8 variants: images drawn for calibration.")] = 8,
    calib_seed: Annotated[int, typer.Option(help="int8 variants: seed of the calibration draw.")] = 0,
    calib_method: Annotated[str, typer.Option(help="int8 variants: minmax, entropy or percentile ranges.")] = "minmax",
    work: Annotated[Path, typer.Option(
        help="Cache folder for the ONNX graphs exported (and calibrated) for ort/openvino without a bundle.")] = Path(
        "engines/bench"),
    out: Annotated[Optional[Path], typer.Option(
        help="Report folder (report.md, cells.csv, results.json, png).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into an existing --out.")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Allow pickled checkpoints (trusted only).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over the grid.")] = True,
) -> None:
    """Time every (vocabulary, k) cell on each backend: median/p90 ms per stage, kept counts, peak memory."""
    from sed_runtime.cli_common import expand_images
    from sed_runtime.errors import SedUserError

    from .grid import backend_kind, backend_variants, build_grid, parse_backends, parse_kept, parse_topks, parse_vocabs

    backends = parse_backends(backend)
    kinds = {backend_kind(b) for b in backends}
    int8 = [b for b in backends if "int8" in backend_variants(b)]
    if int8 and bundle is not None:
        raise SedUserError(f"--backend {int8[0]} calibrates bench graphs of --model; with a BUNDLE, benchmark an int8 "
                           "bundle (`sed-export build --precision int8`) as plain ort/openvino")
    if int8 and calib != "shapes" and not Path(calib).is_dir():
        raise SedUserError(f"--calib {calib}: not a folder; pass a folder of images or 'shapes'")
    ks = parse_topks(topk)
    kept_spec = parse_kept(kept)
    if text not in ("real", "synthetic"):
        raise SedUserError(f"--text must be 'real' or 'synthetic', got {text!r}")
    if precision not in ("fp32", "fp16"):
        raise SedUserError(f"--precision must be fp32 or fp16, got {precision!r}")
    if max_memory is not None and max_memory <= 0:
        raise SedUserError(f"--max-memory must be a positive number of GiB, got {max_memory}")
    if class_chunk is not None and class_chunk < 1:
        raise SedUserError(f"--class-chunk must be a positive number of classes, got {class_chunk}")
    if class_chunk is not None and max_memory is not None:
        raise SedUserError("--class-chunk fixes the chunk, --max-memory chooses one: pass one of them")
    if kept_spec is not None and all(k is None for k in ks):
        raise SedUserError("--kept forces the CER points, but --topk all has none; add k values, e.g. --topk 1,8,all")
    vocab_list = parse_vocabs(vocabs)
    cells = build_grid(vocab_list, ks, kept_spec)
    default = SHAPES_IMAGE if all(v.name == "shapes" for _, v in vocab_list) else DEFAULT_IMAGE
    image_paths = expand_images([images] if images else [str(default)])
    if checkpoint is not None and not checkpoint.is_file():
        raise SedUserError(f"checkpoint {checkpoint} not found; pass the official .pth/.safetensors file")
    if bundle is not None and not bundle.exists():
        raise SedUserError(f"bundle {bundle} not found; build one with `sed-export build` or drop the argument")
    if out is not None:
        check_output_folder(out)
        if out.exists() and not force:
            raise SedUserError(f"{out} already exists; pass --force to overwrite or choose another --out")

    from sed_export.calibration import METHODS, CalibrationRequest

    if calib_method not in METHODS:
        raise SedUserError(f"--calib-method must be one of {', '.join(METHODS)}, got {calib_method!r}")
    from .report import console_summary, finalize, write_reports
    from .runner import BenchConfig, run_bench

    cfg = BenchConfig(
        backends=backends, vocabs=vocab_list, cells=cells, images=image_paths, model=model, checkpoint=checkpoint,
        bundle=bundle, text=text, kept_spec=kept_spec, warmup=warmup, iters=iters, device=device,
        providers=providers, precision=precision, threads=threads, ort_profile=ort_profile, low_memory=low_memory,
        max_rss_gb=max_rss_gb, max_memory_gb=max_memory, class_chunk=class_chunk, work=work, allow_pickle=allow_pickle,
        calibration=CalibrationRequest(calib, calib_images, calib_seed, method=calib_method),
    )
    argv = ["sed-bench"] + ([str(bundle)] if bundle else []) + (["--model", model] if bundle is None else [])
    opts = {"--checkpoint": checkpoint, "--backend": ",".join(backends), "--vocabs": vocabs, "--topk": topk,
            "--images": images, "--warmup": warmup, "--iters": iters, "--kept": kept, "--text": text,
            "--device": device if "torch" in kinds else None,
            "--providers": providers if "ort" in kinds else None,
            "--precision": precision if "torch" in kinds or (kinds & {"ort", "openvino"} and bundle is None) else None,
            "--calib": calib if int8 else None, "--calib-images": calib_images if int8 else None,
            "--calib-seed": calib_seed if int8 else None, "--calib-method": calib_method if int8 else None,
            "--threads": threads,
            "--max-rss-gb": max_rss_gb, "--max-memory": max_memory, "--class-chunk": class_chunk,
            "--out": out}
    for flag, value in opts.items():
        if value is not None:
            argv += [flag, str(value)]
    if low_memory:
        argv.append("--low-memory")
    cfg.argv = argv

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    partial = None if out is None else out / "results.partial.json"

    def save_partial(results: dict) -> None:  # a long run killed half-way still leaves its cells
        assert partial is not None
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(results, indent=2) + "\n")

    results = run_bench(cfg, log=log, progress=progress, on_cell=None if out is None else save_partial)
    if out is not None:
        written = write_reports(results, out)
        partial.unlink(missing_ok=True)  # type: ignore[union-attr]
        for line in console_summary(results):
            print(line)
        print("reports: " + ", ".join(str(p) for p in written.values()))
    else:
        finalize(results)
        for line in console_summary(results):
            print(line)


if __name__ == "__main__":
    app()
