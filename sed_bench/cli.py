"""`sed-bench`: median/p90 latency per stage for each top-k, on one backend, one vocabulary, one image.

A first cut: the Table-7 grid over vocabularies, synthetic kept counts and plots build on this.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sed_runtime.cli_common import parse_topk, user_errors

app = typer.Typer(help="Benchmark SED latency per stage and per top-k.", add_completion=False)


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min())}


@app.command()
@user_errors
def main(
    image: Annotated[Path, typer.Option(help="Image to time.")] = Path("examples/images/astronaut.jpg"),
    vocab: Annotated[str, typer.Option(help="Built-in vocabulary or a .json/.txt file.")] = "voc20",
    model: Annotated[str, typer.Option(help="Built-in model or model JSON file.")] = "sed-tiny",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Official checkpoint (random weights otherwise).")] = None,
    topk: Annotated[str, typer.Option(help="Comma-separated k values, 'all' for the full model.")] = "1,8,all",
    backend: Annotated[str, typer.Option(help="Backend to time.")] = "torch",
    device: Annotated[str, typer.Option(help="Torch device.")] = "cpu",
    warmup: Annotated[int, typer.Option(min=0)] = 1,
    iters: Annotated[int, typer.Option(min=1)] = 3,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out.")] = False,
) -> None:
    """Time the pipeline end to end and per stage; print median ms and the kept-class counts."""
    from rich.console import Console
    from rich.table import Table

    from sed_runtime.errors import SedUserError
    from sed_runtime.outputs import refuse_overwrite
    from sed_runtime.preprocess import load_image
    from sed_runtime.vocab import load_vocabulary

    ks = [parse_topk(v) for v in topk.split(",") if v.strip()]
    if not ks:
        raise SedUserError("--topk needs at least one value, e.g. 1,8,all")
    if out is not None:
        refuse_overwrite([out], force)
    vocabulary = load_vocabulary(vocab)
    img = load_image(image)
    if backend != "torch":
        raise SedUserError(f"unknown --backend {backend!r}; available: torch")
    from sed_runtime.backends.torch_backend import TorchBackend
    from sed_runtime.pipeline import SedPipeline

    engine = TorchBackend(model, checkpoint, device=device)
    pipe = SedPipeline(engine, vocabulary, topk=ks[0], progress=False)
    cells: list[dict[str, Any]] = []
    for k in ks:
        pipe.topk = k
        runs = []
        for i in range(warmup + iters):
            r = pipe(img)
            if i >= warmup:
                runs.append(r)
        stages = sorted({s for r in runs for s in r.timings_ms if s != "text_embeddings_once"})
        cells.append({
            "topk": "all" if k is None else k,
            "kept_counts": None if runs[-1].kept is None else [len(x) for x in runs[-1].kept],
            "ms": {s: _stats([r.timings_ms.get(s, 0.0) for r in runs]) for s in stages},
        })
    table = Table(title=f"{model} / {backend} / {vocabulary.name} (N={len(vocabulary)}): median ms over {iters} runs")
    table.add_column("stage")
    for c in cells:
        table.add_column(f"k={c['topk']}", justify="right")
    order = ["preprocess", "encoder", "cost_volume", "cer0", "decoder1", "cer1", "decoder2", "cer2", "decoder3",
             "head", "decoder", "postprocess", "total"]
    stage_names = [s for s in order if any(s in c["ms"] for c in cells)]
    stage_names += sorted({s for c in cells for s in c["ms"]} - set(stage_names))
    for name in stage_names:
        table.add_row(name, *[f"{c['ms'][name]['median']:.1f}" if name in c["ms"] else "-" for c in cells])
    table.add_row("kept classes", *["-" if c["kept_counts"] is None else "/".join(map(str, c["kept_counts"]))
                                    for c in cells])
    Console().print(table)
    if out is not None:
        report = {"machine": platform.processor() or platform.machine(), "platform": platform.platform(),
                  "model": model, "vocabulary": vocabulary.name, "num_classes": len(vocabulary),
                  "image": str(image), "warmup": warmup, "iters": iters, **engine.describe(), "cells": cells}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    app()
