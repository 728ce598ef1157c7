"""Vocabulary -> (N, P, E) prompt-ensemble embeddings from any text encoder (torch or ONNX), in numpy.

Official loop (SED / CAT-Seg `class_embeddings`), one class at a time: tokenize the class's prompts
(template-major, then synonym), encode, L2-normalise; with S > 1 synonyms reshape to (P, S, E), average over
S and re-normalise. Here the prompts of all classes are streamed through the encoder in chunks of
`batch_size` sequences (CLIP's text transformer is causal with no padding mask, so batching does not change
any prompt's embedding) and reduced per class as soon as a class's prompts are complete, so memory stays at
one chunk plus the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .templates import class_prompts
from .vocab import Vocabulary

# texts -> raw (T, E) text features
EncodeBatch = Callable[[list[str]], np.ndarray]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reduce_class(emb: np.ndarray, num_templates: int, num_synonyms: int) -> np.ndarray:
    """(P*S, E) unit-norm prompt embeddings -> (P, E), exactly as the official code does it."""
    if num_synonyms > 1:
        emb = _unit(emb.reshape(num_templates, num_synonyms, emb.shape[-1]).mean(axis=1))
    return emb


def encode_vocabulary_with(
    encode_batch: EncodeBatch,
    vocab: Vocabulary | Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """(N, P, E) float32 unit-norm template embeddings of every class of `vocab`, in class order."""
    class_names = tuple(vocab.classes if isinstance(vocab, Vocabulary) else vocab)
    templates = tuple(templates)
    if not class_names:
        raise ValueError("encoding a vocabulary needs at least one class")
    if not templates:
        raise ValueError("encoding a vocabulary needs at least one template")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_t = len(templates)

    texts: list[str] = []
    synonyms: list[int] = []
    for name in class_names:
        prompts, s = class_prompts(name, templates)
        texts.extend(prompts)
        synonyms.append(s)

    out: np.ndarray | None = None
    pending = np.empty((0, 0), np.float32)  # unit-norm rows of classes not complete yet
    cls = 0
    with tqdm(total=len(texts), unit="prompt", desc=f"text embeddings ({len(class_names)} classes)",
              disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            emb = _unit(np.asarray(encode_batch(chunk), dtype=np.float32))
            pending = emb if pending.size == 0 else np.concatenate([pending, emb])
            bar.update(len(chunk))
            offset = 0
            while cls < len(class_names) and pending.shape[0] - offset >= num_t * synonyms[cls]:
                rows = num_t * synonyms[cls]
                red = _reduce_class(pending[offset : offset + rows], num_t, synonyms[cls])
                if out is None:
                    out = np.empty((len(class_names), num_t, red.shape[-1]), dtype=np.float32)
                out[cls] = red
                offset += rows
                cls += 1
            pending = pending[offset:]
    assert out is not None and cls == len(class_names) and pending.shape[0] == 0, "prompt bookkeeping went wrong"
    return out
