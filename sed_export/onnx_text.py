"""Export the CLIP text tower to ONNX (tokens T x L int64 -> raw text features T x E; T and L dynamic).

L is the batch's longest prompt (`sed_runtime.tokenizer.longest_prompt`, at most the context length): the tower
is causal and pools at the end token, so the cut changes nothing but the work. A tower without that property
is exported with L fixed at the context length.

Always fp32: it runs once per new vocabulary and its output feeds a cache, so precision beats speed here.
Normalisation and the prompt-ensemble average stay outside the graph (`sed_runtime.text_onnx`), exactly as
`sed_export.text.encode_vocabulary` does them, so both paths share one reduction rule.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, cast

import onnx
import torch
from torch import nn

from .onnx_export import OPSET, _export, save_graph
from .text import encode_text_trimmed, trims_exactly

TEXT_INPUTS = ["tokens"]
TEXT_OUTPUTS = ["text_features"]


class _TextTower(nn.Module):
    def __init__(self, clip_model: nn.Module, trimmed: bool) -> None:
        super().__init__()
        self.clip = clip_model
        self.trimmed = trimmed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.trimmed:
            return encode_text_trimmed(self.clip, tokens).float()
        return cast(Any, self.clip).encode_text(tokens).float()


def export_text_encoder(clip_model: nn.Module, path: str | Path, *, opset: int = OPSET) -> None:
    """Write `path` (checked, atomic). The clip model is left in the train/eval mode it came in."""
    if opset != OPSET:
        raise ValueError(f"text encoder export uses opset {OPSET}, got {opset}")
    ctx = int(cast(Any, clip_model).context_length)
    was_training = clip_model.training
    clip_model.eval()
    try:
        if trims_exactly(clip_model):
            graph = _export_dynamic_length(clip_model, ctx)
        else:
            tokens = torch.zeros(2, ctx, dtype=torch.long)
            tokens[:, 0], tokens[:, 1] = 49406, 49407
            graph = _export(_TextTower(clip_model, False), (tokens,), TEXT_INPUTS, TEXT_OUTPUTS,
                            {"tokens": {0: "T"}, "text_features": {0: "T"}})
    finally:
        clip_model.train(was_training)
    save_graph(graph, path)


def _export_dynamic_length(clip_model: nn.Module, context_length: int) -> onnx.ModelProto:
    """The trimmed tower through torch.export: the TorchScript tracer bakes the sequence length into
    nn.MultiheadAttention's reshapes (checked: a graph traced at 16 tokens fails at 30), torch.export keeps it
    symbolic."""
    import warnings

    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[:, 0], tokens[:, 1] = 49406, 49407
    dims = {0: torch.export.Dim("T"), 1: torch.export.Dim("L", min=2, max=context_length)}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_TextTower(clip_model, True), (tokens,), None, input_names=TEXT_INPUTS,
                                    output_names=TEXT_OUTPUTS, dynamo=True, dynamic_shapes={"tokens": dims},
                                    opset_version=OPSET, verbose=False)
        program.optimize()
    model = program.model_proto
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "L"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "T"
    return model
