"""`sed-run`: segment images with a SED model and a vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_common import check_output_folder, expand_images, parse_gib, parse_topk, unique_stems, user_errors

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
            help="Built-in vocabulary (ade150, ade847, coco, pc459, pc59, voc20, voc20b, shapes) or a .json/.txt "
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
        str, typer.Option(help="Built-in model (sed-tiny, sed-shapes, sed-b, sed-l) or a model JSON (no bundle).")
    ] = "sed-tiny",
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Official SED .pth checkpoint. Without it the weights are random.")
    ] = None,
    topk: Annotated[str, typer.Option(help="Classes kept per pixel at each CER point, or 'all'.")] = "8",
    backend: Annotated[
        str,
        typer.Option(
            help="auto (trt for a bundle with TensorRT plans on a GPU with TensorRT; else openvino for a bundle "
            "where it is installed, ort with --low-memory or GPU providers or without openvino; torch otherwise), "
            "ort, openvino (CPU; pip install 'sed-deploy\\[openvino]'; openvino:bf16 for bf16 inference on CPUs with "
            "bf16 or AMX units), trt or torch."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="Torch device for --backend torch (cpu, cuda).")] = "cpu",
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers: cpu, auto, cuda, tensorrt.")] = "cpu",
    low_memory: Annotated[
        bool, typer.Option("--low-memory", help="ONNX Runtime: no CPU memory arena for the decoder (about half "
                           "the peak RSS for large vocabularies with --topk all; somewhat slower).")
    ] = False,
    max_memory: Annotated[Optional[str], typer.Option(
        "--max-memory", help="Memory this process may use, in GiB (default: what it holds now plus what is free); "
        "on a GPU backend, the GPU memory the decoder may use (default: the GPU's free memory). A decoder predicted "
        "to need more runs in class chunks, or is refused before any image is processed.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("out"),
    save_npz: Annotated[
        bool, typer.Option("--save-npz", help="Also write scores, seg and kept indices (npz).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="Skip images whose outputs are all there (resume an interrupted run).")] = False,
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
    from .errors import BundleError, SedUserError
    from .outputs import output_paths, refuse_overwrite, write_outputs
    from .preprocess import load_image
    from .vocab import Vocabulary, load_vocabulary

    console = Console(stderr=True)
    k = parse_topk(topk)
    max_gib = parse_gib(max_memory)
    bundle_dir = None
    first = Path(inputs[0])
    if first.is_dir() or (first.is_file() and first.suffix.lower() not in IMAGE_SUFFIXES):
        bundle_dir = find_bundle_dir(first)
        if bundle_dir is None and first.is_file():
            raise SedUserError(f"{first} is neither an image nor a file of a bundle (no manifest.json beside it)")
        if bundle_dir is None and any(first.glob("*.onnx")):
            raise BundleError(f"{first} holds ONNX graphs but no manifest.json, so it is not a whole bundle; "
                              "rebuild it with `sed-export build --force`")
        if bundle_dir is not None:
            inputs = inputs[1:]
            if not inputs:
                raise SedUserError("no images given after the bundle; pass image files, folders or globs")
    elif not first.exists() and first.suffix.lower() not in IMAGE_SUFFIXES and not any(c in inputs[0] for c in "*?["):
        raise SedUserError(f"{first} not found: the first argument is a bundle folder (from `sed-export build`) or "
                           "an image; check the path")
    paths = expand_images(inputs)  # existence only; decoding comes after the cheap checks
    if bundle_dir is None:  # without a bundle the model comes from --model: check it before the vocabulary
        from sed_export.config import load_model_config

        load_model_config(model)
    if vocab is not None and classes is not None:
        raise SedUserError("pass either --vocab or --classes, not both")
    check_output_folder(out)
    if vocab is None and classes is None:
        if bundle_dir is None:
            raise SedUserError("no vocabulary: pass --vocab ade150 (or a .json/.txt file) or --classes 'cat; dog'")
        voc = Bundle.open(bundle_dir, verify=False).manifest["vocabulary"]
        vocabulary = Vocabulary(voc["name"], tuple(voc["classes"]))
    else:
        vocabulary = load_vocabulary(vocab, classes=classes)
    for p in paths:  # decode everything first: a bad image stops the run before anything is written
        load_image(p)
    stems = unique_stems(paths)
    planned = [output_paths(out, s, save_npz) for s in stems]
    if force and skip_existing:
        raise SedUserError("pass either --force (redo every image) or --skip-existing (only the missing ones)")
    if skip_existing:  # outputs are written whole, so an image with every file present is done
        todo = [i for i, d in enumerate(planned) if not all(p.exists() for p in d.values())]
        if len(todo) < len(paths):
            console.print(f"skipping {len(paths) - len(todo)} image(s) whose outputs exist in {out}", markup=False,
                          soft_wrap=True)
        paths, planned = [paths[i] for i in todo], [planned[i] for i in todo]
        if not paths:
            console.print("nothing to do: every image already has its outputs", markup=False)
            return
    if not skip_existing:  # with it, what remains are images an interrupted run left unfinished: redo them
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
    random_weights = "random" in str(engine.describe().get("weights", ""))
    if random_weights:
        console.print("note: random weights (no checkpoint), so the masks are random", markup=False)
    from .memory import GiB, check_fits, choose_class_chunk, rss_mb

    memory = engine.decoder_memory()
    on_gpu = memory is not None and memory.device == "cuda"
    # host: --max-memory bounds the whole process (what it holds now counts); GPU: the decoder's device memory
    held = 0.0 if on_gpu else (rss_mb() or 0.0) * 2**20
    free = engine.free_memory_bytes()
    budget = max_gib * GiB - held if max_gib is not None else free
    note = None
    chunk = choose_class_chunk(memory, len(vocabulary), budget) if hasattr(engine, "class_chunk") else None
    if chunk is not None:  # one pass over every class would not fit: the decoder runs in class chunks instead
        engine.class_chunk = chunk  # type: ignore[attr-defined]
        note = (f"note: one pass over {len(vocabulary)} classes would need about "  # type: ignore[union-attr]
                f"{memory.peak_bytes(len(vocabulary)) / GiB:.1f} GiB of {'GPU' if on_gpu else 'host'} memory, over "
                f"the {budget / GiB:.1f} GiB budget: the decoder runs {engine.describe()['decoder']}")
    else:
        note = check_fits(memory, len(vocabulary), k, random_weights=random_weights, budget_bytes=budget)
    if note:
        console.print(note, markup=False, soft_wrap=True)
    from .pipeline import SedPipeline

    pipe = SedPipeline(engine, vocabulary, topk=k, progress=progress)
    from tqdm import tqdm

    done = 0
    try:
        for path, files in tqdm(
            list(zip(paths, planned)), desc="images", unit="img", disable=not progress or len(paths) < 2
        ):
            image = load_image(path)
            result = pipe(image)
            extra = {"image": str(path), "vocabulary": vocabulary.name, **engine.describe()}
            write_outputs(result, image, files, extra)
            done += 1
            present = ", ".join(c["name"].split(", ")[0] for c in result.classes_present()[:5])
            console.print(
                f"{path}: {result.timings_ms['total']:.0f} ms, top classes: {present} -> {files['overlay']}",
                markup=False, soft_wrap=True,  # one line per image, also when piped (rich would wrap at 80 columns)
            )
    except KeyboardInterrupt:
        console.print(f"interrupted: {done} of {len(paths)} images written whole to {out}; run the same command "
                      "with --skip-existing to finish the rest", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None


@app.command()
@user_errors
def batch(
    input: Annotated[str, typer.Argument(help="Folder of images (local, or a URI pyarrow reaches: s3://...).")],
    output: Annotated[Path, typer.Argument(help="Output folder: labels/*.png (uint16) and summary.parquet.")],
    bundle: Annotated[Path, typer.Option(help="Bundle folder (from `sed-export build`).")],
    vocab: Annotated[Optional[str], typer.Option(help="Vocabulary (default: the bundle's).")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Inline classes instead of --vocab.")] = None,
    topk: Annotated[str, typer.Option(help="Classes kept per pixel at each CER point, or 'all'.")] = "8",
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to join (e.g. auto, ray://host:10001); default: a private local Ray on 127.0.0.1.")] = None,
    actors: Annotated[int, typer.Option(help="Actors in the pool, one backend each.")] = 1,
    cpus_per_actor: Annotated[int, typer.Option(help="CPUs per actor (= ONNX Runtime intra-op threads).")] = 1,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per actor (with --backend trt).")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Images per actor call.")] = 1,
    backend: Annotated[str, typer.Option(help="ort, openvino or trt, inside each actor.")] = "ort",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Segment a whole folder on Ray Data; resumable (done images are skipped), bad images become error rows."""
    import importlib.util

    from .bundle import find_bundle_dir
    from .errors import SedUserError
    from .vocab import load_vocabulary

    k = parse_topk(topk)
    if backend not in ("ort", "openvino", "trt"):
        raise SedUserError(f"--backend for sed-run batch must be ort, openvino or trt, got {backend!r}")
    if importlib.util.find_spec("ray") is None:
        raise SedUserError("sed-run batch needs Ray Data: pip install 'sed-deploy[ray]'")
    found = find_bundle_dir(bundle) if bundle.exists() else None
    if found is None:
        raise SedUserError(f"bundle {bundle} not found; pass the folder written by `sed-export build`")
    vocabulary = None if vocab is None and classes is None else load_vocabulary(vocab, classes=classes)
    check_output_folder(output, "OUTPUT")
    from .batch import run

    summary = run(input, output, found, vocab=vocabulary, topk=k, address=address, actors=actors,
                  cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, batch_size=batch_size,
                  backend=backend, progress=progress)
    print(f"{summary.done} images segmented, {summary.skipped} skipped (done before), {summary.errors} errors, "
          f"{summary.images_per_second:.2f} images/s -> {output}/labels, {output}/summary.parquet")


if __name__ == "__main__":
    app()
