"""Run the benchmark grid: for every backend and (vocabulary, k) cell, time the pipeline end to end and per
stage, record the kept-class counts at each CER point and the peak memory.

Timing: each cell runs `warmup` untimed calls on the first image, then `iters` passes over every image; the
statistics are over those per-image samples. Images are decoded before timing (file reading is not counted);
preprocessing, the backend and postprocessing are (`SedPipeline`, the production path). torch on CUDA times
its stages with CUDA events; ONNX Runtime's decoder stages come from its node profiler, run on the
timed calls themselves (see `ort_profile`). Text embeddings are computed once per (backend, vocabulary),
timed, and not part of the per-image total.

Memory: host peak RSS per cell (the kernel's high-water mark, reset before the cell) and, for torch on CUDA,
the peak of `torch.cuda.max_memory_allocated`. Cells run cheapest first; with `max_rss_gb` a cell whose peak,
extrapolated linearly from the cells already measured on that backend, would pass the limit is skipped and
reported as skipped rather than run.
"""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sed_runtime.backends.base import Backend, BackendResult, ImageFeatures, InputSpec
from sed_runtime.errors import SedUserError
from sed_runtime.vocab import Vocabulary

from . import measure
from .grid import Cell, backend_kind, backend_variants, run_order
from .paper import paper_ms

MEMORY_FIT_MARGIN = 1.10  # predicted peak x this must stay under --max-rss-gb


@dataclass
class BenchConfig:
    backends: list[str]
    vocabs: list[tuple[str, Vocabulary]]
    cells: list[Cell]
    images: list[Path]
    model: str = "sed-tiny"
    checkpoint: Path | None = None
    bundle: Path | None = None
    text: str = "real"  # or "synthetic"
    kept_spec: Any = None  # None | "paper" | (c0, c1, c2)
    warmup: int = 1
    iters: int = 3
    device: str = "cpu"
    providers: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    ort_profile: bool = True
    low_memory: bool = False  # ORT decoder sessions without the CPU memory arena (sed-run --low-memory)
    max_rss_gb: float | None = None
    max_memory_gb: float | None = None  # decoder budget: cells predicted above it run class-chunked
    class_chunk: int | None = None  # every cell class-chunked with this many classes per step (capped at N)
    work: Path = Path("engines/bench")
    allow_pickle: bool = False
    calibration: Any = None  # int8 variants without a bundle: a sed_export.calibration.CalibrationRequest
    argv: list[str] = field(default_factory=list)


class _FixedText(Backend):
    """A backend whose `encode_text` returns a given array (synthetic or precomputed and timed); the image verbs
    are the inner backend's."""

    def __init__(self, inner: Backend, text: np.ndarray) -> None:
        self.inner, self.text, self.name = inner, text, inner.name

    @property
    def input_spec(self) -> InputSpec:
        return self.inner.input_spec

    def encode_text(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        return self.text

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        return self.inner.encode_image(image)

    def decode(self, features: ImageFeatures, text: np.ndarray, topk: int | None) -> BackendResult:
        return self.inner.decode(features, text, topk)


def synthetic_text(vocab: Vocabulary, num_templates: int, embed_dim: int) -> np.ndarray:
    """(N, P, E) random unit vectors, seeded by the class list so every backend gets the same ones."""
    seed = int(hashlib.sha256(vocab.digest().encode()).hexdigest()[:8], 16)
    t = np.random.default_rng(seed).standard_normal((len(vocab), num_templates, embed_dim)).astype(np.float32)
    return t / np.linalg.norm(t, axis=-1, keepdims=True)


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    if len(set(xs)) < 2:
        return None
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


class _Backends:
    """Builds the backends one at a time, in the order asked, and what each needs."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None]) -> None:
        self.cfg, self.log = cfg, log
        self._text_tower: Any = None
        self._fp32_graphs: Path | None = None

    def _graphs(self, int8: bool) -> Path:
        """The bundle, or the bench graphs exported (and for int8 calibrated) for this model."""
        cfg = self.cfg
        if cfg.bundle is not None:
            return cfg.bundle
        from .graphs import bench_graphs, bench_int8_graphs

        if self._fp32_graphs is None:
            self._fp32_graphs = bench_graphs(cfg.model, cfg.checkpoint, cfg.precision, cfg.work,
                                             allow_pickle=cfg.allow_pickle, log=self.log)
        return bench_int8_graphs(self._fp32_graphs, cfg.calibration, log=self.log) if int8 else self._fp32_graphs

    def make(self, name: str) -> Backend:
        cfg = self.cfg
        kind, variants = backend_kind(name), backend_variants(name)
        if kind == "torch":
            from sed_runtime.backends import make_backend

            b = make_backend("torch", bundle=cfg.bundle, model=cfg.model, checkpoint=cfg.checkpoint, device=cfg.device,
                             allow_pickle=cfg.allow_pickle, torch_precision=cfg.precision)
            b.cuda_events = True  # type: ignore[attr-defined]
            return b
        if kind == "trt":
            from sed_runtime.backends import make_backend

            return make_backend("trt", bundle=cfg.bundle)
        from sed_runtime.bundle import Bundle

        bundle = Bundle.open(self._graphs("int8" in variants))
        backend: Backend
        if kind == "openvino":
            from sed_runtime.backends.openvino_backend import OpenVinoBackend

            backend = OpenVinoBackend(bundle, threads=cfg.threads, precision="bf16" if "bf16" in variants else "fp32")
        else:
            from sed_runtime.backends.ort_backend import OrtBackend

            backend = OrtBackend(bundle, providers=cfg.providers, threads=cfg.threads, low_memory=cfg.low_memory)
        backend.bench_graphs = cfg.bundle is None  # type: ignore[attr-defined]
        return backend

    def text_shape(self, backend: Backend) -> tuple[int, int]:
        if backend.name == "torch":
            return len(backend.model.templates), int(backend.config.embed_dim)  # type: ignore[attr-defined]
        return len(backend.bundle.templates), int(backend.bundle.embed_dim)  # type: ignore[attr-defined]

    def real_text(self, backend: Backend, vocab: Vocabulary) -> tuple[np.ndarray, float, str]:
        """(embeddings, ms, source) with source one of: cache, computed, bundle (+ which tower)."""
        if backend.name == "torch":
            return self._torch_text(backend, vocab, "torch text tower")
        if getattr(backend, "bench_graphs", False):
            if self._text_tower is None:
                from sed_runtime.backends.torch_backend import TorchBackend

                self._text_tower = TorchBackend(self.cfg.model, self.cfg.checkpoint, allow_pickle=self.cfg.allow_pickle)
            return self._torch_text(self._text_tower, vocab, "torch text tower (bench graphs carry no text encoder)")
        bundled = backend.bundle.bundled_embeddings()  # type: ignore[attr-defined]
        source = "bundle" if bundled is not None and bundled[0] == vocab.classes else "onnx text encoder"
        t0 = time.perf_counter()
        try:
            emb = backend.encode_text(vocab, progress=False)
        except ImportError as e:
            raise SedUserError(
                f"the ort backend cannot embed {vocab.name} here ({e}); use --text synthetic or a bundle built "
                "with this vocabulary"
            ) from None
        return emb, (time.perf_counter() - t0) * 1e3, source

    def _torch_text(self, backend: Any, vocab: Vocabulary, tower: str) -> tuple[np.ndarray, float, str]:
        from sed_export.text import text_tower_digest
        from sed_runtime.text_cache import TextEmbeddingCache, text_cache_key

        key = text_cache_key(backend.config.name, text_tower_digest(backend.model.clip_model), backend.model.templates,
                             vocab.classes)
        hit = TextEmbeddingCache().path(key).is_file()
        t0 = time.perf_counter()
        emb = backend.encode_text(vocab, progress=False)
        ms = (time.perf_counter() - t0) * 1e3
        return emb, ms, f"{'cache' if hit else 'computed'} ({tower})"

    def close(self) -> None:
        self._text_tower = None


def _precision(backend: Backend) -> str:
    if backend.name == "openvino":
        graphs = str(backend.bundle.manifest["precision"])  # type: ignore[attr-defined]
        hint = str(backend.precision)  # type: ignore[attr-defined]
        return graphs if hint == "fp32" else f"{graphs}, {hint} inference"
    if backend.name in ("ort", "trt"):
        return str(backend.bundle.manifest["precision"])  # type: ignore[attr-defined]
    return str(getattr(backend, "precision", "fp32"))


def run_bench(
    cfg: BenchConfig, log: Callable[[str], None] = print, progress: bool = True,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every backend over the grid; return the JSON-able results (see `report` for the files).

    `on_cell(results)` is called after every cell (e.g. to save partial results of a long run).
    """
    from sed_runtime.pipeline import SedPipeline
    from sed_runtime.preprocess import load_image

    if "trt" in cfg.backends and cfg.bundle is None:
        raise SedUserError("--backend trt runs a bundle's plans: pass a BUNDLE built with "
                           "`sed-export build --engine tensorrt`")
    if "trt" in cfg.backends and cfg.kept_spec is not None:  # forcing would need a plan of the forced graph
        raise SedUserError("--kept is not supported with --backend trt; use real mode (official checkpoint and "
                           "--images) or --backend torch,ort")
    images = [load_image(p) for p in cfg.images]
    if cfg.threads:
        import importlib.util

        if importlib.util.find_spec("torch") is not None and "torch" in cfg.backends:
            import torch

            torch.set_num_threads(cfg.threads)
    results: dict[str, Any] = {
        "schema": "sed-bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": cfg.argv,
        "machine": measure.machine_info(cfg.device if "torch" in cfg.backends else None),
        "versions": measure.versions(),
        "settings": {
            "model": cfg.model, "checkpoint": None if cfg.checkpoint is None else str(cfg.checkpoint),
            "bundle": None if cfg.bundle is None else str(cfg.bundle), "backends": cfg.backends,
            "vocabs": [{"label": label, "name": v.name, "num_classes": len(v)} for label, v in cfg.vocabs],
            "topk": sorted({c.k_label for c in cfg.cells}, key=lambda s: (s == "all", int(s) if s != "all" else 0)),
            "kept": ("paper" if cfg.kept_spec == "paper" else None if cfg.kept_spec is None
                     else list(cfg.kept_spec)),
            "text": cfg.text, "images": [str(p) for p in cfg.images],
            "image_sizes": [list(im.shape[:2]) for im in images],
            "warmup": cfg.warmup, "iters": cfg.iters, "device": cfg.device, "providers": cfg.providers,
            "threads": cfg.threads, "ort_profile": cfg.ort_profile, "low_memory": cfg.low_memory,
            "max_rss_gb": cfg.max_rss_gb, "max_memory_gb": cfg.max_memory_gb,
            "class_chunk": cfg.class_chunk,
            "peak_rss_resettable": measure.reset_peak_rss(),
        },
        "backends": {},
        "text": {},
        "cells": [],
    }
    order = run_order(cfg.cells)
    per_cell_calls = cfg.warmup + cfg.iters * len(images)
    total_calls = len(cfg.backends) * len(order) * per_cell_calls

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), disable=not progress, transient=False)
    maker = _Backends(cfg, log)
    vocab_of = dict(cfg.vocabs)
    with bar:
        task = bar.add_task("loading", total=total_calls)
        for name in cfg.backends:
            bar.update(task, description=f"{name}: loading")
            t0 = time.perf_counter()
            backend = maker.make(name)
            load_s = time.perf_counter() - t0
            desc = {**backend.describe(), "precision": _precision(backend), "load_s": round(load_s, 2)}
            if backend_kind(name) == "ort":
                desc["intra_op_threads"] = cfg.threads or "onnxruntime default (physical cores)"
            q = getattr(getattr(backend, "bundle", None), "manifest", {}).get("quantization")
            if q:
                desc["int8"] = (f"{q['method']}, {q['quantized_nodes']}/{q['candidate_nodes']} nodes, calibrated on "
                                f"{q['calibration']['images']} images from {q['calibration']['source']}")
            desc.update(measure.thread_info() if name == "torch" else {})
            results["backends"][name] = desc
            texts: dict[str, np.ndarray] = {}
            results["text"][name] = {}
            for label, vocab in cfg.vocabs:
                bar.update(task, description=f"{name}: text {label}")
                if cfg.text == "synthetic":
                    p, e = maker.text_shape(backend)
                    t0 = time.perf_counter()
                    texts[label] = synthetic_text(vocab, p, e)
                    results["text"][name][label] = {"ms": (time.perf_counter() - t0) * 1e3,
                                                    "source": "SYNTHETIC random unit vectors"}
                else:
                    emb, ms, source = maker.real_text(backend, vocab)
                    texts[label] = emb
                    results["text"][name][label] = {"ms": ms, "source": source}
            maker.close()
            runner = _CellRunner(cfg, name, backend, images, bar, task)
            for cell in order:
                bar.update(task, description=f"{name}: {cell.vocab} k={cell.k_label}")
                pipe = SedPipeline(_FixedText(backend, texts[cell.vocab]), vocab_of[cell.vocab], topk=cell.topk,
                                   progress=False)
                results["cells"].append(runner.run(cell, pipe))
                pipe = None
                if on_cell is not None:
                    on_cell(results)
            runner.finish(results["cells"])
            del runner, backend, texts
            gc.collect()
    return results


class _CellRunner:
    """Times the cells of one backend; owns the forced-kept decoder variant and the ORT stage profiler."""

    def __init__(self, cfg: BenchConfig, name: str, backend: Backend, images: list[np.ndarray], bar: Any,
                 task: Any) -> None:
        self.cfg, self.name, self.backend, self.images, self.bar, self.task = cfg, name, backend, images, bar, task
        self.kind = backend_kind(name)
        self._forced_folder: Any = None  # a temporary folder with the forced decoder graph (OpenVINO reads files)
        self.mem_points: list[tuple[float, float]] = []  # (decoder classes, RSS increment MB)
        self.cuda = name == "torch" and str(getattr(backend, "device", "cpu")).startswith("cuda")
        self.profiler: Any = None
        self._forced_bytes: bytes | None = None
        self._forced_session: Any = None
        if self.kind == "ort":
            b: Any = backend
            if cfg.ort_profile:  # time profiled twins of the decoder sessions: same options, plus the profiler
                from .ort_profile import StageProfiler

                self.profiler = StageProfiler(b.providers, cfg.threads, arena=not cfg.low_memory)
                b.decoder = self.profiler.session("production", b.bundle.path("decoder"))
            self._production = b.decoder

    def _choose_chunk(self, cell: Cell) -> int | None:
        """Classes per decoder step when the one-pass decoder's working set is predicted to exceed --max-memory
        (the decoder's own budget, beyond what the process already holds: models, arenas, the other backend), or
        --class-chunk's fixed size."""
        if not hasattr(self.backend, "class_chunk"):
            return None
        if self.cfg.class_chunk is not None:
            return min(self.cfg.class_chunk, cell.num_classes)
        if self.cfg.max_memory_gb is None:
            return None
        from sed_runtime.memory import GiB, choose_class_chunk

        forced = cell.forced if cell.topk is not None else None
        budget = self.cfg.max_memory_gb * GiB
        return choose_class_chunk(self.backend.decoder_memory(), cell.num_classes, budget,
                                  None if forced is None else list(forced))

    # -- forced kept counts -------------------------------------------------------------------------------
    def _configure(self, cell: Cell, chunk: int | None) -> str:
        """Set the backend up for this cell; returns which decoder session runs it (ORT)."""
        forced = cell.forced if cell.topk is not None else None
        if hasattr(self.backend, "class_chunk"):
            self.backend.class_chunk = chunk  # type: ignore[attr-defined]
        b: Any = self.backend
        if chunk is not None and self.kind in ("ort", "openvino"):  # the chunked runner forces survivors in numpy
            from .forcing import numpy_selector

            if self.kind == "ort":
                b.decoder = self._production
            b.extra_decoder_inputs = {}
            b.cer_select = None if forced is None else numpy_selector(forced)
            return "chunked"
        if self.kind in ("ort", "openvino"):
            b.cer_select = None
        if self.kind == "openvino":
            return self._configure_openvino(forced)
        if self.name == "torch":
            from .forcing import torch_selector

            self.backend.cer_select = None if forced is None else torch_selector(forced)  # type: ignore[attr-defined]
            return ""
        if self.name == "trt":  # run_bench refuses --kept for trt up front
            return ""
        if forced is None:
            b.decoder, b.extra_decoder_inputs = self._production, {}
            return "production"
        from .forcing import forced_decoder_graph, kept_feed

        if self._forced_session is None:
            import onnx
            import onnxruntime as ort

            graph = forced_decoder_graph(onnx.load(str(b.bundle.path("decoder")))).SerializeToString()
            if self.profiler is not None:
                self._forced_session = self.profiler.session("forced", graph)
            else:
                opts = ort.SessionOptions()
                if self.cfg.threads:
                    opts.intra_op_num_threads = self.cfg.threads
                opts.enable_cpu_mem_arena = not self.cfg.low_memory
                self._forced_session = ort.InferenceSession(graph, sess_options=opts, providers=b.providers)
        b.decoder, b.extra_decoder_inputs = self._forced_session, kept_feed(forced)
        return "forced"

    def _configure_openvino(self, forced: tuple[int, int, int] | None) -> str:
        """One-graph OpenVINO: the bundle's decoder, or the forced copy (written once to a temporary file)."""
        from .forcing import forced_decoder_graph, kept_feed

        b: Any = self.backend
        if forced is None:
            b.use_decoder_graph(None)
            b.extra_decoder_inputs = {}
            return "production"
        if self._forced_folder is None:
            import tempfile

            import onnx

            self._forced_folder = tempfile.TemporaryDirectory(prefix="sed-bench-")
            onnx.save(forced_decoder_graph(onnx.load(str(b.bundle.path("decoder")))),
                      str(Path(self._forced_folder.name) / "decoder-forced.onnx"))
        b.use_decoder_graph(Path(self._forced_folder.name) / "decoder-forced.onnx")
        b.extra_decoder_inputs = kept_feed(forced)
        return "forced"

    def _predicted_peak_mb(self, cell: Cell) -> float | None:
        if self.cfg.max_rss_gb is None:
            return None
        fit = _fit_line([x for x, _ in self.mem_points], [y for _, y in self.mem_points])
        now = measure.rss_mb()
        if fit is None or now is None:
            return None
        a, b = fit
        return now + max(0.0, a + b * cell.decoder_classes())

    def run(self, cell: Cell, pipe: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.name, "vocab": cell.vocab, "num_classes": cell.num_classes, "topk": cell.k_label,
            "forced_kept": None if cell.forced is None or cell.topk is None else list(cell.forced),
            "paper_ms": paper_ms(pipe.vocab.name, cell.num_classes, cell.topk),
        }
        predicted = self._predicted_peak_mb(cell)
        if predicted is not None and predicted * MEMORY_FIT_MARGIN > self.cfg.max_rss_gb * 1024:  # type: ignore[operator]
            out.update(status="skipped", reason=(
                f"predicted peak RSS {predicted / 1024:.1f} GiB (linear in classes from the cells measured before) "
                f"x {MEMORY_FIT_MARGIN} > --max-rss-gb {self.cfg.max_rss_gb:g}"))
            self._advance(self.cfg.warmup + self.cfg.iters * len(self.images))
            return out
        chunk = self._choose_chunk(cell)
        out["decoder"] = "one pass" if chunk is None else f"class-chunked, {chunk} classes per step"
        out["chunk"] = chunk
        try:
            out.update(self._measure(cell, pipe, chunk))
            out["status"] = "ok"
        except (MemoryError, RuntimeError) as e:  # torch's allocator and ORT raise these for out-of-memory
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            out.update(status="failed", reason=f"{type(e).__name__}: {msg}")
        finally:
            if self.name == "torch":
                self.backend.cer_select = None  # type: ignore[attr-defined]
        gc.collect()
        return out

    def _advance(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def _measure(self, cell: Cell, pipe: Any, chunk: int | None) -> dict[str, Any]:
        key = self._configure(cell, chunk)
        gc.collect()
        torch = None
        if self.cuda:
            import torch

            dev = self.backend.device  # type: ignore[attr-defined]
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        rss0 = measure.rss_mb()
        measure.reset_peak_rss()
        for _ in range(self.cfg.warmup):
            self._call(pipe, self.images[0], key, None)
            self._advance(1)
        samples: list[dict[str, float]] = []
        kept: list[list[int]] = []
        for _ in range(self.cfg.iters):
            for img in self.images:
                r = self._call(pipe, img, key, cell.key)
                samples.append({s: v for s, v in r.timings_ms.items() if s != "text_embeddings_once"})
                if r.kept is not None:
                    kept.append([int(len(k)) for k in r.kept])
                self._advance(1)
        peak = measure.peak_rss_mb()
        memory: dict[str, Any] = {
            "rss_start_mb": rss0, "rss_peak_mb": peak,
            "rss_increment_mb": None if peak is None or rss0 is None else max(0.0, peak - rss0),
            "device_peak_mb": None,
        }
        if torch is not None:
            memory["device_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        x = cell.decoder_classes() if not kept else int(np.median([k[0] for k in kept]))
        if memory["rss_increment_mb"] is not None:
            self.mem_points.append((float(x), float(memory["rss_increment_mb"])))
        stages = sorted({s for smp in samples for s in smp})
        result: dict[str, Any] = {
            "samples": len(samples),
            "ms": {s: stats([smp.get(s, 0.0) for smp in samples]) for s in stages},
            "stage_source": {s: "timed" for s in stages},
            "kept": None if not kept else {
                f"cer{i}": {"median": float(np.median([k[i] for k in kept])), "min": min(k[i] for k in kept),
                            "max": max(k[i] for k in kept)} for i in range(3)},
            "memory": memory,
        }
        return result

    def _call(self, pipe: Any, image: np.ndarray, key: str, cell_key: str | None) -> Any:
        """One pipeline call; the ORT profiler learns which cell (None: warm-up) the decoder run was for."""
        try:
            return pipe(image)
        finally:
            if self.profiler is not None:
                self.profiler.note(key, cell_key)

    def finish(self, cells: list[dict[str, Any]]) -> None:
        """Fold the ORT profiles into this backend's cells (stage rows, marked as profiled)."""
        if self._forced_folder is not None:
            self.backend.use_decoder_graph(None)  # type: ignore[attr-defined]
            self._forced_folder.cleanup()
            self._forced_folder = None
        if self.profiler is None:
            return
        splits = self.profiler.collect()
        for c in cells:
            if c["backend"] != self.name or c.get("status") != "ok":
                continue
            runs = splits.get(f"{c['vocab']}/k={c['topk']}")
            if not runs:
                continue
            for stage in sorted({s for r in runs for s in r}):
                c["ms"][stage] = stats([r.get(stage, 0.0) for r in runs])
                c["stage_source"][stage] = "ort-profile"
        if self.kind == "ort":
            self.backend.decoder = self._production  # type: ignore[attr-defined]
            self.backend.extra_decoder_inputs = {}  # type: ignore[attr-defined]
