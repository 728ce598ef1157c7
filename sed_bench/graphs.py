"""Encoder + decoder ONNX graphs for `sed-bench --backend ort` when no bundle is given.

They are exported from the same model (and the same random seed or checkpoint) the torch backend runs, into a
cache folder keyed by model config, weights, precision and the export code, and described by a manifest that
`sed_runtime.bundle.Bundle` can open. They are a benchmark artefact, not a deployable bundle: no text
encoder, no tokenizer, no vocabulary (text embeddings come from the torch text tower or `--text synthetic`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sed_runtime.bundle import FORMAT, MANIFEST, sha256_file

_EXPORT_SOURCES = ("onnx_export.py", "onnx_cer.py", "decoder.py", "encoder.py", "model.py", "cer.py")


def _code_digest() -> str:
    import importlib.util

    h = hashlib.sha256()
    for name in _EXPORT_SOURCES:
        spec = importlib.util.find_spec(f"sed_export.{name.removesuffix('.py')}")
        p = Path(spec.origin) if spec is not None and spec.origin else None
        if p is not None and p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def graphs_key(config: dict[str, Any], weights_id: str, precision: str) -> str:
    payload = json.dumps({"config": config, "weights": weights_id, "precision": precision, "code": _code_digest()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def bench_graphs(
    model_spec: str, checkpoint: Path | None, precision: str, work: Path, *, allow_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Folder with encoder.onnx, decoder.onnx and a manifest for this model/weights/precision (cached)."""
    from sed_export.config import load_model_config

    config = load_model_config(model_spec)
    weights_id = "random-seed-0" if checkpoint is None else f"sha256:{sha256_file(Path(checkpoint))}"
    folder = work / f"{config.name}-{precision}-{graphs_key(config.to_dict(), weights_id, precision)}"
    if (folder / MANIFEST).is_file():
        return folder

    from sed_export.checkpoint import load_checkpoint_into
    from sed_export.model import build_model
    from sed_export.onnx_export import OPSET, build_decoder_graph, build_encoder_graph, save_graph

    log(f"exporting {config.name} {precision} encoder/decoder graphs for the ort backend into {folder} ...")
    t0 = time.perf_counter()
    model = build_model(config)
    weights: dict[str, Any] = {"source": "random", "seed": 0, "checkpoint_sha256": None}
    if checkpoint is not None:
        _, sha = load_checkpoint_into(model, checkpoint, allow_pickle=allow_pickle)
        weights = {"source": "checkpoint", "checkpoint_sha256": sha, "checkpoint_name": Path(checkpoint).name}
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{folder.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_graph(build_encoder_graph(model, precision), tmp / "encoder.onnx")
        save_graph(build_decoder_graph(model, precision), tmp / "decoder.onnx")
        s = config.sed
        manifest = {
            "format": FORMAT,
            "purpose": "sed-bench graphs only: no text encoder, tokenizer or vocabulary; not a deployable bundle",
            "model": config.to_dict(),
            "weights": weights,
            "precision": precision,
            "opset": OPSET,
            "engine": "onnx",
            "input": {"input_size": s.input_size, "min_size": s.min_size_test, "max_size": s.max_size_test,
                      "pixel_mean": list(s.pixel_mean), "pixel_std": list(s.pixel_std)},
            "templates": list(model.templates),
            "graphs": {"encoder": {"file": "encoder.onnx"}, "decoder": {"file": "decoder.onnx"}},
            "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported in {time.perf_counter() - t0:.1f} s")
    return folder
