"""Text embeddings of a vocabulary with the PyTorch CLIP text tower, cached on disk, and the tower's digest.

The prompt-ensemble semantics (official SED / CAT-Seg `class_embeddings`) live in
`sed_runtime.prompt_ensemble`, shared with the torch-free ONNX text path.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch

from sed_runtime.prompt_ensemble import encode_vocabulary_with
from sed_runtime.text_cache import TextEmbeddingCache, templates_digest, text_cache_key
from sed_runtime.vocab import Vocabulary

__all__ = ["cached_text_embeddings", "encode_text_trimmed", "encode_vocabulary", "text_tower_digest"]


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def trims_exactly(clip_model: torch.nn.Module) -> bool:
    """Whether cutting tokens after the longest prompt leaves this tower's embeddings unchanged: a causal mask
    and pooling at the end-of-text token (CLIP's own), which every SED model has."""
    m = cast(Any, clip_model)
    mask = getattr(m, "attn_mask", None)
    if getattr(m, "text_pool_type", None) != "argmax" or not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool((mask[upper] == float("-inf")).all()) and not bool(mask[~upper].any())


def encode_text_trimmed(clip_model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` on (T, L) tokens with L <= the context length (cut with
    `sed_runtime.tokenizer.longest_prompt`): the same arithmetic on the first L positions only."""
    from open_clip.transformer import text_global_pool

    m = cast(Any, clip_model)
    length = tokens.shape[1]
    cast_dtype = m.transformer.get_cast_dtype()
    x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:length].to(cast_dtype)
    x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
    x = text_global_pool(m.ln_final(x), tokens, m.text_pool_type)
    if m.text_projection is None:
        return x
    return m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection


def encode_vocabulary(
    clip_model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    vocab: Vocabulary | Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """(N, P, E) float32 unit-norm template embeddings of every class of `vocab`, in class order.

    The text tower in eval mode (its train/eval mode is restored after); the ensemble reduction is the
    runtime's (`sed_runtime.prompt_ensemble`), shared with the bundle's ONNX text encoder. Each batch runs
    only up to its longest prompt (`encode_text_trimmed`): the same embeddings, several times faster.
    """
    from sed_runtime.tokenizer import longest_prompt

    device = _model_device(clip_model)
    trim = trims_exactly(clip_model)

    def encode(texts: list[str]) -> np.ndarray:
        tokens = tokenizer(texts).to(device)
        if trim:
            emb = encode_text_trimmed(clip_model, tokens[:, : longest_prompt(tokens)])
        else:
            emb = cast(Any, clip_model).encode_text(tokens)
        return emb.float().cpu().numpy()

    was_training = clip_model.training
    clip_model.eval()
    try:
        with torch.inference_mode():
            return encode_vocabulary_with(encode, vocab, templates, batch_size=batch_size, progress=progress)
    finally:
        clip_model.train(was_training)


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
