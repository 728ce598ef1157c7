"""Per-layer int8 sensitivity: how much each quantized node's input loses to its QuantizeLinear/DequantizeLinear.

ONNX Runtime's `qdq_loss_debug` runs the QDQ graph with every activation exposed and pairs each tensor before and
after its Q/DQ; the signal-to-quantization-noise ratio (SQNR, dB, higher is better) of that pair is the local
error quantizing it adds. A node whose activation input scores low (a wide-range tensor, or one whose few large
values set the scale) is where int8 hurts, so `sed-export build --int8-min-sqnr DB` leaves such nodes in float
(see `calibration.quantize_encoder`). The activations of every node are held for every image fed, so feed few
(the builder uses two of the calibration images).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["node_sqnr"]


def node_sqnr(qdq_path: Path, feeds: list[dict[str, np.ndarray]], op_types: Iterable[str]) -> dict[str, float]:
    """SQNR (dB) of each quantized node's activation input in the QDQ graph at `qdq_path`, keyed by node name
    (nodes of `op_types` only; a node with two quantized activations gets the lower)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory() as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        modify_model_output_intermediate_tensors(str(qdq_path), str(augmented))
        activations = collect_activations(str(augmented), feeds)  # it iterates the feeds itself
    sqnr = {name: compute_signal_to_quantization_noice_ratio(m["pre_qdq"], m["post_qdq"])
            for name, m in create_activation_matching(activations).items()}
    model = onnx.load(str(qdq_path), load_external_data=False)
    dq_source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    q_source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    wanted = set(op_types)
    out: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in wanted:
            continue
        scores: list[Any] = []
        for name in node.input:
            quantized = q_source.get(dq_source.get(name, ""))  # the float tensor behind Q -> DQ -> this input
            if quantized is not None and quantized in sqnr:
                scores.append(sqnr[quantized])
        if scores:
            out[node.name] = float(min(scores))
    return out
