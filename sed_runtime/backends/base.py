"""The one interface every backend (PyTorch, ONNX Runtime, TensorRT) implements, with NanoOWL's three verbs.

- `encode_text(vocab)`: a vocabulary's (N, P, E) text embeddings (cached on disk where possible);
- `encode_image(image)`: one preprocessed image's encoder outputs, an opaque `ImageFeatures`;
- `decode(features, text, topk)`: class scores at the decoder resolution plus the classes kept at each CER
  point. One image's features can be decoded again with another vocabulary or k without re-encoding.

`infer` is encode_image then decode. Pre- and post-processing stay in the pipeline so every backend is fed
and judged the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..memory import DecoderMemory
from ..vocab import Vocabulary


def weights_label(source: str | None, name: str | None = None) -> str:
    """How describe() names the weights: a checkpoint, the trained weights shipped for the model, or random."""
    if source == "checkpoint":
        return "checkpoint"
    if source == "shipped":
        return f"shipped ({name})" if name else "shipped"
    return "random (no --checkpoint)"


@dataclass(frozen=True)
class InputSpec:
    """How images must be prepared for this model (official test-time settings)."""

    input_size: int
    min_size: int
    max_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    @classmethod
    def from_settings(cls, s: Any) -> InputSpec:
        """From a model config's `sed` settings (`sed_export.config.SedSettings`): its test-time preprocessing."""
        return cls(s.input_size, s.min_size_test, s.max_size_test, tuple(s.pixel_mean), tuple(s.pixel_std))

    def preprocess(self, image: np.ndarray) -> Any:
        """The official test-time preprocessing with these settings (a `sed_runtime.preprocess.Preprocessed`)."""
        from ..preprocess import preprocess

        return preprocess(image, pixel_mean=self.pixel_mean, pixel_std=self.pixel_std, input_size=self.input_size,
                          min_size=self.min_size, max_size=self.max_size)


@dataclass
class ImageFeatures:
    """What `encode_image` returns. `data` belongs to the backend that made it (torch tensors, numpy arrays, or
    device buffers); `generation` lets a backend that reuses its buffers refuse features it has overwritten."""

    data: Any
    backend: str
    generation: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class BackendResult:
    """scores: (N, h, w) float32 probabilities with 0 for rejected classes, or, when `rows` is set, the kept-only
    form: (K, h, w) probabilities of the classes `rows` (sorted original indices), which never builds an N x h x w
    block of mostly zeros (125 MB at N = 847). kept: sorted int32 indices per CER point."""

    scores: np.ndarray
    kept: list[np.ndarray] | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    rows: np.ndarray | None = None

    def full_scores(self, num_classes: int) -> np.ndarray:
        """(N, h, w), rejected classes 0: the documented layout of `--save-npz`."""
        return expand_rows(self.scores, self.rows, num_classes)


def expand_rows(scores: np.ndarray, rows: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Kept-only (K, h, w) scores of classes `rows` -> (N, h, w) with zeros elsewhere (None: already full)."""
    if rows is None:
        return scores
    full = np.zeros((num_classes, *scores.shape[1:]), np.float32)
    full[np.asarray(rows, np.int64)] = scores
    return full


class Backend(ABC):
    """A model ready to run; construction loads everything, the verbs only compute."""

    name: str = "abstract"

    @property
    @abstractmethod
    def input_spec(self) -> InputSpec: ...

    @abstractmethod
    def encode_text(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        """(N, P, E) float32 unit-norm template embeddings of `vocab` (cached on disk where possible)."""

    @abstractmethod
    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        """image: (1, 3, S, S) float32 preprocessed -> the encoder's outputs, kept for `decode`."""

    @abstractmethod
    def decode(self, features: ImageFeatures, text: np.ndarray, topk: int | None) -> BackendResult:
        """text: (N, P, E); topk None = every class (full model). Timings are the decoder's only."""

    def infer(self, image: np.ndarray, text: np.ndarray, topk: int | None) -> BackendResult:
        """One image, start to end: `encode_image` then `decode`, with both stages' timings."""
        features = self.encode_image(image)
        result = self.decode(features, text, topk)
        result.timings_ms = {**features.timings_ms, **result.timings_ms}
        return result

    def _check_features(self, features: ImageFeatures, current: int | None = None) -> None:
        from ..errors import SedUserError

        if features.backend != self.name:
            raise SedUserError(f"image features from the {features.backend} backend cannot be decoded by the "
                               f"{self.name} backend; encode the image with this one")
        if current is not None and features.generation != current:
            raise SedUserError(f"these image features were overwritten by a later encode_image on the {self.name} "
                               "backend (it keeps one image on the device); encode the image again")

    def describe(self) -> dict[str, Any]:
        """What ran, for reports and JSON summaries."""
        return {"backend": self.name}

    def decoder_memory(self) -> DecoderMemory | None:
        """The memory the decoder will add per class (`sed_runtime.memory`), host or device (its `device` says
        which); None where not modelled."""
        return None

    def free_memory_bytes(self) -> int | None:
        """What the decoder can still grow into, in the memory `decoder_memory` models: free host memory here; a
        GPU backend reports the device's free memory."""
        from ..memory import available_bytes

        return available_bytes()
