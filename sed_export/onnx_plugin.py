"""The plugin-node variant of decoder.onnx: each standard-op CER subgraph becomes one TensorRT plugin node.

TensorRT's ONNX parser maps a node of unknown op type to a registered plugin creator by name = op_type,
version = attribute `plugin_version`, namespace = attribute `plugin_namespace` (since 10.10 also the node
domain), so all three strings below match `kernels/plugin/topk_union_plugin.cpp`. Other attributes whose
names the creator lists are passed as plugin fields (INT -> kINT32).

The node: TopkUnion(scores float32|float16 (M, H, W) or (M, P), k int64 (1,)) -> (keep int64 (K,),
count int64 ()), `count` being the plugin's size tensor (K = count, data dependent, upper bound M). k stays
an ordinary runtime input read on the device: no shape-tensor input, so `k` needs no `set_shape_input` in the
engine's profile once every CER point is a plugin. ONNX Runtime cannot run the node (unknown domain): the
standard-op graph stays the CPU / calibration twin and is never modified by this rewrite.
"""

from __future__ import annotations

import copy

import onnx
from onnx import NodeProto, helper

PLUGIN_NAME = "TopkUnion"  # op_type == IPluginCreatorV3One::getPluginName()
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "sed"  # node domain, attribute plugin_namespace and creator namespace: one string
PLUGIN_DOMAIN = PLUGIN_NAMESPACE
PLUGIN_OPSET = 1
DEFAULT_OPT_KEPT = 64  # TensorRT tuning value for the kept count (PERF notes: ~47-81 survivors at k = 8)
DEFAULT_MAX_CLASSES = 1024  # the plugin's row bound (sizes its workspace); the builder passes the profile's max N

# Node-name suffixes of one `onnx_cer.topk_union_graph` instance (name = f"{prefix}/{suffix}").
_FINAL = "Compact"
_SCORES_READER = "Flatten"
_K_READER = "ClampK"


def plugin_node(scores: str, k: str, keep: str, count: str, name: str, opt_kept: int = DEFAULT_OPT_KEPT,
                max_classes: int = DEFAULT_MAX_CLASSES) -> NodeProto:
    """One TopkUnion node with the attributes TensorRT's plugin fallback importer reads (the plugin's fields)."""
    return helper.make_node(
        PLUGIN_NAME,
        [scores, k],
        [keep, count],
        name=name,
        domain=PLUGIN_DOMAIN,
        plugin_version=PLUGIN_VERSION,
        plugin_namespace=PLUGIN_NAMESPACE,
        opt_kept=int(opt_kept),
        max_classes=int(max_classes),
    )


def _cer_prefixes(graph: onnx.GraphProto) -> list[str]:
    return [n.name.rsplit("/", 1)[0] for n in graph.node if n.op_type == "Slice" and n.name.endswith(f"/{_FINAL}")]


def replace_cer_with_plugin(model: onnx.ModelProto, opt_kept: int = DEFAULT_OPT_KEPT,
                            max_classes: int = DEFAULT_MAX_CLASSES) -> onnx.ModelProto:
    """A copy of `model` where every top-k-union subgraph is one TopkUnion plugin node; `model` is untouched.

    The subgraph is found from its final Slice (`<prefix>/Compact`, producing the kept indices) by walking
    producers back to the two tensors it reads (`scores` at `<prefix>/Flatten`, `k` at `<prefix>/ClampK`).
    Raises ValueError if none is found, or if a tensor inside a subgraph is used outside it (then the
    rewrite would cut a live edge). Downstream Gathers keep reading the same `keep` tensor name and dtype.
    """
    if opt_kept < 1:
        raise ValueError(f"opt_kept must be >= 1, got {opt_kept}")
    out = copy.deepcopy(model)
    g = out.graph
    prefixes = _cer_prefixes(g)
    if not prefixes:
        raise ValueError("no top-k-union subgraph (a Slice node named '<prefix>/Compact') in this graph")
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    by_name = {n.name: n for n in g.node}
    replacements: dict[int, NodeProto] = {}
    removed: set[int] = set()
    for prefix in prefixes:
        try:
            final = by_name[f"{prefix}/{_FINAL}"]
            scores = by_name[f"{prefix}/{_SCORES_READER}"].input[0]
            k = by_name[f"{prefix}/{_K_READER}"].input[0]
        except KeyError as exc:
            raise ValueError(f"subgraph {prefix!r} lacks node {exc.args[0]!r}: not an onnx_cer top-k union") from exc
        keep = final.output[0]
        members: set[int] = set()
        stack = [keep]
        while stack:
            tensor = stack.pop()
            if tensor in (scores, k) or tensor not in producer:
                continue  # boundary tensor, graph input or initializer
            i = producer[tensor]
            if i in members:
                continue
            if not g.node[i].name.startswith(f"{prefix}/"):
                raise ValueError(f"subgraph {prefix!r} reaches node {g.node[i].name!r} outside it")
            members.add(i)
            stack.extend(t for t in g.node[i].input if t)
        internal = {o for i in members for o in g.node[i].output} - {keep}
        for j, n in enumerate(g.node):
            if j not in members and internal.intersection(n.input):
                raise ValueError(f"node {n.name!r} reads tensors inside subgraph {prefix!r}")
        if internal.intersection(o.name for o in g.output):
            raise ValueError(f"a graph output is inside subgraph {prefix!r}")
        node = plugin_node(scores, k, keep, f"{prefix}/kept_count", f"{prefix}/{PLUGIN_NAME}", opt_kept,
                           max_classes)
        replacements[max(members)] = node  # where `keep` was produced: topological order is preserved
        removed |= members
    new_nodes = []
    for i, n in enumerate(g.node):
        if i in replacements:
            new_nodes.append(replacements[i])
        elif i not in removed:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    kept_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    live = {t for n in g.node for t in n.output} | {i.name for i in g.input}
    kept_vi = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    if not any(o.domain == PLUGIN_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, PLUGIN_OPSET))
    return out


def plugin_nodes(model: onnx.ModelProto) -> list[NodeProto]:
    """The TopkUnion plugin nodes of a graph (for checks and manifests)."""
    return [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN and n.op_type == PLUGIN_NAME]


def check_plugin_graph(model: onnx.ModelProto) -> None:
    """onnx.checker with full_check on the plugin variant.

    Passes (onnx 1.23): strict shape inference skips nodes of a domain it has no schema for, so the plugin
    node's outputs and what reads them get no inferred shape; TensorRT computes those from the plugin.
    """
    onnx.checker.check_model(model, full_check=True)
