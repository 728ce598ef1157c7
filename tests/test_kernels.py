"""Top-k-union kernel, its ranking rule, the plugin-node ONNX variant and the plugin build.

What runs where: the ranking rule, the ONNX rewrite and the nvcc compile run on any machine with the tools;
the CMake plugin build needs TensorRT headers; the kernel itself (through the torch op) needs a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from needs import need

torch = need("torch")
onnx = need("onnx")
ort = need("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402
from planted import decoder_feed  # noqa: E402

from sed_export.cer import topk_union  # noqa: E402
from sed_export.onnx_cer import topk_union_graph  # noqa: E402
from sed_runtime.topk_union_rule import order_keys, topk_union_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
ARCHS = ("80", "86", "90")


# ---------------------------------------------------------------------------------------------- helpers


def _torch_reference(x: np.ndarray, k: int) -> np.ndarray:
    return topk_union(torch.from_numpy(np.ascontiguousarray(x)), k).numpy()


def _sorted_desc(x: np.ndarray) -> np.ndarray:
    """Per-pixel values sorted descending, NaN first (torch.topk's order of values)."""
    f = x.reshape(x.shape[0], -1).astype(np.float64)
    f = np.where(np.isnan(f), np.inf, f)  # NaN above every number; +inf and NaN never both occur below
    return -np.sort(-f, axis=0)


def _boundary_tie(x: np.ndarray, k: int) -> bool:
    """True when some pixel has equal values at ranks k and k+1: torch.topk may then pick either class."""
    c = x.shape[0]
    if k >= c:
        return False
    flat = x.reshape(c, -1).astype(np.float64)
    if np.isnan(flat).any() and np.isinf(flat).any():
        raise AssertionError("test inputs must not mix NaN and +inf (the helper folds them)")
    s = _sorted_desc(x)
    return bool(np.any(s[k - 1] == s[k]))


def _is_valid_union(kept: np.ndarray, x: np.ndarray, k: int) -> bool:
    """kept contains every class strictly above some pixel's k-th value, and only classes at or above one."""
    c = x.shape[0]
    if k >= c:
        return kept.tolist() == list(range(c))
    f = x.reshape(c, -1).astype(np.float64)
    f = np.where(np.isnan(f), np.inf, f)
    kth = _sorted_desc(x)[k - 1]
    must = np.flatnonzero((f > kth).any(axis=1))
    may = np.flatnonzero((f >= kth).any(axis=1))
    return set(must) <= set(kept.tolist()) <= set(may) and np.all(np.diff(kept) > 0)


@pytest.fixture(scope="module")
def cer_session() -> ort.InferenceSession:
    """The decoder's standard-op CER subgraph alone: ONNX TopK breaks ties by lower index, like our rule."""
    sub = topk_union_graph("scores", "k", "keep", prefix="cer")
    graph = helper.make_graph(
        sub.nodes,
        "cer",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["M", "P"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("keep", TensorProto.INT64, ["K"])],
        sub.initializers,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _ort_union(sess: ort.InferenceSession, x: np.ndarray, k: int) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1).astype(np.float32)
    (keep,) = sess.run(None, {"scores": flat, "k": np.array([k], np.int64)})
    return keep


def _random_cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(0)
    cases: list[tuple[str, np.ndarray, int]] = []
    for c, p, k in [(1, 1, 1), (1, 9, 1), (1, 9, 5), (5, 1, 1), (5, 1, 2), (7, 3, 6), (7, 3, 7), (7, 3, 70),
                    (50, 64, 1), (50, 64, 3), (50, 64, 8), (171, 100, 8), (847, 36, 8), (847, 16, 32),
                    (847, 16, 33), (300, 20, 100), (64, 40, 63)]:
        cases.append((f"randn-c{c}-p{p}-k{k}", rng.standard_normal((c, p)).astype(np.float32), k))
    cases.append(("hw-shaped", rng.standard_normal((40, 6, 7)).astype(np.float32), 4))
    return cases


def _adversarial_cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(1)
    cases: list[tuple[str, np.ndarray, int]] = []
    for c, p, k in [(1, 1, 1), (10, 1, 3), (100, 4, 3), (847, 8, 8), (2000, 2, 5), (64, 3, 40)]:
        cases.append((f"all-equal-c{c}-k{k}", np.zeros((c, p), np.float32), k))
    few = rng.integers(0, 3, size=(60, 50)).astype(np.float32)  # many ties everywhere
    cases += [("three-levels-k1", few, 1), ("three-levels-k4", few, 4), ("three-levels-k40", few, 40)]
    zeros = np.zeros((6, 4), np.float32)
    zeros[::2] = -0.0
    cases.append(("signed-zeros", zeros, 2))
    nan = rng.standard_normal((20, 12)).astype(np.float32)
    nan[[3, 7, 11], :] = np.nan
    cases += [("nan-rows-k2", nan, 2), ("nan-rows-k3", nan, 3), ("nan-rows-k5", nan, 5)]
    inf = rng.standard_normal((20, 12)).astype(np.float32)
    inf[[2, 9], ::2] = np.inf
    inf[[4, 5], 1::2] = -np.inf
    cases += [("infs-k1", inf, 1), ("infs-k2", inf, 2), ("infs-k19", inf, 19)]
    big = rng.standard_normal((847, 24)).astype(np.float32)
    big[100:110] = big[0]  # ten exact copies of class 0's row
    cases += [("copied-rows-k1", big, 1), ("copied-rows-k8", big, 8)]
    for k in (1, 2, 8):
        cases.append((f"fp16-randn-k{k}", rng.standard_normal((847, 64)).astype(np.float16), k))
    cases.append(("fp16-coarse", (rng.integers(-4, 4, size=(200, 30)) / 4).astype(np.float16), 3))
    cases.append(("fp16-k-ge-c", rng.standard_normal((5, 7)).astype(np.float16), 5))
    return cases


# ---------------------------------------------------------------------------------------- (a) nvcc


def test_kernel_compiles_for_sm80_sm86_sm90_without_warnings(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    procs = {}
    for arch in ARCHS:  # in parallel: each arch compiles the same templates
        cmd = [nvcc, "-std=c++17", "-c", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
               "-gencode", f"arch=compute_{arch},code=sm_{arch}", str(KERNELS / "topk_union.cu"),
               "-o", str(tmp_path / f"topk_union_sm{arch}.o")]
        procs[arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = {}
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0 or out.strip():
            failures[arch] = out
    assert not failures, failures
    assert all((tmp_path / f"topk_union_sm{a}.o").stat().st_size > 0 for a in ARCHS)


def test_kernel_sources_include_no_tensorrt_header():
    for path in (KERNELS / "topk_union.cu", KERNELS / "topk_union.h"):
        text = path.read_text()
        assert "NvInfer" not in text and "NvOnnx" not in text, path


# ------------------------------------------------------------------------------------- (b) the rule


@pytest.mark.parametrize("name,x,k", _random_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_rule_equals_torch_reference_without_ties(name, x, k):
    assert not _boundary_tie(x, k), name  # continuous random data: ties have probability 0
    got = topk_union_reference(x, k)
    assert got.dtype == np.int64
    assert got.tolist() == _torch_reference(x, k).tolist()


@pytest.mark.parametrize("name,x,k", _adversarial_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_rule_on_adversarial_inputs(name, x, k, cer_session):
    got = topk_union_reference(x, k)
    ref = _torch_reference(x, k)
    if _boundary_tie(x, k):
        # torch.topk picks some of the tied classes (on the CPU not the lowest indices: a partial sort), so
        # only the certain part of the kept set is defined; both must be valid unions.
        assert _is_valid_union(ref, x, k) and _is_valid_union(got, x, k), name
    else:
        assert got.tolist() == ref.tolist(), name
    # The ONNX twin (ONNX TopK: lower index first on ties) follows the rule exactly, ties included.
    assert got.tolist() == _ort_union(cer_session, x, k).tolist(), name


def test_rule_breaks_ties_by_lower_class_index():
    assert topk_union_reference(np.zeros((100, 1), np.float32), 3).tolist() == [0, 1, 2]
    x = np.array([[1.0], [3.0], [3.0], [3.0], [0.0]], np.float32)
    assert topk_union_reference(x, 2).tolist() == [1, 2]
    signed = np.array([[-0.0], [0.0]], np.float32)
    assert topk_union_reference(signed, 1).tolist() == [0]
    assert topk_union_reference(signed[::-1].copy(), 1).tolist() == [0]


def test_rule_ranks_nan_above_inf():
    x = np.array([[1.0], [np.inf], [np.nan], [5.0], [np.nan]], np.float32)
    assert topk_union_reference(x, 1).tolist() == [2]
    assert topk_union_reference(x, 2).tolist() == [2, 4]
    assert topk_union_reference(x, 3).tolist() == [1, 2, 4]
    assert topk_union_reference(x, 2).tolist() == _torch_reference(x, 2).tolist()


def test_rule_edge_k():
    x = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    assert topk_union_reference(x, 6).tolist() == list(range(6))
    assert topk_union_reference(x, 10**6).tolist() == list(range(6))
    assert topk_union_reference(x, 0).tolist() == []
    assert topk_union_reference(np.zeros((4, 0), np.float32), 2).tolist() == []
    assert topk_union_reference(np.zeros((4, 0), np.float32), 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        topk_union_reference(np.zeros(4, np.float32), 1)


def test_threshold_path_equals_the_key_path():
    """topk_union_reference takes a float-threshold shortcut without NaNs; it must keep exactly what keys keep."""
    rng = np.random.default_rng(3)

    def by_keys(x: np.ndarray, k: int) -> list[int]:
        keys = order_keys(x)
        kth = np.partition(keys, x.shape[0] - k, axis=0)[x.shape[0] - k]
        return np.flatnonzero((keys >= kth[None]).any(axis=1)).tolist()

    for trial in range(1500):
        c, p = int(rng.integers(2, 40)), int(rng.integers(1, 30))
        k = int(rng.integers(1, c))
        x = [rng.standard_normal((c, p)),
             rng.integers(-2, 3, (c, p)),  # ties everywhere
             np.where(rng.random((c, p)) < 0.5, -0.0, 0.0),  # signed zeros only
             rng.choice(np.array([np.inf, -np.inf, 0.0, 1.0]), (c, p))][trial % 4].astype(np.float32)
        assert topk_union_reference(x, k).tolist() == by_keys(x, k), (trial, c, p, k)


def test_order_keys_are_the_rule_as_one_integer_compare():
    rng = np.random.default_rng(5)
    vals = np.array([np.nan, np.inf, 3.0, 0.0, -0.0, -1e-30, -np.inf, 3.0, np.nan], np.float32)
    x = rng.permutation(np.concatenate([vals, rng.standard_normal(30).astype(np.float32)]))[:, None]
    keys = order_keys(x)[:, 0]
    assert len(set(keys.tolist())) == len(keys)  # a total order
    by_key = sorted(range(len(keys)), key=lambda i: -int(keys[i]))
    v = x[:, 0].astype(np.float64)
    by_rule = sorted(range(len(v)), key=lambda i: (0 if np.isnan(v[i]) else 1, 0.0 if np.isnan(v[i]) else -v[i], i))
    assert by_key == by_rule


# ------------------------------------------------------------------- kernel algorithm, modelled on the CPU

_SENTINEL, _EMPTY = 2**64 - 1, 0


def _insert(lst: list[int], x: int) -> None:
    """kernels/topk_union.cu `insert`, statement for statement."""
    cap = len(lst)
    if x <= lst[cap - 1]:
        return
    for j in range(cap - 1, 0, -1):
        prev = lst[j - 1]
        lst[j] = prev if prev < x else (x if lst[j] < x else lst[j])
    lst[0] = x if lst[0] < x else lst[0]


def _kernel_model(x: np.ndarray, k: int, slices: int = 8) -> list[int]:
    """The kernel's three steps in plain Python (same keys, sentinel padding, 8-slice tree merge, binary
    search fallback, ordered compaction): checks the algorithm, not the CUDA code, where no GPU is lent."""
    keys = order_keys(x)
    c_num, p_num = keys.shape
    if k <= 0:
        return []
    if k >= c_num:
        return list(range(c_num))
    flags = [0] * c_num
    for p in range(p_num):
        col = [int(v) for v in keys[:, p]]
        if k <= 32:
            cap = next(c for c in (1, 2, 4, 8, 16, 32) if k <= c)
            lists = [[_SENTINEL] * (cap - k) + [_EMPTY] * k for _ in range(slices)]
            for s in range(slices):
                for c in range(s, c_num, slices):
                    _insert(lists[s], col[c])
            half = slices // 2
            while half >= 1:
                for s in range(half):
                    for v in lists[s + half]:
                        if v != _SENTINEL:
                            _insert(lists[s], v)
                half //= 2
            for v in lists[0]:
                if v not in (_SENTINEL, _EMPTY):
                    flags[0x7FFFFFFF - (v & 0xFFFFFFFF)] = 1
        else:
            lo, hi = 0, 2**64 - 1
            while lo < hi:
                mid = lo + (hi - lo) // 2 + 1
                if sum(v >= mid for v in col) >= k:
                    lo = mid
                else:
                    hi = mid - 1
            for c, v in enumerate(col):
                if v >= lo:
                    flags[c] = 1
    return [c for c in range(c_num) if flags[c]]


@pytest.mark.parametrize(
    "name,x,k",
    [c for c in _random_cases() + _adversarial_cases() if c[1].size <= 40_000],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_kernel_algorithm_model_equals_the_rule(name, x, k):
    assert _kernel_model(x, k) == topk_union_reference(x, k).tolist(), name


# ------------------------------------------------------------------------------ (c) plugin-node ONNX


@pytest.fixture(scope="module")
def tiny_model():
    from sed_export.config import load_model_config
    from sed_export.model import build_model

    m = build_model(load_model_config("sed-tiny"), seed=9)
    with torch.no_grad():  # as in test_onnx: lets later CER points reject classes too
        m.transformer.head1.bias.zero_()
        m.transformer.head2.bias.zero_()
    return m


@pytest.fixture(scope="module")
def decoder_graphs(tiny_model):
    from sed_export.onnx_export import build_decoder_graph

    return {p: build_decoder_graph(tiny_model, p) for p in ("fp32", "fp16")}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plugin_variant_has_one_node_per_cer_point(decoder_graphs, precision):
    from sed_export import onnx_plugin as op

    std = decoder_graphs[precision]
    before = std.SerializeToString()
    plug = op.replace_cer_with_plugin(std)
    assert std.SerializeToString() == before  # the standard-op twin is not modified
    op.check_plugin_graph(plug)

    nodes = op.plugin_nodes(plug)
    assert [n.name for n in nodes] == ["cer0/TopkUnion", "cer1/TopkUnion", "cer2/TopkUnion"]
    for i, n in enumerate(nodes):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert n.domain == "sed" and n.op_type == "TopkUnion"
        assert attrs == {"plugin_version": b"1", "plugin_namespace": b"sed", "opt_kept": 64, "max_classes": 1024}
        assert list(n.input)[1] == "k" and list(n.output) == [f"keep{i}", f"cer{i}/kept_count"]
    assert any(o.domain == "sed" and o.version == 1 for o in plug.opset_import)

    # Nothing of the standard-op CER is left; the row gathers and everything else are.
    cer_ops = {n.op_type for n in plug.graph.node if n.name.startswith("cer")}
    assert cer_ops == {"TopkUnion", "Gather"}
    assert not [n for n in plug.graph.node if n.op_type in ("TopK", "ScatterElements") and n.name.startswith("cer")]
    others = [n for n in std.graph.node if not n.name.startswith("cer") or n.op_type == "Gather"]
    assert [n.SerializeToString() for n in others] == [
        n.SerializeToString() for n in plug.graph.node if n.op_type != "TopkUnion"
    ]
    assert std.graph.input == plug.graph.input and std.graph.output == plug.graph.output
    # Each keep tensor still feeds the same three gathers.
    for i in range(3):
        readers = sorted(n.name for n in plug.graph.node if f"keep{i}" in n.input)
        assert readers == [f"cer{i}/GatherAlive", f"cer{i}/GatherGuidance", f"cer{i}/GatherX"]
    # Inputs of a plugin node: the aux logits of the preceding segment (fp32 in both precisions) and k.
    producers = {o: n for n in plug.graph.node for o in n.output}
    assert all(n.input[0] in producers for n in nodes)


def test_plugin_rewrite_refuses_graphs_without_cer():
    from sed_export.onnx_plugin import replace_cer_with_plugin

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ValueError, match="no top-k-union subgraph"):
        replace_cer_with_plugin(helper.make_model(g))


def test_plugin_rewrite_refuses_a_live_internal_edge():
    from sed_export.onnx_plugin import replace_cer_with_plugin

    sub = topk_union_graph("scores", "k", "keep", prefix="cer")
    leak = helper.make_node("Identity", ["cer/mask"], ["leak"], name="outside")
    graph = helper.make_graph(
        [*sub.nodes, leak],
        "cer",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["M", "P"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("keep", TensorProto.INT64, ["K"]),
            helper.make_tensor_value_info("leak", TensorProto.FLOAT, ["M"]),
        ],
        sub.initializers,
    )
    with pytest.raises(ValueError, match="reads tensors inside"):
        replace_cer_with_plugin(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_standard_op_twin_still_matches_the_reference_after_rewrite(tiny_model, decoder_graphs):
    """The rewrite leaves the ONNX Runtime graph as it was: same kept sets as torch, same scores."""
    from sed_export.onnx_plugin import replace_cer_with_plugin

    std = decoder_graphs["fp32"]
    replace_cer_with_plugin(std)
    sess = ort.InferenceSession(std.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    e = tiny_model.config.embed_dim
    with torch.inference_mode():
        feats = tiny_model.encode_image(torch.randn(1, 3, 768, 768, generator=gen))
    text = torch.nn.functional.normalize(torch.randn(20, 80, e, generator=gen), dim=-1)
    for k in (1, 2, 8):
        with torch.inference_mode():
            ref = tiny_model.decode(feats, text, topk=k)
        scores, *kept = sess.run(["scores", "kept0", "kept1", "kept2"], decoder_feed(feats, text, k))
        assert [x.tolist() for x in kept] == [x.tolist() for x in ref.kept]
        np.testing.assert_allclose(scores, ref.scores.numpy(), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------ (d) plugin build


def _tensorrt_root() -> Path | None:
    root = os.environ.get("TENSORRT_ROOT")
    if root and (Path(root) / "include" / "NvInfer.h").exists():
        return Path(root)
    return None


def test_cmake_configures_kernel_only_without_tensorrt(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("nvcc") is None:
        pytest.skip("cmake or nvcc not on PATH")
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORRT_ROOT", "TensorRT_INCLUDE_DIR")}
    res = subprocess.run(
        [cmake, "-S", str(KERNELS), "-B", str(tmp_path / "build"), "-DTENSORRT_ROOT=/nonexistent"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TensorRT headers not found" in res.stdout + res.stderr
    assert "kernel only" in res.stdout + res.stderr


@pytest.mark.tensorrt
def test_cmake_builds_the_plugin_library(tmp_path):
    root = _tensorrt_root()
    if root is None:
        pytest.skip("TensorRT headers not found (set TENSORRT_ROOT)")
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("nvcc") is None:
        pytest.skip("cmake or nvcc not on PATH")
    build = tmp_path / "build"
    cfg = subprocess.run([cmake, "-S", str(KERNELS), "-B", str(build), f"-DTENSORRT_ROOT={root}"],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    res = subprocess.run([cmake, "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    libs = list(build.glob("libsed_topk_union_plugin.so*"))
    assert libs
    nm = shutil.which("nm")
    if nm:
        symbols = subprocess.run([nm, "-D", "--defined-only", str(libs[0])], capture_output=True, text=True).stdout
        assert "getCreators" in symbols and "setLoggerFinder" in symbols


@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory):
    """libsed_topk_union.so built by CMake for one architecture (the C entry points need no GPU to load)."""
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("nvcc") is None:
        pytest.skip("cmake or nvcc not on PATH")
    build = tmp_path_factory.mktemp("kernel-lib")
    env = {k: v for k, v in os.environ.items() if k != "TENSORRT_ROOT"}
    arch = "90"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}{minor}"
    for cmd in ([cmake, "-S", str(KERNELS), "-B", str(build), "-DTENSORRT_ROOT=/nonexistent",
                 f"-DCMAKE_CUDA_ARCHITECTURES={arch}"],
                [cmake, "--build", str(build), "-j", "2", "--target", "sed_topk_union"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
    return build / "libsed_topk_union.so"


def test_kernel_c_library_exports_only_its_c_api(kernel_library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not on PATH")
    out = subprocess.run([nm, "-D", "--defined-only", str(kernel_library)], capture_output=True, text=True).stdout
    exported = sorted(line.split()[-1] for line in out.splitlines() if " T " in line)
    assert exported == ["sed_topk_union", "sed_topk_union_abi_version", "sed_topk_union_cuda_archs",
                        "sed_topk_union_workspace_size"]


def test_kernel_c_library_records_its_architectures(kernel_library):
    """The bundle builder reads them from the file (no load), the runtime checks them against the GPU."""
    from sed_export.trt_build import library_cuda_archs

    arch = "90"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}{minor}"
    assert library_cuda_archs(kernel_library) == arch


def test_kernel_c_library_loads_and_checks_arguments_without_a_gpu(kernel_library, tmp_path):
    from sed_runtime.errors import SedUserError
    from sed_runtime.kernel_lib import TopkUnionLibrary

    lib = TopkUnionLibrary(kernel_library)
    assert lib.workspace_size(847) == 3584 and lib.workspace_size(1) == 256 and lib.workspace_size(0) == 256
    with pytest.raises(RuntimeError, match="CUDA error 1"):  # null pointers: refused before any CUDA call
        lib.launch(0, "float32", 5, 10, k=1, kept=0, count=0, workspace=0, workspace_bytes=0, stream=0)
    with pytest.raises(ValueError, match="dtype"):
        lib.launch(0, "int8", 5, 10, k=1, kept=0, count=0, workspace=0, workspace_bytes=0, stream=0)
    with pytest.raises(SedUserError, match="not found"):
        TopkUnionLibrary(tmp_path / "missing.so")
    (tmp_path / "junk.so").write_bytes(b"not an ELF")
    with pytest.raises(SedUserError, match="cannot be loaded"):
        TopkUnionLibrary(tmp_path / "junk.so")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda unavailable)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_c_library_equals_the_rule_on_a_gpu(kernel_library, dtype):
    """The path the split decoder's TensorRT backend takes: ctypes, raw device pointers, a caller's stream."""
    from sed_runtime.kernel_lib import TopkUnionLibrary

    lib = TopkUnionLibrary(kernel_library)
    name = "float32" if dtype == torch.float32 else "float16"
    stream = torch.cuda.current_stream()
    for _, x, k in _gpu_cases():
        c = x.shape[0]
        logits = torch.from_numpy(x.reshape(c, -1)).to("cuda", dtype)
        kept = torch.full((max(c, 1),), -1, dtype=torch.int64, device="cuda")
        count = torch.zeros(1, dtype=torch.int64, device="cuda")
        ws = torch.empty(lib.workspace_size(c), dtype=torch.uint8, device="cuda")
        lib.launch(logits.data_ptr(), name, c, logits.shape[1], k, kept.data_ptr(), count.data_ptr(),
                   ws.data_ptr(), ws.numel(), stream.cuda_stream)
        stream.synchronize()
        got = kept[: int(count.item())].cpu().numpy()
        want = topk_union_reference(logits.float().cpu().numpy(), k)
        assert got.tolist() == want.tolist()


# ------------------------------------------------------------------------------ (e) the kernel on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda unavailable)")


@pytest.fixture(scope="module")
def cuda_op():
    from sed_export.cuda_ops import CudaOpUnavailable, topk_union_cuda

    try:
        from sed_export.cuda_ops import load_topk_union_op

        load_topk_union_op()
    except CudaOpUnavailable as exc:
        pytest.skip(str(exc))
    return topk_union_cuda


def _gpu_cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(7)
    cases = _random_cases() + _adversarial_cases()
    for c in (1, 2, 847):
        for p in (1, 576, 2304):
            for k in (1, 2, 8, 32, 33, 847):
                cases.append((f"c{c}-p{p}-k{k}", rng.standard_normal((c, p)).astype(np.float32), k))
    cases.append(("large-p", rng.standard_normal((150, 9216)).astype(np.float32), 8))
    cases.append(("fp16-large", rng.standard_normal((847, 9216)).astype(np.float16), 8))
    return cases


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name,x,k", _gpu_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_cuda_op_equals_the_rule(cuda_op, name, x, k):
    got = cuda_op(torch.from_numpy(x).cuda(), k)
    assert got.is_cuda and got.dtype == torch.int64
    expected = topk_union_reference(x, k)
    assert got.cpu().tolist() == expected.tolist(), name
    if not _boundary_tie(x, k):  # where torch.topk is defined, it agrees too
        assert got.cpu().tolist() == topk_union(torch.from_numpy(x).cuda(), k).cpu().tolist(), name


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_input_checks(cuda_op):
    with pytest.raises(ValueError):
        cuda_op(torch.zeros(3, 4, device="cuda"), 0)
    with pytest.raises(ValueError):
        cuda_op(torch.zeros(3, 4), 1)
    with pytest.raises(ValueError):
        cuda_op(torch.zeros(3, 4, device="cuda", dtype=torch.float64), 1)
    x = torch.randn(20, 8, 8, device="cuda")[:, ::2]  # non-contiguous
    assert cuda_op(x, 3).cpu().tolist() == topk_union_reference(x.cpu().numpy(), 3).tolist()


@pytest.mark.slow
def test_cuda_op_builds_without_a_gpu():
    """Compile + load only (no launch): catches binding errors on CPU machines that have nvcc + CUDA torch."""
    from sed_export.cuda_ops import build_problem, load_topk_union_op

    problem = build_problem()
    if problem is not None:
        pytest.skip(problem)
    op = load_topk_union_op()
    assert "topk_union(Tensor logits, int k) -> Tensor" in str(op.default._schema)


# ------------------------------------------------------------------------------ (f) the torch backend's CER


def test_torch_backend_cer_choice_on_the_cpu():
    from sed_runtime.backends.torch_backend import TorchBackend
    from sed_runtime.errors import SedUserError

    assert TorchBackend("sed-tiny").describe()["cer"] == "torch.topk"
    with pytest.raises(SedUserError, match="needs --device cuda"):
        TorchBackend("sed-tiny", cer_kernel="on")
    with pytest.raises(SedUserError, match="auto, on or off"):
        TorchBackend("sed-tiny", cer_kernel="sometimes")


@pytest.mark.gpu
@needs_cuda
def test_torch_backend_uses_the_kernel_on_a_gpu_and_keeps_the_same_classes():
    """The torch reference on a GPU with CER ranked by the kernel vs torch.topk: same kept sets, same scores."""
    from sed_runtime.backends.torch_backend import TorchBackend

    with_kernel = TorchBackend("sed-tiny", device="cuda", cer_kernel="on")
    plain = TorchBackend("sed-tiny", device="cuda", cer_kernel="off")
    assert with_kernel.describe()["cer"] == "topk-union CUDA kernel" and plain.describe()["cer"] == "torch.topk"
    g = torch.Generator().manual_seed(11)
    image = torch.randn(1, 3, 768, 768, generator=g).numpy()
    text = torch.nn.functional.normalize(torch.randn(150, 80, 64, generator=g), dim=-1).numpy()
    for k in (1, 8):
        a, b = with_kernel.infer(image, text, k), plain.infer(image, text, k)
        assert [x.tolist() for x in a.kept] == [x.tolist() for x in b.kept]  # random logits: no boundary ties
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5, rtol=0)
