"""Vocabulary -> (N, P, E) text embeddings with the bundle's text_encoder.onnx (no torch).

Same semantics as `sed_export.text.encode_vocabulary`: every class x template prompt (synonyms "a, b" each
get their own prompts), unit-normalised, synonyms averaged per template and re-normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .templates import class_prompts
from .vocab import Vocabulary


def _reduce_class(emb: np.ndarray, num_templates: int, num_synonyms: int) -> np.ndarray:
    if num_synonyms > 1:
        emb = emb.reshape(num_templates, num_synonyms, emb.shape[-1]).mean(axis=1)
        emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return emb


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
    names = tuple(vocab.classes if isinstance(vocab, Vocabulary) else vocab)
    templates = tuple(templates)
    if not names or not templates:
        raise ValueError("encode_vocabulary_onnx needs at least one class and one template")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    session = session_or_path
    if isinstance(session_or_path, str | Path):
        import onnxruntime as ort

        session = ort.InferenceSession(str(session_or_path), providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name

    texts: list[str] = []
    synonyms: list[int] = []
    for name in names:
        prompts, s = class_prompts(name, templates)
        texts.extend(prompts)
        synonyms.append(s)
    parts: list[np.ndarray] = []
    with tqdm(total=len(texts), unit="prompt", desc=f"text embeddings ({len(names)} classes)",
              disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            (feats,) = session.run(None, {in_name: tokenizer(chunk)})
            feats = np.asarray(feats, dtype=np.float32)
            parts.append(feats / np.linalg.norm(feats, axis=-1, keepdims=True))
            bar.update(len(chunk))
    flat = np.concatenate(parts)
    num_t = len(templates)
    out = np.empty((len(names), num_t, flat.shape[-1]), dtype=np.float32)
    offset = 0
    for i, s in enumerate(synonyms):
        rows = num_t * s
        out[i] = _reduce_class(flat[offset : offset + rows], num_t, s)
        offset += rows
    return out
