"""Export the CLIP text tower to ONNX (tokens T x 77 int64 -> raw text features T x E, T dynamic).

Always fp32: it runs once per new vocabulary and its output feeds a cache, so precision beats speed here.
Normalisation and the prompt-ensemble average stay outside the graph (`sed_runtime.text_onnx`), exactly as
`sed_export.text.encode_vocabulary` does them, so both paths share one reduction rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .onnx_export import OPSET, _export, save_graph

TEXT_INPUTS = ["tokens"]
TEXT_OUTPUTS = ["text_features"]


class _TextTower(nn.Module):
    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.clip = clip_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return cast(Any, self.clip).encode_text(tokens).float()


def export_text_encoder(clip_model: nn.Module, path: str | Path, *, opset: int = OPSET) -> None:
    """Write `path` (checked, atomic). The clip model is left in the train/eval mode it came in."""
    if opset != OPSET:
        raise ValueError(f"text encoder export uses opset {OPSET}, got {opset}")
    ctx = int(cast(Any, clip_model).context_length)
    was_training = clip_model.training
    clip_model.eval()
    try:
        tokens = torch.zeros(2, ctx, dtype=torch.long)
        tokens[:, 0], tokens[:, 1] = 49406, 49407
        graph = _export(_TextTower(clip_model), (tokens,), TEXT_INPUTS, TEXT_OUTPUTS,
                        {"tokens": {0: "T"}, "text_features": {0: "T"}})
    finally:
        clip_model.train(was_training)
    save_graph(graph, path)
