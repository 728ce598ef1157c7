"""`sed-run`: segment images with a SED model and a vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_common import expand_images, parse_topk, unique_stems, user_errors

app = typer.Typer(help="Run SED open-vocabulary segmentation on images.", no_args_is_help=True, add_completion=False)


@app.callback()
def _main() -> None:
    """Run SED open-vocabulary segmentation on images."""


@app.command()
@user_errors
def infer(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="[BUNDLE] IMAGE...: an optional bundle (its folder or any file in it, e.g. "
            "engines/sed-b-fp16/encoder.plan), then image files, folders or globs.",
            metavar="[BUNDLE] IMAGE...",
        ),
    ],
    vocab: Annotated[
        Optional[str],
        typer.Option(
            help="Built-in vocabulary (ade150, ade847, coco, pc459, pc59, voc20, voc20b) or a .json/.txt "
            "file. Defaults to the bundle's vocabulary."
        ),
    ] = None,
    classes: Annotated[
        Optional[str],
        typer.Option(
            help="Inline classes instead of --vocab: 'cat; dog, puppy; sky' (';' between "
            "classes, ',' between synonyms)."
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Built-in model (sed-tiny, sed-b, sed-l) or a model JSON file (without a bundle).")
    ] = "sed-tiny",
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Official SED .pth checkpoint. Without it the weights are random.")
    ] = None,
    topk: Annotated[str, typer.Option(help="Classes kept per pixel at each CER point, or 'all'.")] = "8",
    backend: Annotated[
        str,
        typer.Option(
            help="auto (trt for a bundle with TensorRT plans on a GPU with TensorRT, ort for other bundles, torch "
            "otherwise), ort, trt or torch."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="Torch device for --backend torch (cpu, cuda).")] = "cpu",
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers: cpu, auto, cuda, tensorrt.")] = "cpu",
    low_memory: Annotated[
        bool, typer.Option("--low-memory", help="ONNX Runtime: no CPU memory arena for the decoder (about half "
                           "the peak RSS for large vocabularies with --topk all; somewhat slower).")
    ] = False,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("out"),
    save_npz: Annotated[
        bool, typer.Option("--save-npz", help="Also write scores, seg and kept indices (npz).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Allow a checkpoint that needs pickle (runs code: trusted files only)."),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Segment images; writes <name>_overlay.png, <name>.json (and <name>.npz) per image into --out."""
    from rich.console import Console

    from .backends import make_backend
    from .bundle import Bundle, find_bundle_dir
    from .cli_common import IMAGE_SUFFIXES
    from .errors import SedUserError
    from .outputs import output_paths, refuse_overwrite, write_outputs
    from .preprocess import load_image
    from .vocab import Vocabulary, load_vocabulary

    console = Console(stderr=True)
    k = parse_topk(topk)
    bundle_dir = None
    first = Path(inputs[0])
    if first.is_dir() or (first.is_file() and first.suffix.lower() not in IMAGE_SUFFIXES):
        bundle_dir = find_bundle_dir(first)
        if bundle_dir is None and first.is_file():
            raise SedUserError(f"{first} is neither an image nor a file of a bundle (no manifest.json beside it)")
        if bundle_dir is not None:
            inputs = inputs[1:]
            if not inputs:
                raise SedUserError("no images given after the bundle; pass image files, folders or globs")
    if vocab is not None and classes is not None:
        raise SedUserError("pass either --vocab or --classes, not both")
    if vocab is None and classes is None:
        if bundle_dir is None:
            raise SedUserError("no vocabulary: pass --vocab ade150 (or a .json/.txt file) or --classes 'cat; dog'")
        voc = Bundle.open(bundle_dir, verify=False).manifest["vocabulary"]
        vocabulary = Vocabulary(voc["name"], tuple(voc["classes"]))
    else:
        vocabulary = load_vocabulary(vocab, classes=classes)
    paths = expand_images(inputs)
    for p in paths:  # decode everything first: a bad image stops the run before anything is written
        load_image(p)
    stems = unique_stems(paths)
    planned = [output_paths(out, s, save_npz) for s in stems]
    refuse_overwrite([p for d in planned for p in d.values()], force)

    engine = make_backend(
        backend,
        bundle=bundle_dir,
        model=model,
        checkpoint=checkpoint,
        device=device,
        providers=providers,
        allow_pickle=allow_pickle,
        low_memory=low_memory,
    )
    if "random" in str(engine.describe().get("weights", "")):
        console.print("note: random weights (no checkpoint), so the masks are random", markup=False)
    from .pipeline import SedPipeline

    pipe = SedPipeline(engine, vocabulary, topk=k, progress=progress)
    from tqdm import tqdm

    for path, files in tqdm(
        list(zip(paths, planned)), desc="images", unit="img", disable=not progress or len(paths) < 2
    ):
        image = load_image(path)
        result = pipe(image)
        extra = {"image": str(path), "vocabulary": vocabulary.name, **engine.describe()}
        write_outputs(result, image, files, extra)
        present = ", ".join(c["name"].split(", ")[0] for c in result.classes_present()[:5])
        console.print(
            f"{path}: {result.timings_ms['total']:.0f} ms, top classes: {present} -> {files['overlay']}", markup=False,
            soft_wrap=True,  # one line per image, also when piped (rich would wrap at 80 columns)
        )


if __name__ == "__main__":
    app()
