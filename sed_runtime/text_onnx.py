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
    from .tokenizer import longest_prompt

    tokens_input = session.get_inputs()[0]
    # Bundles exported before the sequence axis became dynamic take all context_length columns.
    dynamic_length = not isinstance(tokens_input.shape[1], int)

    def encode(texts: list[str]) -> np.ndarray:
        tokens = tokenizer(texts)
        if dynamic_length:
            tokens = np.ascontiguousarray(tokens[:, : longest_prompt(tokens)])
        (feats,) = session.run(None, {tokens_input.name: tokens})
        return np.asarray(feats)

    return encode_vocabulary_with(encode, vocab, templates, batch_size=batch_size, progress=progress)
