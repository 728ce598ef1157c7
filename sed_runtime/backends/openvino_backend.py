"""OpenVINO backend: runs a bundle's own encoder and decoder ONNX files on the CPU plugin; no PyTorch.

The decoder's class axis N is dynamic in the graph. OpenVINO compiles a dynamic-shape model lazily for each new
N (measured on sed-tiny: about 9 s for the first call with a new N, 2.5 s after), so the decoder is instead
reshaped to the vocabulary's N and compiled once per N (a few recent ones are kept): the cost is paid once per
vocabulary, when the first image of it is decoded, and `describe()` reports it. k stays an input, and CER's
data-dependent shapes are OpenVINO's to handle inside one compiled model.

Precision: `fp32` pins the CPU plugin's inference precision to f32 (on CPUs with bf16 or AMX units OpenVINO
would otherwise pick bf16 on its own); `bf16` asks for bf16 where the CPU supports it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..bundle_text import BundleText
from ..errors import SedUserError
from ..vocab import Vocabulary
from .base import Backend, BackendResult, ImageFeatures, InputSpec

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
KEEP_COMPILED = 3  # decoders compiled for this many class counts stay loaded


class OpenVinoBackend(Backend):
    """Encoder + decoder graphs of a bundle on OpenVINO's CPU plugin; text embeddings as the ORT backend has them."""

    name = "openvino"

    def __init__(self, bundle: Bundle | str | Path, *, threads: int | None = None, precision: str = "fp32") -> None:
        try:
            import openvino as ov
        except ImportError:
            raise SedUserError("the openvino backend needs OpenVINO: pip install 'sed-deploy[openvino]'") from None
        if precision not in PRECISION_HINTS:
            raise SedUserError(f"--precision for the openvino backend must be fp32 or bf16, got {precision!r}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self._ov = ov
        self.core = ov.Core()
        self.precision = precision
        self.config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.encoder = self.core.compile_model(str(self.bundle.path("encoder")), "CPU", self.config)
            self._decoder_model = self.core.read_model(str(self.bundle.path("decoder")))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise SedUserError(f"OpenVINO cannot load this bundle's graphs ({first}); rebuild the bundle") from None
        self._decoders: OrderedDict[int, Any] = OrderedDict()
        self.compile_ms: dict[int, float] = {}
        self.text_path = BundleText(self.bundle)

    @property
    def input_spec(self) -> InputSpec:
        return self.bundle.input_spec

    def encode_text(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        try:
            return self.text_path.embeddings(vocab, progress=progress)
        except ImportError:
            raise SedUserError(
                f"embedding the new vocabulary {vocab.name} needs onnxruntime for the bundled text encoder: "
                "pip install 'sed-deploy[onnx]', or embed it once with `sed-export embed-text`"
            ) from None

    def _decoder_for(self, num_classes: int) -> Any:
        """The decoder compiled for exactly `num_classes` (compiled on first use, the oldest dropped)."""
        if num_classes in self._decoders:
            self._decoders.move_to_end(num_classes)
            return self._decoders[num_classes]
        t0 = time.perf_counter()
        model = self._decoder_model.clone()
        text = model.input("text")
        shape = text.get_partial_shape()
        shape[0] = num_classes
        model.reshape({text: shape})
        compiled = self.core.compile_model(model, "CPU", self.config)
        self.compile_ms[num_classes] = (time.perf_counter() - t0) * 1e3
        self._decoders[num_classes] = compiled
        while len(self._decoders) > KEEP_COMPILED:
            self._decoders.popitem(last=False)
        return compiled

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        t0 = time.perf_counter()
        out = self.encoder({"image": np.ascontiguousarray(image, dtype=np.float32)})
        feats = {name: np.asarray(out[name]) for name in ("dense", "res4", "res3", "res2")}
        return ImageFeatures(feats, self.name, timings_ms={"encoder": (time.perf_counter() - t0) * 1e3})

    def decode(self, features: ImageFeatures, text: np.ndarray, topk: int | None) -> BackendResult:
        self._check_features(features)
        n = int(text.shape[0])
        k = n if topk is None else min(topk, n)
        timings: dict[str, float] = {}
        compiled_now = n not in self._decoders
        decoder = self._decoder_for(n)
        if compiled_now:
            timings["decoder_compile"] = self.compile_ms[n]
        t0 = time.perf_counter()
        out = decoder({**features.data, "text": np.ascontiguousarray(text, dtype=np.float32),
                       "k": np.array([k], dtype=np.int64)})
        timings["decoder"] = (time.perf_counter() - t0) * 1e3
        scores = np.asarray(out["scores"], dtype=np.float32)
        kept = None if topk is None else [np.asarray(out[f"kept{i}"], dtype=np.int32) for i in range(3)]
        return BackendResult(scores=scores, kept=kept, timings_ms=timings)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            **self.bundle.summary,
            "precision": self.bundle.manifest["precision"],
            "inference_precision": self.precision,
            "openvino": self._ov.__version__,
            "decoder_compile_ms": {str(n): round(ms, 1) for n, ms in self.compile_ms.items()},
        }
