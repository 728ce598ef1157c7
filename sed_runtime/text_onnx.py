"""Vocabulary -> (N, P, E) text embeddings with the bundle's text_encoder.onnx (no torch).

Same semantics as the torch path: both run `prompt_ensemble.encode_vocabulary_with`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .prompt_ensemble import encode_vocabulary_with
from .vocab import Vocabulary


def encode_vocabulary_onnx(
    session_or_path: Any,
    tokenizer: Callable[[list[str]], np.ndarray],
    vocab: Vocabulary | Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """(N, P, E) float32 unit-norm embeddings, in class order. `session_or_path`: an ORT session or a path."""
    session = session_or_path
    if isinstance(session_or_path, str | Path):
        import onnxruntime as ort

        session = ort.InferenceSession(str(session_or_path), providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name

    def encode(texts: list[str]) -> np.ndarray:
        (feats,) = session.run(None, {in_name: tokenizer(texts)})
        return np.asarray(feats)

    return encode_vocabulary_with(encode, vocab, templates, batch_size=batch_size, progress=progress)
