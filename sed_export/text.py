"""Text embeddings of a vocabulary with the CLIP text tower, with the official SED semantics, batched.

Official loop (SED / CAT-Seg `class_embeddings`), one class at a time: tokenize the class's prompts
(template-major, then synonym), `encode_text`, L2-normalise; with S > 1 synonyms reshape to (P, S, E),
average over S and re-normalise. Here the prompts of all classes are streamed through the text tower in
chunks of `batch_size` sequences (the text transformer is causal with no padding mask, so batching does not
change any prompt's embedding) and reduced per class as soon as a class's prompts are complete.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from sed_runtime.templates import class_prompts
from sed_runtime.text_cache import TextEmbeddingCache, templates_digest, text_cache_key
from sed_runtime.vocab import Vocabulary

__all__ = ["cached_text_embeddings", "encode_vocabulary", "text_tower_digest"]


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _reduce_class(emb: torch.Tensor, num_templates: int, num_synonyms: int) -> torch.Tensor:
    """(P*S, E) unit-norm prompt embeddings -> (P, E), exactly as the official code does it."""
    if num_synonyms > 1:
        emb = emb.reshape(num_templates, num_synonyms, emb.shape[-1]).mean(dim=1)
        emb = emb / emb.norm(dim=-1, keepdim=True)
    return emb


def encode_vocabulary(
    clip_model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
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
        raise ValueError("encode_vocabulary needs at least one class")
    if not templates:
        raise ValueError("encode_vocabulary needs at least one template")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_t = len(templates)

    texts: list[str] = []
    synonyms: list[int] = []
    for name in class_names:
        prompts, s = class_prompts(name, templates)
        texts.extend(prompts)
        synonyms.append(s)

    device = _model_device(clip_model)
    was_training = clip_model.training
    clip_model.eval()
    out: np.ndarray | None = None
    try:
        with torch.inference_mode():
            pending: list[torch.Tensor] = []
            pending_rows = 0
            cls = 0
            with tqdm(
                total=len(texts),
                unit="prompt",
                desc=f"text embeddings ({len(class_names)} classes)",
                disable=not progress,
                leave=False,
            ) as bar:
                for start in range(0, len(texts), batch_size):
                    chunk = texts[start : start + batch_size]
                    tokens = tokenizer(chunk).to(device)
                    emb = cast(Any, clip_model).encode_text(tokens)
                    emb = emb / emb.norm(dim=-1, keepdim=True)
                    pending.append(emb)
                    pending_rows += emb.shape[0]
                    bar.update(len(chunk))
                    # Reduce every class whose prompts are all in.
                    if cls < len(class_names) and pending_rows >= num_t * synonyms[cls]:
                        buf = torch.cat(pending) if len(pending) > 1 else pending[0]
                        offset = 0
                        while cls < len(class_names) and buf.shape[0] - offset >= num_t * synonyms[cls]:
                            rows = num_t * synonyms[cls]
                            red = _reduce_class(buf[offset : offset + rows], num_t, synonyms[cls])
                            if out is None:
                                out = np.empty((len(class_names), num_t, red.shape[-1]), dtype=np.float32)
                            out[cls] = red.float().cpu().numpy()
                            offset += rows
                            cls += 1
                        rest = buf[offset:]
                        pending = [rest] if rest.shape[0] else []
                        pending_rows = rest.shape[0]
            assert cls == len(class_names) and pending_rows == 0, "prompt bookkeeping went wrong"
    finally:
        clip_model.train(was_training)
    assert out is not None
    return out


def text_tower_digest(clip_model: torch.nn.Module) -> str:
    """sha256 over every non-"visual." state_dict tensor (sorted keys; name, shape, dtype, raw bytes)."""
    h = hashlib.sha256()
    state = clip_model.state_dict()
    for key in sorted(state):
        if key.startswith("visual."):
            continue
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(key.encode("utf-8"))
        h.update(repr(tuple(t.shape)).encode("ascii"))
        h.update(str(t.dtype).encode("ascii"))
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def cached_text_embeddings(
    clip_model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    model_name: str,
    vocab: Vocabulary,
    templates: Sequence[str],
    cache: TextEmbeddingCache | None = None,
    progress: bool = True,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """`encode_vocabulary`, served from the on-disk cache when this model/weights/templates/vocab was seen.

    cache None uses the default cache folder (`$SED_CACHE_DIR` or ~/.cache/sed-deploy/text). A cache that
    cannot be written only costs a warning.
    """
    templates = tuple(templates)
    cache = cache if cache is not None else TextEmbeddingCache()
    weights = text_tower_digest(clip_model)
    key = text_cache_key(model_name, weights, templates, vocab.classes)
    hit = cache.get(key)
    if hit is not None and hit.ndim == 3 and hit.shape[:2] == (len(vocab), len(templates)):
        return hit
    emb = encode_vocabulary(clip_model, tokenizer, vocab, templates, batch_size=batch_size, progress=progress)
    metadata: dict[str, Any] = {
        "model": model_name,
        "weights_sha256": weights,
        "vocabulary": vocab.name,
        "num_classes": len(vocab),
        "templates_sha256": templates_digest(templates),
        "vocabulary_sha256": vocab.digest(),
    }
    try:
        cache.put(key, emb, metadata)
    except OSError as e:
        warnings.warn(f"could not write the text-embedding cache in {cache.root}: {e}", stacklevel=2)
    return emb
