"""`sed-export`: inspect models and checkpoints, precompute text embeddings (ONNX/TensorRT builds come next)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    emb = backend.text_embeddings(vocabulary)
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
    precision: Annotated[str, typer.Option(help="fp32 or fp16 (norms and CER ranking stay fp32).")] = "fp32",
    engine: Annotated[str, typer.Option(help="What to build: onnx (auto = onnx in this version).")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Bundle folder (default engines/<model>-<precision>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Export a bundle: encoder.onnx, decoder.onnx (CER inside), text_encoder.onnx, tokenizer, embeddings, manifest."""
    from sed_runtime.errors import SedUserError
    from sed_runtime.vocab import load_vocabulary

    from .bundle import build_bundle
    from .config import load_model_config

    if engine not in ("auto", "onnx"):
        raise SedUserError(
            f"--engine {engine}: TensorRT engine building is not part of this version; use --engine onnx "
            "and run the ONNX bundle with ONNX Runtime"
        )
    if (vocab is None) == (classes is None):
        raise SedUserError("pass exactly one of --vocab (e.g. ade150) or --classes 'cat; dog'")
    vocabulary = load_vocabulary(vocab, classes=classes)
    config = load_model_config(model)
    target = out or Path("engines") / f"{config.name}-{precision}"
    build_bundle(
        model,
        vocabulary,
        target,
        checkpoint=checkpoint,
        precision=precision,
        force=force,
        allow_pickle=allow_pickle,
        progress=progress,
    )
    print(f"bundle written to {target}")


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


if __name__ == "__main__":
    app()
