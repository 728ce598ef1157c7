"""`sed-export build`: model + checkpoint + vocabulary -> a deployable bundle folder.

Everything is written into a hidden temporary folder beside the target and renamed into place at the end,
so a bundle is complete or absent; an existing bundle is replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sed_runtime.backends.base import InputSpec
from sed_runtime.bundle import FORMAT, MANIFEST, sha256_file
from sed_runtime.errors import OutputError, SedUserError
from sed_runtime.vocab import Vocabulary

from . import __version__
from .calibration import CalibrationRequest

Log = Callable[[str], None]
EngineBuild = Callable[[Path, dict[str, Any], Log], dict[str, Any]]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"sed-deploy": __version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "open_clip_torch", "timm", "onnxruntime"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _io(model: Any) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes (ints or symbolic names) and dtypes of a graph's inputs and outputs."""
    import onnx

    def describe(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def model_with_weights(config: Any, checkpoint: Path | None, allow_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
    """The model of `config` (seed 0) with `checkpoint` loaded if given, and the manifest's `weights` record."""
    from .checkpoint import load_checkpoint_into, resolve_weights
    from .model import build_model

    model = build_model(config)
    weights: dict[str, Any] = {"source": "random", "seed": 0, "checkpoint_sha256": None}
    path, source = resolve_weights(config, checkpoint)
    if path is not None:
        _, sha = load_checkpoint_into(model, path, allow_pickle=allow_pickle)
        weights = {"source": source, "checkpoint_sha256": sha, "checkpoint_name": path.name}
    return model, weights


def input_record(config: Any) -> dict[str, Any]:
    """The manifest's `input` section: the official test-time preprocessing of this model."""
    s = config.sed
    return {"input_size": s.input_size, "min_size": s.min_size_test, "max_size": s.max_size_test,
            "pixel_mean": list(s.pixel_mean), "pixel_std": list(s.pixel_std)}


def files_record(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's `files` section: sha256 and size of every file below `folder`."""
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces `out` whole when the block succeeds, and vanishes if not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


FP32_ENCODER = ".encoder-fp32.onnx"  # kept in the build folder while the decoder's calibration needs it


def _quantized_encoder(enc: Any, tmp: Path, config: Any, weights: dict[str, Any], calibration: CalibrationRequest,
                       log: Log) -> tuple[dict[str, Any], np.ndarray]:
    """Write tmp/encoder.onnx as the static-int8 QDQ version of `enc` (and tmp/FP32_ENCODER); returns the
    manifest's record and the calibration tensors."""
    from .calibration import calibrated_encoder, calibration_set
    from .onnx_export import save_graph

    c = calibration
    fp32 = tmp / FP32_ENCODER
    save_graph(enc, fp32)
    record, tensors, note = calibrated_encoder(fp32, tmp / "encoder.onnx", config.name,
                                               weights.get("checkpoint_sha256"), InputSpec.from_settings(config.sed),
                                               c, calibration_set(c.source, c.images, c.seed))
    log(f"calibration    {note}")
    return record, tensors


def _quantize_decoder(tmp: Path, tensors: np.ndarray, text: np.ndarray, config: Any,
                      calibration: CalibrationRequest, log: Log) -> dict[str, Any]:
    """Replace tmp/decoder.onnx by its static-int8 QDQ version, calibrated on the fp32 encoder's outputs for the
    calibration images and the bundle vocabulary's embeddings (in class groups that bound its memory), through CER
    at DECODER_K."""
    import onnxruntime as ort

    from sed_runtime.memory import DecoderMemory

    from .calibration import DECODER_K, decoder_class_groups, quantize_decoder

    t0 = time.perf_counter()
    memory = DecoderMemory.from_settings(config.to_dict()["sed"], text.shape[1], "ort")
    groups = decoder_class_groups(memory, len(text), len(tensors), calibration.seed)
    encoder = ort.InferenceSession(str(tmp / FP32_ENCODER), providers=["CPUExecutionProvider"])
    names = [o.name for o in encoder.get_outputs()]
    feeds = [{**dict(zip(names, encoder.run(names, {"image": x[None]}))), "text": np.ascontiguousarray(text[g]),
              "k": np.array([min(DECODER_K, len(g))], np.int64)} for x, g in zip(tensors, groups)]
    del encoder
    k = min(DECODER_K, len(text))
    fp32 = tmp / ".decoder-fp32.onnx"
    os.replace(tmp / "decoder.onnx", fp32)
    record = quantize_decoder(fp32, tmp / "decoder.onnx", feeds, calibration.method, calibration.min_sqnr_db)
    fp32.unlink()
    record.pop("ranges")
    largest = max(len(g) for g in groups)
    log(f"decoder int8   {time.perf_counter() - t0:6.1f} s ({record['quantized_nodes']} of "
        f"{record['candidate_nodes']} nodes, k = {k}, up to {largest} classes per image)")
    return {**record, "k": k, "classes_per_image": largest}


def build_bundle(
    model_spec: str,
    vocab: Vocabulary,
    out: Path,
    *,
    checkpoint: Path | None = None,
    precision: str = "fp32",
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    log: Log = print,
    engine_build: EngineBuild | None = None,
    split_decoder: bool = False,
    calibration: CalibrationRequest | None = None,
) -> Path:
    """Export encoder, decoder and text encoder ONNX, the tokenizer and `vocab`'s embeddings; return `out`.

    `engine_build(folder, graphs, log)` runs on the finished ONNX files inside the temporary folder and returns
    the manifest's `engines` section (TensorRT plans), so plans share the bundle's all-or-nothing write.
    `split_decoder` also writes the decoder split at the CER points (`sed_runtime.split_decoder`), for
    TensorRT builds that run the top-k-union kernel between engines.
    """
    import onnx
    import open_clip
    from safetensors.numpy import save_file

    from sed_runtime.chunked_decoder import CHUNKED_DIR
    from sed_runtime.chunked_decoder import segment_file as chunked_file
    from sed_runtime.split_decoder import SPLIT_DIR, segment_file

    from .config import load_model_config
    from .onnx_chunked import build_chunked_segments
    from .onnx_export import (
        OPSET,
        PRECISIONS,
        build_decoder_graph,
        build_decoder_segments,
        build_encoder_graph,
        export_decoder_parts,
        save_graph,
    )
    from .onnx_text import export_text_encoder
    from .text import cached_text_embeddings, text_tower_digest
    from .tokenizer_export import clip_tokenizer_json

    if precision not in (*PRECISIONS, "int8"):
        raise SedUserError(f"--precision must be one of {', '.join(PRECISIONS)} or int8, got {precision!r}")
    if (precision == "int8") != (calibration is not None):
        raise SedUserError("--precision int8 needs calibration images (--calib DIR or --calib shapes), and "
                           "--calib is for --precision int8 only")
    graph_precision = "fp32" if precision == "int8" else precision
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not (out / MANIFEST).is_file():
        raise OutputError(f"{out} exists and is not a bundle; refusing to replace it, choose another --out")
    config = load_model_config(model_spec)
    model, weights = model_with_weights(config, checkpoint, allow_pickle)
    weights["text_tower_digest"] = text_tower_digest(model.clip_model)

    with building(out) as tmp:
        graphs: dict[str, dict[str, Any]] = {}
        t0 = time.perf_counter()
        enc = build_encoder_graph(model, graph_precision)
        quantization = None
        if calibration is None:
            save_graph(enc, tmp / "encoder.onnx")
        else:
            quantization, calib_tensors = _quantized_encoder(enc, tmp, config, weights, calibration, log)
        graphs["encoder"] = {"file": "encoder.onnx", **_io(enc)}
        log(f"encoder.onnx   {time.perf_counter() - t0:6.1f} s{' (int8)' if quantization else ''}")
        t0 = time.perf_counter()
        parts = export_decoder_parts(model, graph_precision)
        dec = build_decoder_graph(model, graph_precision, parts)
        save_graph(dec, tmp / "decoder.onnx")
        graphs["decoder"] = {"file": "decoder.onnx", **_io(dec)}
        if split_decoder:
            (tmp / SPLIT_DIR).mkdir()
            for name, seg in build_decoder_segments(model, graph_precision, parts).items():
                save_graph(seg, tmp / segment_file(name))
                graphs[name] = {"file": segment_file(name), **_io(seg)}
        split_note = " (+ split at the CER points)" if split_decoder else ""
        log(f"decoder.onnx   {time.perf_counter() - t0:6.1f} s{split_note}")
        t0 = time.perf_counter()
        (tmp / CHUNKED_DIR).mkdir()
        for name, seg in build_chunked_segments(model, graph_precision).items():
            save_graph(seg, tmp / chunked_file(name))
            graphs[name] = {"file": chunked_file(name), **_io(seg)}
        log(f"decoder_chunked {time.perf_counter() - t0:5.1f} s (class-chunked segments for large vocabularies)")
        t0 = time.perf_counter()
        export_text_encoder(model.clip_model, tmp / "text_encoder.onnx", opset=OPSET)
        graphs["text_encoder"] = {"file": "text_encoder.onnx", **_io(onnx.load(str(tmp / "text_encoder.onnx")))}
        ctx = int(config.clip["text_cfg"].get("context_length", 77))
        (tmp / "tokenizer.json").write_text(clip_tokenizer_json(ctx))
        log(f"text encoder   {time.perf_counter() - t0:6.1f} s")
        t0 = time.perf_counter()
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
        emb = cached_text_embeddings(
            model.clip_model, tokenizer, config.name, vocab, model.templates, progress=progress
        )
        (tmp / "text").mkdir()
        emb_file = f"text/{vocab.name}.safetensors"
        save_file(
            {"embeddings": np.ascontiguousarray(emb, dtype=np.float32)},
            str(tmp / emb_file),
            metadata={"vocabulary": vocab.name, "digest": vocab.digest()},
        )
        log(f"text embeddings {time.perf_counter() - t0:5.1f} s ({len(vocab)} classes)")
        if quantization is not None:
            if calibration is not None and calibration.decoder:
                quantization["decoder"] = _quantize_decoder(tmp, calib_tensors, np.asarray(emb, np.float32), config,
                                                            calibration, log)
                quantization["graphs"]["decoder"] = "int8"
            (tmp / FP32_ENCODER).unlink()
        engines = engine_build(tmp, graphs, log) if engine_build is not None else None

        manifest = {
            "format": FORMAT,
            "model": config.to_dict(),
            "weights": weights,
            "precision": precision,
            **({"quantization": quantization} if quantization else {}),
            "opset": OPSET,
            "engine": engines["engine"] if engines else "onnx",
            "producer": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "input": input_record(config),
            "templates": list(model.templates),
            "tokenizer": "tokenizer.json",
            "graphs": graphs,
            **({"engines": engines} if engines else {}),
            "vocabulary": {
                "name": vocab.name,
                "classes": list(vocab.classes),
                "digest": vocab.digest(),
                "embeddings": emb_file,
            },
            "files": files_record(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
