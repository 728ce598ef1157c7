"""`sed-eval`: mIoU, pixel accuracy and per-class IoU of any model/bundle/backend over a labelled dataset.

    sed-eval --data shapes:200 --topk all,8,1                      # the shipped trained model, torch
    sed-eval engines/shapes-fp16 --backend torch,ort --data shapes:200 --out benchmarks/results/NAME
    sed-eval engines/ade --data ADE/validation --vocab ade150 --reduce-zero-label

`--data shapes:N` generates N held-out scenes from a seed training never used; a folder holds `images/` and
`labels/` (label PNGs with the images' stems). Reports: report.md (mIoU per k with ms/image beside it, the
paper's layout), results.json and results.csv.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sed_runtime.cli_common import check_output_folder, user_errors

app = typer.Typer(help="Evaluate SED segmentation against ground truth (mIoU).", add_completion=False)


def _parse_topks(value: str) -> list[int | None]:
    from sed_runtime.cli_common import parse_topk

    ks = [parse_topk(v) for v in value.split(",") if v.strip()]
    if not ks:
        from sed_runtime.errors import SedUserError

        raise SedUserError("--topk needs at least one value, e.g. all,8")
    return ks


@app.command()
@user_errors
def main(
    bundles: Annotated[Optional[list[Path]], typer.Argument(
        help="Bundle folders (else the torch reference of --model); ort/trt run each, torch the first's model.",
        metavar="[BUNDLE]...")] = None,
    data: Annotated[str, typer.Option(help="shapes:N (generated held-out scenes) or a folder with images/ and "
                                      "labels/.")] = "shapes:100",
    labels: Annotated[Optional[Path], typer.Option(help="Label folder, when not DATA/labels.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of generated scenes (default: the held-out seed).")] = None,
    model: Annotated[str, typer.Option(help="Built-in model or model JSON (without a bundle).")] = "sed-shapes",
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="Checkpoint (default: the model's shipped weights).")] = None,
    backend: Annotated[str, typer.Option(help="torch, ort, openvino, trt, auto, or several side by side: torch,ort "
                                         "(the first is the reference for seg agreement); openvino:bf16 runs "
                                         "OpenVINO with bf16 inference.")] = "auto",
    precision: Annotated[str, typer.Option(help="Torch backend precision: fp32 or fp16 (autocast).")] = "fp32",
    vocab: Annotated[Optional[str], typer.Option(help="Vocabulary (default: shapes for generated data, else the "
                                                 "bundle's).")] = None,
    topk: Annotated[str, typer.Option(help="Comma-separated k values; 'all' = no CER.")] = "all,8",
    ignore_index: Annotated[int, typer.Option(help="Label value that is not scored.")] = 255,
    reduce_zero_label: Annotated[bool, typer.Option("--reduce-zero-label", help="Labels count from 1 and 0 means "
                                                    "'other' (ADE20K-150 style): 0 -> ignore, k -> k-1.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write report.md, results.json, results.csv here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace reports in --out.")] = False,
    device: Annotated[str, typer.Option(help="Torch device: cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Score segmentation against labels; prints mIoU per backend and k."""
    from sed_runtime.errors import SedUserError
    from sed_runtime.outputs import refuse_overwrite
    from sed_runtime.scenes import parse_scene_spec

    topks = _parse_topks(topk)
    backends = [b.strip() for b in backend.split(",") if b.strip()]
    if not backends or len(set(backends)) != len(backends):
        raise SedUserError(f"--backend {backend!r}: list each backend once, e.g. torch,ort")
    if precision not in ("fp32", "fp16"):
        raise SedUserError(f"--precision must be fp32 or fp16, got {precision!r}")
    if out is not None:  # check where the reports go before any work
        check_output_folder(out)
        refuse_overwrite([out / n for n in ("report.md", "results.json", "results.csv")], force)
    generated = parse_scene_spec(data)
    if generated is None and seed is not None:
        raise SedUserError("--seed only applies to generated data (--data shapes:N)")
    from sed_runtime.bundle import Bundle, find_bundle_dir
    from sed_runtime.vocab import Vocabulary, load_vocabulary

    bundle_dirs: list[Path] = []
    for bundle in bundles or []:
        if not bundle.exists():
            raise SedUserError(f"bundle {bundle} not found; pass the folder written by `sed-export build`")
        found = find_bundle_dir(bundle)
        if found is None:
            raise SedUserError(f"{bundle} is not a bundle (no manifest.json); pass the folder of `sed-export build`")
        bundle_dirs.append(found)
    bundle_dir = bundle_dirs[0] if bundle_dirs else None
    if vocab is not None:
        vocabulary = load_vocabulary(vocab)
    elif generated is not None:
        vocabulary = load_vocabulary("shapes")
    elif bundle_dir is not None:
        voc = Bundle.open(bundle_dir, verify=False).manifest["vocabulary"]
        vocabulary = Vocabulary(voc["name"], tuple(voc["classes"]))
    else:
        raise SedUserError("no vocabulary: pass --vocab naming the classes the label indices refer to")

    from sed_runtime.evaluation import EVAL_SEED, folder_dataset, generated_dataset, run_eval

    if generated is not None:
        if vocabulary.name != "shapes":
            raise SedUserError("generated scenes are labelled with the 'shapes' vocabulary; drop --vocab or use shapes")
        dataset = generated_dataset(generated, EVAL_SEED if seed is None else seed)
    else:
        root = Path(data)
        if not root.exists():
            raise SedUserError(f"dataset {data!r} not found: pass shapes:N or a folder with images/ and labels/")
        dataset = folder_dataset(root / "images", labels or root / "labels", len(vocabulary),
                                 ignore_index=ignore_index, reduce_zero=reduce_zero_label)

    from sed_runtime.backends import make_backend
    from sed_runtime.pipeline import SedPipeline

    from .evaluate import render_markdown, write_reports

    pipelines = {}
    for name in backends:
        targets = [bundle_dir] if name == "torch" or not bundle_dirs else bundle_dirs
        for target in targets:
            engine = make_backend(name, bundle=target, model=model, checkpoint=checkpoint,
                                  device=device if name in ("torch", "auto") else "cpu", torch_precision=precision)
            if engine.name == "torch":
                label = f"torch {precision}"
            else:
                label = f"{engine.name} {Bundle.open(target, verify=False).manifest['precision']}"
                if getattr(engine, "precision", "fp32") != "fp32":  # openvino:bf16
                    label += f" ({engine.precision} inference)"  # type: ignore[attr-defined]
                if label in pipelines:
                    label = f"{label} ({target.name})"
            _check_memory(engine, len(vocabulary), topks)
            pipelines[label] = SedPipeline(engine, vocabulary, topk=topks[0], progress=progress)
    run = run_eval(pipelines, topks, dataset, len(vocabulary), progress=progress)
    if out is not None:
        write_reports(run, out)
    table = render_markdown(run).split("## Per-class IoU")[0]
    print(table.rstrip())
    if out is not None:
        print(f"\nreports written to {out}")


def _check_memory(engine: object, num_classes: int, topks: list[int | None]) -> None:
    """As sed-run does: refuse before any image a decoder predicted not to fit in the free memory (the
    largest k asked for decides; 'all' keeps every class)."""
    from sed_runtime.memory import available_bytes, check_fits

    worst = None if None in topks else max(k for k in topks if k is not None)
    random_weights = "random" in str(engine.describe().get("weights", ""))  # type: ignore[attr-defined]
    note = check_fits(engine.decoder_memory(), num_classes, worst, random_weights=random_weights,  # type: ignore[attr-defined]
                      budget_bytes=available_bytes())
    if note:
        print(note)


if __name__ == "__main__":
    app()
