"""`sed-export`: inspect models and checkpoints, precompute text embeddings, build ONNX/TensorRT bundles."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sed_runtime.cli_common import user_errors

app = typer.Typer(
    help="Export SED models: configs, checkpoints, text embeddings.", no_args_is_help=True, add_completion=False
)


@app.command()
@user_errors
def models() -> None:
    """List the built-in model configs."""
    from .config import builtin_models, load_model_config

    for name in builtin_models():
        print(f"{name:10s} {load_model_config(name).description}")


@app.command()
@user_errors
def keys(
    checkpoint: Annotated[Path, typer.Argument(help="Official SED .pth (or .safetensors) checkpoint.")],
    model: Annotated[str, typer.Option(help="Built-in model name or model JSON file.")] = "sed-b",
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow pickled objects (trusted files only).")
    ] = False,
) -> None:
    """Compare a checkpoint's keys and shapes with a model: missing, unexpected and mismatched keys in one table."""
    from .checkpoint import compare_keys, guess_family, read_checkpoint
    from .config import load_model_config
    from .model import build_model

    state = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    report = compare_keys(build_model(load_model_config(model)), state)
    print(report.render(f"{checkpoint} vs {model}"), end="")
    if not report.fits:
        family = guess_family(state)
        hint = f" (it looks like {family})" if family else ""
        print(f"does not fit {model}{hint}")
        raise typer.Exit(1)
    print(f"fits {model}")


@app.command("embed-text")
@user_errors
def embed_text(
    vocab: Annotated[Optional[str], typer.Option(help="Built-in vocabulary or a .json/.txt file.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Inline classes: 'cat; dog, puppy; sky'.")] = None,
    model: Annotated[str, typer.Option(help="Built-in model name or model JSON file.")] = "sed-tiny",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Official checkpoint (random weights otherwise).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Compute a vocabulary's text embeddings into the on-disk cache, so later runs skip the text tower."""
    from sed_runtime.backends.torch_backend import TorchBackend
    from sed_runtime.errors import SedUserError
    from sed_runtime.vocab import load_vocabulary

    if (vocab is None) == (classes is None):
        raise SedUserError("pass exactly one of --vocab or --classes")
    vocabulary = load_vocabulary(vocab, classes=classes)
    backend = TorchBackend(model, checkpoint, allow_pickle=allow_pickle)
    emb = backend.encode_text(vocabulary)
    print(f"{vocabulary.name}: {emb.shape[0]} classes x {emb.shape[1]} templates x {emb.shape[2]} dims cached")


@app.command()
@user_errors
def build(
    vocab: Annotated[
        Optional[str], typer.Option(help="Vocabulary to embed into the bundle (built-in or file).")
    ] = None,
    classes: Annotated[
        Optional[str], typer.Option(help="Inline classes instead of --vocab: 'cat; dog, puppy'.")
    ] = None,
    model: Annotated[str, typer.Option(help="Built-in model name or model JSON file.")] = "sed-tiny",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Official checkpoint (random weights otherwise).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 (norms and CER ranking stay fp32), or int8 (the encoder "
                                           "as static QDQ int8, the decoder fp32; needs --calib; symmetric Q/DQ when "
                                           "TensorRT plans are built).")] = "fp32",
    calib: Annotated[Optional[str], typer.Option(
        help="int8 calibration images: a folder of your images, or 'shapes' for generated scenes.")] = None,
    calib_images: Annotated[int, typer.Option(help="Calibration images drawn from --calib.")] = 32,
    calib_seed: Annotated[int, typer.Option(help="Seed of the draw from --calib.")] = 0,
    calib_method: Annotated[str, typer.Option(
        help="int8 activation ranges: minmax, entropy or percentile (ONNX Runtime's calibrators; "
             "benchmarks/results/cpu-sed-b-calibration says what each costs).")] = "minmax",
    int8_min_sqnr: Annotated[Optional[float], typer.Option(
        help="int8: leave in float every node whose activation input's quantization SQNR (dB, measured on two "
             "calibration images) is below this; the manifest lists them.")] = None,
    int8_decoder: Annotated[bool, typer.Option(
        "--int8-decoder", help="int8: quantize the decoder too (CPU bundles), calibrated on the encoder's outputs and "
        "the vocabulary's embeddings through CER; its heads and activation x activation MatMuls stay float.")] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="auto (TensorRT plans when tensorrt and a GPU are present, else ONNX only), onnx, tensorrt, "
            "or tensorrt-rtx (plans for the TensorRT-RTX runtime; builds on a CPU)."
        ),
    ] = "auto",
    max_classes: Annotated[
        int, typer.Option(help="Largest vocabulary the decoder plan accepts (profile N = 1..this).")
    ] = 1024,
    workspace: Annotated[
        Optional[float], typer.Option(help="TensorRT workspace limit in GiB (default: TensorRT's, all memory).")
    ] = None,
    timing_cache: Annotated[
        Optional[Path], typer.Option(help="TensorRT timing cache file (default engines/.timing-cache/...).")
    ] = None,
    plugin_lib: Annotated[
        Optional[Path], typer.Option(help="Top-k-union plugin library: build the decoder plan with plugin CER nodes.")
    ] = None,
    cer: Annotated[
        str,
        typer.Option(
            help="How the TensorRT plans run CER: auto (plugin with --plugin-lib, else standard-ops), standard-ops, "
            "plugin, or split (four decoder plans, the top-k union between them)."
        ),
    ] = "auto",
    kernel_lib: Annotated[
        Optional[Path],
        typer.Option(help="--cer split: libsed_topk_union.so to run between the plans (default: on the host)."),
    ] = None,
    max_chunk: Annotated[Optional[int], typer.Option(
        "--max-chunk", help="TensorRT: the class-chunked decoder plans (used when one pass over every class would not "
        "fit in GPU memory) take chunks of up to this many classes, each power of two up to it a static profile; 0 "
        "builds none. Default 64.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Bundle folder (default engines/<model>-<precision>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Export a bundle: encoder/decoder/text_encoder ONNX, tokenizer, embeddings, manifest, and TensorRT plans."""
    from sed_runtime.cli_common import check_output_folder
    from sed_runtime.errors import SedUserError
    from sed_runtime.vocab import load_vocabulary

    from .calibration import METHODS, CalibrationRequest
    from .config import load_model_config

    if precision not in ("fp32", "fp16", "int8"):  # checked here, before the heavy imports below
        raise SedUserError(f"--precision must be fp32, fp16 or int8, got {precision!r}")
    if precision == "int8" and calib is None:
        raise SedUserError("--precision int8 needs calibration images: --calib DIR (your images) or --calib shapes")
    if precision != "int8" and calib is not None:
        raise SedUserError("--calib is for --precision int8")
    if int8_min_sqnr is not None and calib is None:
        raise SedUserError("--int8-min-sqnr is for --precision int8 (with --calib)")
    if int8_decoder and calib is None:
        raise SedUserError("--int8-decoder is for --precision int8 (with --calib)")
    if calib_method not in METHODS:
        raise SedUserError(f"--calib-method must be one of {', '.join(METHODS)}, got {calib_method!r}")
    if calib_images < 1:
        raise SedUserError(f"--calib-images must be >= 1, got {calib_images}")
    if calib is not None and calib != "shapes" and not Path(calib).is_dir():
        raise SedUserError(f"--calib {calib}: not a folder; pass a folder of images or 'shapes'")
    config = load_model_config(model)
    target = out or Path("engines") / f"{config.name}-{precision}"
    if target.exists() and not force:
        raise SedUserError(f"{target} already exists; pass --force to replace it or choose another --out")
    check_output_folder(target)
    if (vocab is None) == (classes is None):
        raise SedUserError("pass exactly one of --vocab (e.g. ade150) or --classes 'cat; dog'")
    vocabulary = load_vocabulary(vocab, classes=classes)
    if workspace is not None and workspace <= 0:
        raise SedUserError(f"--workspace must be a positive number of GiB, got {workspace}")
    from .bundle import build_bundle
    from .trt_build import EngineOptions, build_plans, resolve_engine
    from .trt_profiles import DEFAULT_CHUNK_MAX, chunk_sizes, class_range

    if max_chunk is not None and max_chunk != 0:
        chunk_sizes(max_chunk)  # refuses a negative size before any export
    choice = resolve_engine(engine)
    if max_chunk is not None and choice.engine is None:
        raise SedUserError("--max-chunk shapes TensorRT plans; pass --engine tensorrt (or tensorrt-rtx)")
    opts = EngineOptions(
        engine=choice.engine,
        max_classes=max_classes,
        workspace_bytes=None if workspace is None else int(workspace * 2**30),
        timing_cache=timing_cache,
        plugin_lib=plugin_lib,
        cer=cer,
        kernel_lib=kernel_lib,
        chunk_max=DEFAULT_CHUNK_MAX if max_chunk is None else max_chunk,
    )
    cer_mode = opts.cer_mode  # bad combinations and missing libraries fail here, before any export
    engine_build = None
    if choice.engine is not None and int8_decoder:
        raise SedUserError("--int8-decoder is for CPU bundles (ONNX Runtime, OpenVINO); TensorRT plans keep the "
                           "decoder in float: drop --int8-decoder or build with --engine onnx")
    if choice.engine is not None:
        class_range(len(vocabulary), max_classes)  # a vocabulary the profile cannot cover fails before export

        def engine_build(folder: Path, graphs: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
            return build_plans(opts, folder, graphs, len(vocabulary), precision, log)

    build_bundle(
        model,
        vocabulary,
        target,
        checkpoint=checkpoint,
        precision=precision,
        force=force,
        allow_pickle=allow_pickle,
        progress=progress,
        engine_build=engine_build,
        split_decoder=choice.engine is not None and cer_mode == "split",
        calibration=None if calib is None else CalibrationRequest(
            calib, calib_images, calib_seed, "cpu" if choice.engine is None else "tensorrt", calib_method,
            int8_min_sqnr, int8_decoder),
    )
    print(f"bundle written to {target}")
    if choice.note:
        print(f"{choice.note}; the ONNX bundle runs with --backend ort")


@app.command()
@user_errors
def train(
    out: Annotated[Path, typer.Option(help="Folder for checkpoints, the loss log, the final weights and model card.")],
    model: Annotated[str, typer.Option(help="Built-in model name or model JSON file to train.")] = "sed-shapes",
    data: Annotated[str, typer.Option(help="Training data: 'shapes' (generated scenes, one new scene a step).")] = (
        "shapes"),
    steps: Annotated[int, typer.Option(help="Optimiser steps (batch 1).")] = 1400,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (linear warm-up, cosine decay).")] = 8e-4,
    seed: Annotated[int, typer.Option(help="Seed of the weight initialisation.")] = 0,
    data_seed: Annotated[int, typer.Option(help="Seed of the generated training scenes.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Write the resume state every this many steps.")] = 100,
    text_steps: Annotated[int, typer.Option(help="Text-tower pretraining steps before it is frozen (a stand-in "
                                            "for CLIP's pretraining; 0 keeps the random tower).")] = 300,
    visual_steps: Annotated[int, typer.Option(help="Visual-tower pretraining steps aligning its dense features with "
                                              "the class embeddings (a stand-in for CLIP's; 0 skips it).")] = 4500,
    init: Annotated[Optional[Path], typer.Option(help="Fine-tune these weights (.safetensors or official .pth) "
                                                 "instead of training from scratch; skips the pretraining.")] = None,
    warmup_steps: Annotated[int, typer.Option(help="Linear lr warm-up steps before the cosine decay.")] = 100,
    data_offset: Annotated[int, typer.Option(help="Step i trains on generated scene data_offset + i (a fine-tune "
                                             "after an S-step run passes S, so it sees new scenes).")] = 0,
    eval_images: Annotated[int, typer.Option(help="Held-out generated images scored into the model card.")] = 100,
    threads: Annotated[Optional[int], typer.Option(help="Torch CPU threads (default: torch's).")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Ignore a resume state in --out and start over.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the final weights of a finished run in --out.")] = (
        False),
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a SED on generated scenes with the official recipe; resumes from --out/last.pth when it exists."""
    from sed_runtime.cli_common import check_output_folder
    from sed_runtime.errors import SedUserError

    if data != "shapes":
        raise SedUserError(f"--data {data!r} is not supported; use 'shapes' (generated scenes)")
    if steps < 1 or checkpoint_every < 1 or lr <= 0 or min(eval_images, text_steps, visual_steps, warmup_steps,
                                                            data_offset) < 0:
        raise SedUserError("--steps and --checkpoint-every must be >= 1, --eval-images, --text-steps, "
                           "--visual-steps, --warmup-steps and --data-offset >= 0, --lr > 0")
    check_output_folder(out)
    from .train import run_training

    run_training(model, out, steps=steps, lr=lr, seed=seed, data_seed=data_seed, checkpoint_every=checkpoint_every,
                 text_steps=text_steps, visual_steps=visual_steps, eval_images=eval_images, threads=threads,
                 restart=restart, force=force, progress=progress, init=init, warmup_steps=warmup_steps,
                 data_offset=data_offset)


@app.command()
@user_errors
def scenes(
    out: Annotated[Path, typer.Option(help="New folder: images/ and labels/ PNGs, as sed-eval reads them.")],
    count: Annotated[int, typer.Option(help="Number of scenes.")] = 100,
    seed: Annotated[int, typer.Option(help="Scene seed (training uses 0, sed-eval's held-out set 1000).")] = 1000,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
) -> None:
    """Write generated shapes scenes with their labels (vocabulary `shapes`) as a dataset folder."""
    import shutil

    from sed_runtime.cli_common import check_output_folder
    from sed_runtime.errors import SedUserError
    from sed_runtime.scenes import write_scene_folder

    if count < 1:
        raise SedUserError(f"--count must be >= 1, got {count}")
    check_output_folder(out)
    if out.exists():
        if not force:
            raise SedUserError(f"{out} already exists; pass --force to replace it or choose another --out")
        shutil.rmtree(out)
    write_scene_folder(out, seed, count)
    print(f"{count} scenes (seed {seed}) written to {out}/images and {out}/labels")


@app.command()
@user_errors
def check(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (or any file in it).")],
    image: Annotated[Path, typer.Option(help="Image to compare on.")],
    vocab: Annotated[Optional[str], typer.Option(help="Vocabulary (default: the bundle's).")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Inline classes instead of --vocab.")] = None,
    topk: Annotated[str, typer.Option(help="k for the CER points, or 'all'.")] = "8",
    checkpoint: Annotated[Optional[Path], typer.Option(help="The checkpoint the bundle was built from.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Run the torch reference and the ONNX bundle on one image; exit 1 if they disagree beyond tolerance."""
    from .parity import compare_bundle

    report = compare_bundle(
        bundle, image, vocab=vocab, classes=classes, topk=topk, checkpoint=checkpoint, allow_pickle=allow_pickle
    )
    for line in report.lines():
        print(line)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
@user_errors
def triton(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (from `sed-export build`).")],
    out: Annotated[Path, typer.Option(help="New model repository folder.")],
    platform: Annotated[str, typer.Option(
        help="onnxruntime (the bundle's ONNX files), tensorrt (its plans; the text encoder stays ONNX) or python "
             "(the ONNX files run by ONNX Runtime inside Python-backend models).")] = (
        "onnxruntime"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Export a Triton model repository: encoder, decoder, text encoder and the `sed` ensemble."""
    from sed_runtime.bundle import find_bundle_dir
    from sed_runtime.cli_common import check_output_folder
    from sed_runtime.errors import BundleError, SedUserError

    from .triton import PLATFORMS, write_triton_repository

    if platform not in PLATFORMS:
        raise SedUserError(f"--platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    found = find_bundle_dir(bundle) if bundle.exists() else None
    if found is None:
        raise BundleError(f"{bundle} is not a bundle (no manifest.json); pass the folder of `sed-export build`")
    if out.exists() and not force:
        raise SedUserError(f"{out} already exists; pass --force to replace it or choose another --out")
    check_output_folder(out)
    write_triton_repository(found, out, platform=platform, force=force)
    print(f"Triton model repository written to {out} (models: sed_encoder, sed_decoder, sed_text_encoder, sed)")


if __name__ == "__main__":
    app()
