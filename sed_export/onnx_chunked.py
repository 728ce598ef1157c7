"""ONNX export of the class-chunked decoder segments (`sed_runtime.chunked_decoder` names them and runs them).

Each segment is a torch module over the reference's own pieces (`ChunkedUp.partial_stats` and `.apply`, the
decoder's cost volume, conv1 and heads), traced once with the class axis T dynamic. Graph inputs and outputs
are fp32 in every precision (an fp16 graph casts inside; fp16 -> fp32 -> fp16 is exact), and the attention's
class sums are fp32 as in the one-graph decoder.
"""

from __future__ import annotations

import torch
from onnx import ModelProto
from torch import nn

from sed_runtime.chunked_decoder import (
    APPLY,
    APPLY_INPUTS,
    APPLY_OUTPUTS,
    LAST_OUTPUTS,
    PRE,
    PRE_INPUTS,
    PRE_OUTPUTS,
    SKIPS,
    SKIPS_INPUTS,
    SKIPS_OUTPUTS,
    STATS,
    STATS_INPUTS,
    STATS_OUTPUTS,
)

from .decoder import ChunkedUp
from .model import SedModel
from .onnx_export import _compute_dtype, _export, _with_precision


def _layers(model: SedModel) -> tuple[nn.Module, nn.Module, nn.Module]:
    d = model.transformer
    return d.decoder1, d.decoder2, d.decoder3


class _Skips(nn.Module):
    """Per image: each layer's skip projection and its share of that layer's first DoubleConv convolution."""

    def __init__(self, model: SedModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = model.transformer.decoder_guidance_projection
        self.layers = nn.ModuleList(_layers(model))
        self.dtype = dtype

    def forward(self, res4: torch.Tensor, res3: torch.Tensor, res2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        skips = [p(r.to(self.dtype)) for p, r in zip(self.proj, (res4, res3, res2))]
        return tuple(ChunkedUp(layer).skip_part(s).float() for layer, s in zip(self.layers, skips))


class _Pre(nn.Module):
    """Per class: cost volume (fp32), conv1 and aux head 0."""

    def __init__(self, model: SedModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.dec, self.dtype = model.transformer, dtype

    def forward(self, dense: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        corr = self.dec.cost_volume(dense, text).to(self.dtype)
        x = self.dec.conv1(corr)
        return corr.float(), x.float(), self.dec.head0(x)[:, 0].float()


class _Stats(nn.Module):
    """A chunk's ConvNeXt block output y (kept for the apply pass, so the block runs once) and its share of layer
    i's attention class sums."""

    def __init__(self, model: SedModel, index: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer, self.dtype = _layers(model)[index], dtype

    def forward(self, x: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.layer.cnext(x.to(self.dtype))
        kv, ksum = ChunkedUp(self.layer).partial_stats_from_block(y, total)
        return kv, ksum, y.float()


class _Apply(nn.Module):
    """Cost-guidance projection and the rest of layer i for a chunk; aux head i+1, or the head's sigmoid last."""

    def __init__(self, model: SedModel, index: int, dtype: torch.dtype) -> None:
        super().__init__()
        d = model.transformer
        self.proj = d.decoder_corr_guidance_projection[index]
        self.layer = _layers(model)[index]
        self.head = (d.head1, d.head2, d.head)[index]
        self.last, self.dtype = index == 2, dtype

    def forward(self, y: torch.Tensor, cg: torch.Tensor, skip: torch.Tensor, kv: torch.Tensor, ksum: torch.Tensor,
                total: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        g = self.proj(cg.to(self.dtype))
        out = ChunkedUp(self.layer).apply_from_block(y.to(self.dtype), skip.to(self.dtype), g, kv, ksum, total)
        logits = self.head(out)[:, 0].float()
        if self.last:
            return torch.sigmoid(logits)
        return out.float(), g.float(), logits


def build_chunked_segments(model: SedModel, precision: str = "fp32") -> dict[str, ModelProto]:
    """Every chunked segment, traced on 3 classes with the class axis T dynamic."""
    dtype = _compute_dtype(precision)
    m = _with_precision(model, precision)
    cfg = m.config
    with torch.inference_mode():
        feats = model.encode_image(torch.zeros(1, 3, cfg.sed.input_size, cfg.sed.input_size))
    text = torch.nn.functional.normalize(torch.randn(3, len(model.templates), cfg.embed_dim), dim=-1)
    res = (feats.res4, feats.res3, feats.res2)
    segments = {
        SKIPS: _export(_Skips(m, dtype), res, list(SKIPS_INPUTS), list(SKIPS_OUTPUTS), {}),
        PRE: _export(_Pre(m, dtype), (feats.dense, text), list(PRE_INPUTS), list(PRE_OUTPUTS),
                     {"text": {0: "T"}, **{o: {0: "T"} for o in PRE_OUTPUTS}}),
    }
    with torch.inference_mode():
        skips = _Skips(m, dtype)(*res)
        corr, x, _ = _Pre(m, dtype)(feats.dense, text)
    cg = corr
    total = torch.tensor([3.0])
    for i in range(3):
        stats = _Stats(m, i, dtype)
        segments[STATS[i]] = _export(stats, (x, total), list(STATS_INPUTS), list(STATS_OUTPUTS),
                                     {"x": {0: "T"}, "y": {0: "T"}})
        with torch.inference_mode():
            kv, ksum, y = stats(x, total)
        apply = _Apply(m, i, dtype)
        outs = LAST_OUTPUTS if i == 2 else APPLY_OUTPUTS
        args = (y, cg, skips[i], kv, ksum, total)
        segments[APPLY[i]] = _export(apply, args, list(APPLY_INPUTS), list(outs),
                                     {"y": {0: "T"}, "cg": {0: "T"}, **{o: {0: "T"} for o in outs}})
        if i < 2:
            with torch.inference_mode():
                x, cg, _ = apply(*args)
    for name, graph in segments.items():
        graph.graph.name = name
    return segments
