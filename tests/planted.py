"""Decoder inputs on which CER really rejects classes, shared by the model, ONNX and TensorRT-executor tests.

A nearly constant image map and classes whose similarities to it are spread out: every pixel ranks the
classes alike, so a small k keeps a real subset at the first CER point and, with trained-like heads, later.
"""

from __future__ import annotations

import numpy as np
import torch

F = torch.nn.functional


def planted_inputs(model, n: int = 25, seed: int = 2):
    """(features with a planted dense map, (N, 80, E) unit-norm text) for `model` (a sed-tiny)."""
    g = torch.Generator().manual_seed(seed)
    e = model.config.embed_dim
    d = F.normalize(torch.randn(e, generator=g), dim=0)
    dense = d.reshape(1, e, 1, 1) + 0.05 * torch.randn(1, e, 24, 24, generator=g)
    sims = torch.linspace(-0.9, 0.9, n)[torch.randperm(n, generator=g)]
    o = torch.randn(n, e, generator=g)
    o = F.normalize(o - (o @ d)[:, None] * d, dim=-1)
    text = (sims[:, None] * d + (1 - sims[:, None] ** 2).sqrt() * o)[:, None, :]
    text = F.normalize(text + 0.05 * torch.randn(n, 80, e, generator=g), dim=-1)
    with torch.inference_mode():
        feats = model.encode_image(torch.zeros(1, 3, 768, 768))._replace(dense=dense)
    return feats, text


def decoder_feed(feats, text, k: int) -> dict[str, np.ndarray]:
    """The one-graph decoder's inputs (dense, text, res4, res3, res2, k) as numpy."""
    return {
        "dense": feats.dense.numpy(),
        "text": text.numpy(),
        "res4": feats.res4.numpy(),
        "res3": feats.res3.numpy(),
        "res2": feats.res2.numpy(),
        "k": np.array([k], np.int64),
    }
