"""PyTorch backend: the faithful reference model itself, behind the common backend interface.

This is the one runtime module that uses the export side: the PyTorch backend *is* the reference model
(`sed_export`), imported lazily so the rest of the runtime stays torch-free.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SedUserError
from ..memory import DecoderMemory
from ..vocab import Vocabulary
from .base import Backend, BackendResult, ImageFeatures, InputSpec, weights_label


class TorchBackend(Backend):
    """Run the reference SED model with PyTorch (CPU or CUDA)."""

    name = "torch"

    def __init__(
        self,
        model: str | Path | dict[str, Any] = "sed-tiny",
        checkpoint: str | Path | None = None,
        *,
        device: str = "cpu",
        allow_pickle: bool = False,
        seed: int = 0,
        precision: str = "fp32",
        cer_kernel: str = "auto",
    ) -> None:
        try:
            import torch
        except ImportError:
            raise SedUserError(
                "the torch backend needs PyTorch: pip install 'sed-deploy[export]', or use an ONNX bundle"
            ) from None
        from sed_export.checkpoint import load_checkpoint_into, resolve_weights
        from sed_export.config import load_model_config, model_config_from_dict
        from sed_export.model import build_model

        if precision not in ("fp32", "fp16"):
            raise SedUserError(f"--precision must be fp32 or fp16 for the torch backend, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SedUserError(f"--device {device} asked for but no CUDA GPU is visible; use --device cpu")
        self.config = model_config_from_dict(model) if isinstance(model, dict) else load_model_config(model)
        self.model = build_model(self.config, seed=seed)
        self.checkpoint_sha256: str | None = None
        path, self.weights_source = resolve_weights(self.config, checkpoint)
        if path is not None:
            _, self.checkpoint_sha256 = load_checkpoint_into(self.model, path, allow_pickle=allow_pickle)
            self.weights_name = path.name
        self.device = torch.device(device)
        self.model.to(self.device)
        self._torch = torch
        # fp16 = torch.autocast: convs/matmuls in half, norms and softmax in fp32 (autocast's lists), and the
        # class sums of the linear attention in fp32 (see `linear_attention`). Text embeddings stay fp32.
        self.precision = precision
        # Benchmark hooks (sed-bench), off by default: force CER's survivors (see `SedDecoder.forward`), and
        # time stages with CUDA events instead of synchronize + wall clock.
        self.cer_select: Any = None
        self.cuda_events = False
        # Class-chunked decoding (`SedDecoder.forward_chunked`): None runs every class at once; an int bounds the
        # decoder's working set to that many classes per step (same results). Chosen by --max-memory, or set.
        self.class_chunk: int | None = None
        self._events: list[tuple[str, Any, Any]] = []
        self.cer = self._choose_cer(cer_kernel)

    def _choose_cer(self, cer_kernel: str) -> str:
        """On a GPU, rank CER with our CUDA kernel (built once by torch, cached) unless told not to.

        auto: the kernel when it builds here, else torch.topk with the reason in describe(); on: the kernel or a
        one-line error; off: torch.topk. On the CPU CER always uses torch.topk.
        """
        if cer_kernel not in ("auto", "on", "off"):
            raise SedUserError(f"cer_kernel must be auto, on or off, got {cer_kernel!r}")
        if self.device.type != "cuda" or cer_kernel == "off":
            if cer_kernel == "on":
                raise SedUserError("the CER CUDA kernel needs --device cuda")
            return "torch.topk"
        from sed_export.cuda_ops import CudaOpUnavailable, load_topk_union_op, topk_union_cuda

        try:
            load_topk_union_op()
        except CudaOpUnavailable as e:
            if cer_kernel == "on":
                raise SedUserError(f"{e}; or run CER with torch.topk (cer_kernel='off')") from None
            return f"torch.topk ({e})"
        self.model.transformer.select_classes = topk_union_cuda
        return "topk-union CUDA kernel"

    def decoder_memory(self) -> DecoderMemory | None:
        if self.device.type not in ("cpu", "cuda"):
            return None
        from dataclasses import asdict

        return DecoderMemory.from_settings(asdict(self.config.sed), len(self.model.templates),
                                           "torch" if self.device.type == "cpu" else "torch-cuda")

    def free_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(self._torch.cuda.mem_get_info(self.device)[0])
        return super().free_memory_bytes()

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_settings(self.config.sed)

    def encode_text(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        import open_clip

        from sed_export.text import cached_text_embeddings

        tokenizer = open_clip.tokenizer.SimpleTokenizer(
            context_length=int(self.config.clip["text_cfg"].get("context_length", 77))
        )
        return cached_text_embeddings(
            self.model.clip_model, tokenizer, self.config.name, vocab, self.model.templates, progress=progress
        )

    @contextlib.contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        if self.cuda_events and self.device.type == "cuda":
            start, end = (self._torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self._events.append((stage, start, end))
            return
        sync = self.device.type == "cuda"
        if sync:
            self._torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if sync:
            self._torch.cuda.synchronize(self.device)
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3

    def _autocast(self) -> Any:
        torch = self._torch
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "fp16")

    def _flush_events(self, timings: dict[str, float]) -> None:
        if self._events:
            self._torch.cuda.synchronize(self.device)
            for stage, start, end in self._events:
                timings[stage] = timings.get(stage, 0.0) + start.elapsed_time(end)
            self._events.clear()

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        torch = self._torch
        timings: dict[str, float] = {}
        with torch.inference_mode(), self._autocast():
            with self._timed(timings, "encoder"):
                feats = self.model.encode_image(torch.from_numpy(image).to(self.device))
        self._flush_events(timings)
        return ImageFeatures(feats, self.name, timings_ms=timings)

    def decode(self, features: ImageFeatures, text: np.ndarray, topk: int | None) -> BackendResult:
        torch = self._torch
        self._check_features(features)
        feats = features.data
        timings: dict[str, float] = {}
        with torch.inference_mode(), self._autocast():
            txt = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32)).to(self.device)
            with self._timed(timings, "decoder"):
                timer = lambda s: self._timed(timings, s)  # noqa: E731
                if self.class_chunk is not None:
                    out = self.model.transformer.forward_chunked(
                        feats.dense, txt, (feats.res4, feats.res3, feats.res2), topk=topk, chunk=self.class_chunk,
                        timer=timer, kept_only=True, cer_select=self.cer_select)
                elif self.cer_select is None:
                    out = self.model.decode(feats, txt, topk=topk, timer=timer, kept_only=True)
                else:
                    out = self.model.transformer(feats.dense, txt, (feats.res4, feats.res3, feats.res2), topk=topk,
                                                 timer=timer, cer_select=self.cer_select)
            scores = out.scores.float().cpu().numpy()
        self._flush_events(timings)
        kept = None if out.kept is None else [k.cpu().numpy().astype(np.int32) for k in out.kept]
        rows = None if out.rows is None else out.rows.cpu().numpy().astype(np.int32)
        return BackendResult(scores=scores, kept=kept, timings_ms=timings, rows=rows)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.config.name,
            "device": str(self.device),
            "precision": self.precision,
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights": weights_label(self.weights_source, getattr(self, "weights_name", None)),
            "torch": self._torch.__version__,
            "cer": self.cer,
            "decoder": "one pass over all classes" if self.class_chunk is None else
            f"class-chunked, {self.class_chunk} classes per step",
        }
