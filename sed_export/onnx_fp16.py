"""fp16 graph rewrite: LayerNormalization in fp16 with an fp32 stash, in place of Cast pairs around an fp32 norm.

The fp16 export keeps every norm in fp32 (`onnx_export._with_precision` casts its input up and its output down),
so each LayerNorm costs two Casts over the whole activation and runs as an fp32 kernel. LayerNormalization
(opset 17+) computes its mean and variance in the `stash_type` precision whatever its input type: with
stash_type = 1 (fp32) and fp16 input, scale and bias, the statistics stay fp32 (no overflow of the variance, the
known fp16 LayerNorm failure) and TensorRT runs its fused normalisation layer in fp16 without the Casts. Scale
and bias are rounded to fp16 and applied in fp16: about one fp16 ulp from the Cast-pair version.

The pattern, as torch exports it: Cast(to fp32) -> [layout ops] -> LayerNormalization -> [layout ops] ->
Cast(to fp16), where the layout ops (Transpose, Reshape, Identity; timm's LayerNorm2d permutes around the
norm) have a single consumer. Only norms whose input really is fp16 (shape inference) and whose scale and bias
are constants are rewritten; everything else is left as exported.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze")


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def fuse_layernorm_casts(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place (see the module docstring); returns how many LayerNormalization nodes now run in
    fp16 with an fp32 stash."""
    graph = model.graph
    if not any(n.op_type == "Cast" and _attr(n, "to", 0) == TensorProto.FLOAT16 for n in graph.node):
        return 0  # an fp32 graph: nothing to do, and no shape inference over its weights
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph shape inference cannot read is left as it is
        return 0
    types = {v.name: v.type.tensor_type.elem_type for v in
             (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        """The value behind `name`: an initializer, a Constant node, or either through Identity nodes."""
        while name not in inits:
            node = producer.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
            if node.op_type != "Identity":
                return None
            name = node.input[0]
        return numpy_helper.to_array(inits[name])

    def single_consumer(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    removed: list[onnx.NodeProto] = []
    fp16_consts: dict[str, str] = {}
    stale: set[str] = set()
    count = 0
    for ln in [n for n in graph.node if n.op_type == "LayerNormalization"]:
        if len(ln.output) != 1 or len(ln.input) < 2:
            continue
        # up: the Cast to fp32 that feeds the norm through layout ops, each used once
        path_up, name = [], ln.input[0]
        node = producer.get(name)
        while node is not None and node.op_type in LAYOUT_OPS and single_consumer(name) is not None:
            path_up.append(node)
            name = node.input[0]
            node = producer.get(name)
        if node is None or node.op_type != "Cast" or _attr(node, "to", 0) != TensorProto.FLOAT:
            continue
        if single_consumer(name) is None or types.get(node.input[0]) != TensorProto.FLOAT16:
            continue
        cast_in = node
        # down: the Cast to fp16 the norm's output reaches through layout ops, each the only consumer
        path_down, name = [], ln.output[0]
        user = single_consumer(name)
        while user is not None and user.op_type in LAYOUT_OPS:
            path_down.append(user)
            name = user.output[0]
            user = single_consumer(name)
        if user is None or user.op_type != "Cast" or _attr(user, "to", 0) != TensorProto.FLOAT16:
            continue
        cast_out = user
        params = [constant(x) if x else None for x in ln.input[1:3]]
        if params[0] is None or (len(ln.input) > 2 and ln.input[2] and params[1] is None):
            continue
        new_inputs = []
        for src, value in zip(ln.input[1:3], params):
            if value is None:
                new_inputs.append(src)
                continue
            if src not in fp16_consts:
                fp16_consts[src] = f"{src}__fp16"
                graph.initializer.append(numpy_helper.from_array(value.astype(np.float16), fp16_consts[src]))
            new_inputs.append(fp16_consts[src])
        # rewire: the first op after the input Cast reads its fp16 source, the last op before the output Cast
        # writes the Cast's output name
        first = path_up[-1] if path_up else ln
        first.input[0] = cast_in.input[0]
        last = path_down[-1] if path_down else ln
        stale.update(o for n in (*path_up, ln, *path_down) for o in n.output)
        last.output[0] = cast_out.output[0]
        del ln.input[1:]
        ln.input.extend(new_inputs)
        kept = [a for a in ln.attribute if a.name != "stash_type"]
        del ln.attribute[:]
        ln.attribute.extend([*kept, helper.make_attribute("stash_type", 1)])
        removed += [cast_in, cast_out]
        count += 1
    if not count:
        return 0
    gone = {id(n) for n in removed}
    kept_nodes = [n for n in graph.node if id(n) not in gone]
    # the fp32 scale and bias (and Identity or Constant nodes that only fed them) are unused now: drop them, so
    # runtimes do not warn about dead initializers (not in graphs with subgraphs, which may read outer names)
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for n in kept_nodes for a in n.attribute)
    candidates = [] if has_subgraphs else list(fp16_consts)
    dropped: set[str] = set()
    while candidates:
        name = candidates.pop()
        if name in outputs or any(name in n.input for n in kept_nodes):
            continue
        node = producer.get(name)
        if node is not None and node.op_type in ("Identity", "Constant") and id(node) not in gone:
            gone.add(id(node))
            kept_nodes = [n for n in kept_nodes if n is not node]
            candidates.extend(node.input)
        elif name in inits:
            dropped.add(name)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    inits_left = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(inits_left)
    # the rewired tensors are fp16 now: drop what the export recorded about them
    vi = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(vi)
    return count
