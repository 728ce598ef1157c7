"""ONNX export: a fixed-shape encoder graph and one decoder graph whose class axis shrinks at each CER point.

The decoder is exported as four torch segments (pre-rejection, decoder1, decoder2, decoder3 + head), each
with a dynamic class axis, and stitched together with the standard-op CER subgraph of `onnx_cer`. Keeping
CER as a graph we write ourselves (not a traced artefact) lets the TensorRT path swap it for a plugin node.

Precision lives in the graph: `fp16` exports the modules in half precision with LayerNorm/GroupNorm, the
linear attention's sums, the cost volume's normalisation and the CER ranking kept in fp32. Graph inputs
and outputs are fp32 in both precisions.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from sed_runtime.split_decoder import LAST_OUTPUTS, LAYER_OUTPUTS, LAYERS, PRE, PRE_INPUTS, PRE_OUTPUTS

from .model import SedModel
from .onnx_cer import SubGraph, gather_rows, topk_union_graph
from .onnx_fp16 import fuse_layernorm_casts

OPSET = 18
PRECISIONS = ("fp32", "fp16")

ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["dense", "res4", "res3", "res2"]
DECODER_INPUTS = ["dense", "text", "res4", "res3", "res2", "k"]
DECODER_OUTPUTS = ["scores", "kept0", "kept1", "kept2", "probs"]


def _compute_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.float16 if precision == "fp16" else torch.float32


def _with_precision(module: nn.Module, precision: str) -> nn.Module:
    """A copy of `module` in the compute precision, norms kept in fp32 (cast in, compute, cast back)."""
    module = copy.deepcopy(module).eval()
    if precision == "fp32":
        return module
    module.half()

    def cast_in(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(a.float() for a in args)

    def cast_out(_: nn.Module, __: Any, out: torch.Tensor) -> torch.Tensor:
        return out.half()

    for mod in module.modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            mod.float()
            mod.register_forward_pre_hook(cast_in)
            mod.register_forward_hook(cast_out)
    return module


class _Encoder(nn.Module):
    def __init__(self, model: SedModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.model.encode_image(image.to(self.dtype))
        return tuple(t.float() for t in (f.dense, f.res4, f.res3, f.res2))


class _PreRejection(nn.Module):
    """Cost volume (fp32), conv1, aux head 0 and the per-image skip projections: runs on all N classes."""

    def __init__(self, model: SedModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.dec, self.dtype = model.transformer, dtype

    def forward(self, dense, text, res4, res3, res2):  # type: ignore[no-untyped-def]
        d = self.dec
        corr = d.cost_volume(dense, text).to(self.dtype)
        x = d.conv1(corr)
        aux = d.head0(x)[:, 0].float()
        skips = [p(r.to(self.dtype)) for p, r in zip(d.decoder_guidance_projection, (res4, res3, res2))]
        return (corr, x, aux, *skips)


class _DecoderLayer(nn.Module):
    """Cost-guidance projection + decoder layer i on the surviving classes; aux head i+1 unless last."""

    def __init__(self, model: SedModel, index: int) -> None:
        super().__init__()
        d = model.transformer
        self.proj = d.decoder_corr_guidance_projection[index]
        self.layer = (d.decoder1, d.decoder2, d.decoder3)[index]
        self.aux = (d.head1, d.head2, None)[index]
        self.head = d.head if index == 2 else None

    def forward(self, x, cg, skip):  # type: ignore[no-untyped-def]
        g = self.proj(cg)
        x = self.layer(x, skip, g)
        if self.head is not None:
            return torch.sigmoid(self.head(x)[:, 0].float())
        return x, g, self.aux(x)[:, 0].float()


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    fuse_layernorm_casts(model)  # fp16 graphs: norms in fp16 with an fp32 stash instead of Cast pairs
    return model


def _inline(graph: SubGraph, model: onnx.ModelProto, prefix: str, feeds: dict[str, str]) -> dict[str, str]:
    """Splice `model` into `graph` under `prefix`; `feeds` maps its inputs to existing tensor names.

    Returns the prefixed names of its outputs.
    """
    model = onnx.compose.add_prefix(model, prefix=f"{prefix}/")
    del model.graph.value_info[:]  # segment-local shape names would clash; shapes are re-inferred
    for inp in model.graph.input:
        original = inp.name.removeprefix(f"{prefix}/")
        graph.node("Identity", [feeds[original]], [inp.name], f"{prefix}/feed_{original}")
    graph.nodes.extend(model.graph.node)
    graph.initializers.extend(model.graph.initializer)
    return {o.name.removeprefix(f"{prefix}/"): o.name for o in model.graph.output}


def _value_info(name: str, elem: int, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


@dataclass
class DecoderParts:
    """The decoder exported as its four torch segments (the pieces both decoder layouts are made of)."""

    pre: onnx.ModelProto  # (dense, text, res4, res3, res2) -> (corr, x, aux, skip0, skip1, skip2), N dynamic
    layers: list[onnx.ModelProto]  # (x, cg, skip) -> (x_out, g_out, aux_out) | (probs,), M dynamic
    embed_dim: int
    num_templates: int
    feature_shapes: dict[str, list[int]]


def export_decoder_parts(model: SedModel, precision: str = "fp32") -> DecoderParts:
    """Trace the pre-rejection segment and the three layers once, on 3 classes with the class axis dynamic."""
    dtype = _compute_dtype(precision)
    m = _with_precision(model, precision)
    cfg = model.config
    e, p = cfg.embed_dim, len(model.templates)
    with torch.inference_mode():
        feats = model.encode_image(torch.zeros(1, 3, cfg.sed.input_size, cfg.sed.input_size))
    n = 3
    text = torch.nn.functional.normalize(torch.randn(n, p, e), dim=-1)
    fp32 = [feats.dense, text, feats.res4, feats.res3, feats.res2]
    pre = _export(
        _PreRejection(m, dtype),
        tuple(fp32),
        list(PRE_INPUTS),
        list(PRE_OUTPUTS),
        {"text": {0: "N"}, "corr": {0: "N"}, "x": {0: "N"}, "aux": {0: "N"}},
    )
    with torch.inference_mode():
        corr, x, _, *skips = _PreRejection(m, dtype)(*fp32)
    layer_specs = []
    cg = corr
    for i in range(3):
        layer = _DecoderLayer(m, i)
        outs = list(LAST_OUTPUTS if i == 2 else LAYER_OUTPUTS)
        dyn = {"x": {0: "M"}, "cg": {0: "M"}, **{o: {0: "M"} for o in outs}}
        layer_specs.append(_export(layer, (x.clone(), cg.clone(), skips[i].clone()), ["x", "cg", "skip"], outs, dyn))
        if i < 2:
            with torch.inference_mode():
                x, cg, _ = layer(x, cg, skips[i])
    shapes = {name: list(getattr(feats, name).shape) for name in ("dense", "res4", "res3", "res2")}
    return DecoderParts(pre, layer_specs, e, p, shapes)


def _finish(g: SubGraph, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
            like: onnx.ModelProto) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sed-deploy")
    out.ir_version = like.ir_version
    return out


def build_decoder_segments(
    model: SedModel, precision: str = "fp32", parts: DecoderParts | None = None
) -> dict[str, onnx.ModelProto]:
    """The decoder split at the CER points (`sed_runtime.split_decoder`): decoder_pre, decoder1..3.

    Each layer segment takes every row of the previous segment's x and cost guidance plus the kept row
    indices, and gathers the survivors itself; the top-k union runs between segments, outside the graphs.
    `parts`: an earlier `export_decoder_parts(model, precision)`, to trace once for both layouts.
    """
    parts = parts or export_decoder_parts(model, precision)
    pre = onnx.ModelProto()
    pre.CopyFrom(parts.pre)
    pre.graph.name = PRE
    segments = {PRE: pre}
    for name, layer in zip(LAYERS, parts.layers):
        g = SubGraph()
        g.nodes.append(gather_rows("x", "keep", "kept_x", "GatherX"))
        g.nodes.append(gather_rows("cg", "keep", "kept_cg", "GatherGuidance"))
        outs = _inline(g, layer, name, {"x": "kept_x", "cg": "kept_cg", "skip": "skip"})
        for o in outs:
            g.node("Identity", [outs[o]], [o], f"Output_{o}")
        inputs = [copy.deepcopy(v) for v in layer.graph.input]
        inputs.append(_value_info("keep", TensorProto.INT64, ["K"]))
        outputs = [copy.deepcopy(v) for v in layer.graph.output]
        for v in outputs:
            v.type.tensor_type.shape.dim[0].dim_param = "K"
        segments[name] = _finish(g, name, inputs, outputs, layer)
    return segments


def build_decoder_graph(
    model: SedModel, precision: str = "fp32", parts: DecoderParts | None = None
) -> onnx.ModelProto:
    """One ONNX graph: (dense, text, res4, res3, res2, k) -> (scores, kept0, kept1, kept2, probs).

    `scores` is the documented N x h x w block (0 for rejected classes); `probs` the K2 x h x w rows of the last
    survivors `kept2` alone, which backends fetch instead: the block is still computed inside the graph (ONNX
    Runtime runs every node whatever the fetches), but it is not copied out (TensorRT: not off the device).
    """
    parts = parts or export_decoder_parts(model, precision)
    pre, layer_specs, e, p = parts.pre, parts.layers, parts.embed_dim, parts.num_templates
    cfg = model.config

    g = SubGraph()
    pre_out = _inline(g, pre, "pre", {k: k for k in PRE_INPUTS})
    g.node("Shape", ["text"], ["num_classes"], "NumClasses", start=0, end=1)
    g.node("Squeeze", ["num_classes"], ["num_classes_s"], "ScalarN")
    g.node(
        "Range",
        [g.const("i64_0", np.array(0, np.int64)), "num_classes_s", g.const("i64_1", np.array(1, np.int64))],
        ["alive_init"],
        "AllClasses",
    )
    x_name, cg_name, aux_name, alive = pre_out["x"], pre_out["corr"], pre_out["aux"], "alive_init"
    for i in range(3):
        g.extend(topk_union_graph(aux_name, "k", f"keep{i}", prefix=f"cer{i}"))
        g.nodes.append(gather_rows(x_name, f"keep{i}", f"cer{i}/x", f"cer{i}/GatherX"))
        g.nodes.append(gather_rows(cg_name, f"keep{i}", f"cer{i}/cg", f"cer{i}/GatherGuidance"))
        g.nodes.append(gather_rows(alive, f"keep{i}", f"kept{i}", f"cer{i}/GatherAlive"))
        outs = _inline(
            g, layer_specs[i], f"decoder{i + 1}", {"x": f"cer{i}/x", "cg": f"cer{i}/cg", "skip": pre_out[f"skip{i}"]}
        )
        if i < 2:
            x_name, cg_name, aux_name, alive = outs["x_out"], outs["g_out"], outs["aux_out"], f"kept{i}"
    probs = outs["probs"]
    # Rejected classes score exactly 0: scatter the survivors' probabilities into zeros (N, h, w).
    g.node("Shape", [probs], ["probs_hw"], "ProbsHW", start=1)
    g.node("Concat", ["num_classes", "probs_hw"], ["scores_shape"], "ScoresShape", axis=0)
    g.node(
        "ConstantOfShape",
        ["scores_shape"],
        ["scores_zero"],
        "ScoresZero",
        value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
    )
    g.node("Unsqueeze", ["kept2", g.const("axis_1", np.array([1], np.int64))], ["kept2_col"], "KeptColumn")
    g.node("ScatterND", ["scores_zero", "kept2_col", probs], ["scores"], "ScatterSurvivors")
    g.node("Identity", [probs], ["probs"], "KeptProbabilities")

    s = cfg.sed.input_size
    inputs = [
        _value_info("dense", TensorProto.FLOAT, [1, e, s // 32, s // 32]),
        _value_info("text", TensorProto.FLOAT, ["N", p, e]),
        _value_info("res4", TensorProto.FLOAT, parts.feature_shapes["res4"]),
        _value_info("res3", TensorProto.FLOAT, parts.feature_shapes["res3"]),
        _value_info("res2", TensorProto.FLOAT, parts.feature_shapes["res2"]),
        _value_info("k", TensorProto.INT64, [1]),
    ]
    h = s // 4
    outputs = [
        _value_info("scores", TensorProto.FLOAT, ["N", h, h]),
        _value_info("kept0", TensorProto.INT64, ["K0"]),
        _value_info("kept1", TensorProto.INT64, ["K1"]),
        _value_info("kept2", TensorProto.INT64, ["K2"]),
        _value_info("probs", TensorProto.FLOAT, ["K2", h, h]),
    ]
    return _finish(g, "sed_decoder", inputs, outputs, pre)


def build_encoder_graph(model: SedModel, precision: str = "fp32") -> onnx.ModelProto:
    """(image 1x3xSxS) -> (dense, res4, res3, res2), fixed shapes."""
    dtype = _compute_dtype(precision)
    s = model.config.sed.input_size
    return _export(
        _Encoder(_with_precision(model, precision), dtype),
        (torch.zeros(1, 3, s, s),),
        ENCODER_INPUTS,
        ENCODER_OUTPUTS,
        {},
    )


def check_graph(model: onnx.ModelProto) -> None:
    """Full ONNX check with strict shape inference (raises on any problem)."""
    onnx.checker.check_model(model, full_check=True)


def save_graph(model: onnx.ModelProto, path: str | Path) -> None:
    """Check, then write to a temporary name and rename (weights inline: graphs stay below 2 GB)."""
    check_graph(model)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)
