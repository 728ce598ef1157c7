"""Encoder + decoder ONNX graphs for `sed-bench --backend ort` when no bundle is given.

They are exported from the same model (and the same random seed or checkpoint) the torch backend runs, into a
cache folder keyed by model config, weights, precision and the export code, and described by a manifest that
`sed_runtime.bundle.Bundle` can open. They are a benchmark artefact, not a deployable bundle: no text
encoder, no tokenizer, no vocabulary (text embeddings come from the torch text tower or `--text synthetic`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sed_runtime.bundle import FORMAT, MANIFEST, sha256_file

if TYPE_CHECKING:
    from sed_export.calibration import CalibrationRequest

_EXPORT_SOURCES = ("onnx_export.py", "onnx_chunked.py", "onnx_cer.py", "decoder.py", "encoder.py", "model.py",
                   "cer.py")


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
    """Folder with encoder.onnx, decoder.onnx, the class-chunked decoder segments and a manifest for this
    model/weights/precision (cached)."""
    from sed_export.checkpoint import resolve_weights
    from sed_export.config import load_model_config

    config = load_model_config(model_spec)
    weights_path, _ = resolve_weights(config, checkpoint)  # shipped weights when no checkpoint is given
    weights_id = "random-seed-0" if weights_path is None else f"sha256:{sha256_file(weights_path)}"
    folder = work / f"{config.name}-{precision}-{graphs_key(config.to_dict(), weights_id, precision)}"
    if (folder / MANIFEST).is_file():
        return folder

    from sed_export.bundle import building, files_record, input_record, model_with_weights
    from sed_export.onnx_chunked import build_chunked_segments
    from sed_export.onnx_export import OPSET, build_decoder_graph, build_encoder_graph, save_graph
    from sed_runtime.chunked_decoder import CHUNKED_DIR, segment_file

    log(f"exporting {config.name} {precision} encoder/decoder graphs for the ort backend into {folder} ...")
    t0 = time.perf_counter()
    model, weights = model_with_weights(config, checkpoint, allow_pickle)
    with building(folder) as tmp:
        save_graph(build_encoder_graph(model, precision), tmp / "encoder.onnx")
        save_graph(build_decoder_graph(model, precision), tmp / "decoder.onnx")
        (tmp / CHUNKED_DIR).mkdir()
        chunked = {}
        for name, graph in build_chunked_segments(model, precision).items():
            save_graph(graph, tmp / segment_file(name))
            chunked[name] = {"file": segment_file(name)}
        manifest = {
            "format": FORMAT,
            "purpose": "sed-bench graphs only: no text encoder, tokenizer or vocabulary; not a deployable bundle",
            "model": config.to_dict(),
            "weights": weights,
            "precision": precision,
            "opset": OPSET,
            "engine": "onnx",
            "input": input_record(config),
            "templates": list(model.templates),
            "graphs": {"encoder": {"file": "encoder.onnx"}, "decoder": {"file": "decoder.onnx"}, **chunked},
            "files": files_record(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"exported in {time.perf_counter() - t0:.1f} s")
    return folder


def bench_int8_graphs(
    fp32_folder: Path, calibration: CalibrationRequest, *, log: Callable[[str], None] = print,
) -> Path:
    """The folder of `bench_graphs` with its encoder replaced by the static int8 QDQ encoder of
    `sed-export build --precision int8` (the decoder graphs are linked, not copied), calibrated as asked and cached
    under a key that includes the image list's hash and the method."""
    import os
    import shutil

    from sed_export import calibration as cal
    from sed_export.bundle import building, files_record
    from sed_runtime.bundle import Bundle

    manifest = json.loads((fp32_folder / MANIFEST).read_text())
    c = calibration
    calib = cal.calibration_set(c.source, c.images, c.seed)
    folder = fp32_folder.with_name(f"{fp32_folder.name}-int8-{c.flavour}-{c.method}-{calib.digest[:10]}")
    if (folder / MANIFEST).is_file():
        return folder
    log(f"calibrating an int8 encoder on {c.images} images from {c.source} into {folder} ...")
    t0 = time.perf_counter()
    with building(folder) as tmp:
        checkpoint = manifest["weights"].get("checkpoint_sha256")
        record, _, note = cal.calibrated_encoder(fp32_folder / "encoder.onnx", tmp / "encoder.onnx",
                                                 manifest["model"]["name"], checkpoint,
                                                 Bundle.open(fp32_folder).input_spec, c, calib)
        for rel in manifest["files"]:
            if rel == "encoder.onnx":
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(fp32_folder / rel, tmp / rel)
            except OSError:
                shutil.copy2(fp32_folder / rel, tmp / rel)
        manifest.update(precision="int8", quantization=record, files=files_record(tmp))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"calibrated and quantized in {time.perf_counter() - t0:.1f} s: {note}")
    return folder
