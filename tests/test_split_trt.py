"""The TensorRT backend's split-decoder executor, run on the CPU against stand-ins for TensorRT and CUDA.

TensorRT plans cannot run here, but everything the executor does around them can: it sets input shapes and
addresses, sizes output buffers from the resolved shapes, passes device tensors between segments, and runs
the top-k union between them (kernel library or host rule) with its count/indices copies. The stand-ins
execute each segment's ONNX with ONNX Runtime on memory addressed by raw pointers, exactly where TensorRT
would read and write, so a wrong pointer, offset, shape or dtype shows up as a wrong result here.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from needs import need

torch = need("torch")
ort = need("onnxruntime")
need("onnx")

from planted import planted_inputs  # noqa: E402

from sed_runtime.backends.base import expand_rows  # noqa: E402
from sed_runtime.backends.trt_segments import DeviceTensor as _Dev  # noqa: E402
from sed_runtime.backends.trt_segments import TrtSegments as _TrtSegments  # noqa: E402
from sed_runtime.split_decoder import SEGMENTS, SPLIT_DIR, OrtSegments, run_split_decoder, segment_file  # noqa: E402
from sed_runtime.topk_union_rule import topk_union_reference  # noqa: E402

ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
             "tensor(int64)": np.dtype(np.int64)}


def _split_scores(ex, feats, text, n: int, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The split decoder's documented N x h x w block and kept lists."""
    probs, alive, kept = run_split_decoder(ex, feats, text, n, k)
    return expand_rows(probs, alive, n), kept


def _read(ptr: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_uint8 * n).from_address(ptr), np.uint8).view(dtype).reshape(shape).copy()


def _write(ptr: int, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    ctypes.memmove(ptr, arr.ctypes.data, arr.nbytes)


class FakeCuda:
    """`_Cuda` stand-in: device and pinned memory are numpy blocks, pointers their real addresses."""

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.copies = 0

    def malloc(self, nbytes: int) -> int:
        block = np.zeros(max(int(nbytes), 1), np.uint8)
        self.blocks[block.ctypes.data] = block
        return block.ctypes.data

    def free(self, ptr: int) -> None:
        self.blocks.pop(ptr, None)

    def host_alloc(self, nbytes: int) -> tuple[int, np.ndarray]:
        ptr = self.malloc(nbytes)
        return ptr, self.blocks[ptr]

    host_free = free

    def _inside(self, ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + b.nbytes for base, b in self.blocks.items())

    def h2d(self, dst: int, src: int, nbytes: int, stream: object) -> None:
        assert self._inside(dst, nbytes) and self._inside(src, nbytes), "copy outside an allocation"
        ctypes.memmove(dst, src, nbytes)
        self.copies += 1

    d2h = h2d

    def sync(self, stream: object) -> None:
        pass


class FakeTrt:
    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class ExecutionContextAllocationStrategy:
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = "static", "on-profile-change", "user-managed"

    @staticmethod
    def nptype(dtype: np.dtype) -> np.dtype:
        return dtype


class FakeEngine:
    """An `ICudaEngine` stand-in over one segment's ONNX (ONNX Runtime does the math)."""

    def __init__(self, path: Path, profiles: list[dict[str, tuple]] | None = None) -> None:
        opts = ort.SessionOptions()
        opts.enable_cpu_mem_arena = False  # four segments' arenas would add up across the test
        self.sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: ORT_TYPES[i.type] for i in self.sess.get_inputs()}
        self.outputs = {o.name: ORT_TYPES[o.type] for o in self.sess.get_outputs()}
        self.shapes = {i.name: tuple(d if isinstance(d, int) else -1 for d in i.shape) for i in self.sess.get_inputs()}
        self.names = [*self.inputs, *self.outputs]
        self.profiles = profiles or []  # per profile: input name -> (min, opt, max), as TensorRT reports them

    @property
    def num_optimization_profiles(self) -> int:
        return max(1, len(self.profiles))

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get_tensor_profile_shape(self, name: str, index: int) -> tuple:
        return self.profiles[index][name]

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return FakeTrt.TensorIOMode.INPUT if name in self.inputs else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return {**self.inputs, **self.outputs}[name]

    def create_execution_context(self, strategy: str = "static") -> FakeContext:
        return FakeContext(self, strategy)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: str) -> None:
        self.engine, self.strategy = engine, strategy
        self.device_memory: tuple[int, int] | None = None  # (pointer, size) handed over by set_device_memory
        self.needs: list[int] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.results: dict[str, np.ndarray] | None = None
        self.profile = 0
        self.profile_switches = 0

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        assert 0 <= index < self.engine.num_optimization_profiles
        self.profile, self.profile_switches = index, self.profile_switches + 1
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert name in self.engine.inputs
        shape = tuple(int(d) for d in shape)
        if self.engine.profiles and name in self.engine.profiles[self.profile]:
            lo, _, hi = self.engine.profiles[self.profile][name]
            if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False  # TensorRT refuses a shape outside the context's active profile
        self.shapes[name] = shape
        self.results = None
        return True

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = int(ptr)
        if name in self.engine.inputs:
            self.results = None

    def _run(self) -> dict[str, np.ndarray]:
        if self.results is None:
            feeds = {n: _read(self.addresses[n], dt, self.shapes[n]) for n, dt in self.engine.inputs.items()}
            values = self.engine.sess.run(list(self.engine.outputs), feeds)
            self.results = dict(zip(self.engine.outputs, values))
        return self.results

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name] if name in self.engine.inputs else tuple(self._run()[name].shape)

    def update_device_memory_size_for_shapes(self) -> int:
        """Scratch that follows the shapes: here, as many bytes as the inputs hold."""
        need = sum(int(np.prod(shape)) * self.engine.inputs[n].itemsize for n, shape in self.shapes.items())
        self.needs.append(need)
        return need

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.device_memory = (int(ptr), int(size))

    def execute_async_v3(self, stream: int) -> bool:
        assert self.strategy == "user-managed", "contexts must not reserve scratch for the profile maximum"
        assert self.device_memory is not None and self.needs, "enqueue before the scratch block was bound"
        assert self.device_memory[1] >= self.needs[-1], "scratch smaller than the current shapes need"
        for name, value in self._run().items():
            _write(self.addresses[name], value)
        self.results = None  # the next run reads its inputs again
        return True


class FakeKernel:
    """`TopkUnionLibrary` stand-in: the rule, reading and writing the pointers the kernel would."""

    def __init__(self) -> None:
        self.launches = 0

    def workspace_size(self, rows: int) -> int:
        return (rows * 4 + 255) // 256 * 256

    def launch(self, logits, dtype, num_classes, num_pixels, k, kept, count, workspace, workspace_bytes, stream):
        assert workspace_bytes >= self.workspace_size(num_classes) and workspace
        x = _read(logits, np.dtype(dtype), (num_classes, num_pixels))
        keep = topk_union_reference(x, k)
        _write(count, np.array([len(keep)], np.int64))
        _write(kept, keep)
        self.launches += 1


def _tiny_segments(tmp_path_factory, layout: str, classes: int):
    """sed-tiny's decoder segments of one layout ("split" or "chunked") saved in a fresh folder, and planted
    inputs for `classes` classes."""
    from sed_export.config import load_model_config
    from sed_export.model import build_model
    from sed_export.onnx_chunked import build_chunked_segments
    from sed_export.onnx_export import build_decoder_segments, save_graph
    from sed_runtime.chunked_decoder import CHUNKED_DIR
    from sed_runtime.chunked_decoder import segment_file as chunked_file

    build, subdir, file = ((build_decoder_segments, SPLIT_DIR, segment_file) if layout == "split" else
                           (build_chunked_segments, CHUNKED_DIR, chunked_file))
    model = build_model(load_model_config("sed-tiny"), seed=3)
    folder = tmp_path_factory.mktemp(layout)
    (folder / subdir).mkdir()
    for name, graph in build(model, "fp32").items():
        save_graph(graph, folder / file(name))
    f, text = planted_inputs(model, classes, seed=6)
    return folder, {name: getattr(f, name).numpy() for name in ("dense", "res4", "res3", "res2")}, text.numpy()


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    return _tiny_segments(tmp_path_factory, "split", 60)


@pytest.mark.parametrize("with_kernel", [False, True], ids=["host-rule", "kernel-library"])
def test_trt_split_executor_equals_the_reference_executor(split_folder, with_kernel):
    folder, feats, text = split_folder
    cuda = FakeCuda()
    kernel = FakeKernel() if with_kernel else None
    engines = {s: FakeEngine(folder / segment_file(s)) for s in SEGMENTS}
    ex = _TrtSegments(FakeTrt, cuda, stream=0, engines=engines, kernel=kernel, errors=[])

    own: set[int] = set()

    def device(arr: np.ndarray) -> _Dev:
        ptr = cuda.malloc(arr.nbytes)
        own.add(ptr)
        _write(ptr, arr)
        return _Dev(ptr, arr.shape, arr.dtype)

    dev_feats = {name: device(a) for name, a in feats.items()}
    reference = OrtSegments(folder)
    n = text.shape[0]
    sizes = []
    for k in (1, 2, n):  # three runs with different kept counts: buffers are reused and regrown
        want_scores, want_kept = _split_scores(reference, feats, text, n, k)
        scores, kept = _split_scores(ex, dev_feats, device(text), n, k)
        assert [x.tolist() for x in kept] == [x.tolist() for x in want_kept]
        np.testing.assert_array_equal(scores, want_scores)
        sizes.append(len(kept[0]))
    assert sizes[0] < sizes[-1] == n  # k = 1 really rejected classes, so the gathers were exercised
    if kernel is not None:
        assert kernel.launches == 9  # three CER points x three runs, none on the host
    # one scratch block serves the four contexts, sized for the largest shapes run, not four profile maxima
    # (a context bound before the block grew holds a freed pointer until its next bind; none holds a second block)
    bound = {ctx.device_memory[0] for ctx in ex.contexts.values() if ctx.device_memory}
    assert bound & set(cuda.blocks) == {ex.scratch.ptr}
    largest = max(need for ctx in ex.contexts.values() for need in ctx.needs)
    assert ex.scratch.peak == largest and largest <= ex.scratch.reserved <= 1.25 * largest
    ex.close()
    assert set(cuda.blocks) <= own  # close() freed every buffer the executor allocated


def test_trt_split_executor_refuses_a_wrong_dtype(split_folder):
    folder, feats, text = split_folder
    cuda = FakeCuda()
    engines = {s: FakeEngine(folder / segment_file(s)) for s in SEGMENTS}
    ex = _TrtSegments(FakeTrt, cuda, stream=0, engines=engines, kernel=None, errors=[])
    half = text.astype(np.float16)
    ptr = cuda.malloc(half.nbytes)
    feeds = {name: _Dev(cuda.malloc(a.nbytes), a.shape, a.dtype) for name, a in feats.items()}
    with pytest.raises(RuntimeError, match="input text is float16, the plan expects float32"):
        ex.run(SEGMENTS[0], {**feeds, "text": _Dev(ptr, half.shape, half.dtype)})


def test_buffers_never_hand_out_a_null_pointer():
    """Review finding 6: a zero-size output (e.g. no kept class) got a null address, which TensorRT refuses."""
    from sed_runtime.backends.cuda_memory import ContextMemory, DeviceBuffer

    cuda = FakeCuda()
    buf = DeviceBuffer(cuda)
    assert buf.ensure(0) != 0 and buf.capacity == 1
    scratch = ContextMemory(cuda, stream=0)

    class NoScratch:
        def update_device_memory_size_for_shapes(self) -> int:
            return 0

        def set_device_memory(self, ptr: int, size: int) -> None:
            self.bound = (ptr, size)

    ctx = NoScratch()
    scratch.bind(ctx)
    assert ctx.bound[0] != 0 and ctx.bound[1] >= 1


# ---------------------------------------------------------------------------------------------------------------
# The class-chunked plans: static profiles per chunk size, numpy staged through the device per chunk
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunked_folder(tmp_path_factory):
    return _tiny_segments(tmp_path_factory, "chunked", 23)


def _chunked_engines(folder: Path, sizes: tuple[int, ...]) -> dict[str, FakeEngine]:
    """Fake engines carrying the static profiles the builder would give each chunked segment."""
    from sed_export.trt_profiles import chunked_decoder_profiles
    from sed_runtime.chunked_decoder import SEGMENTS as CHUNKED
    from sed_runtime.chunked_decoder import segment_file as chunked_file

    engines = {s: FakeEngine(folder / chunked_file(s)) for s in CHUNKED}
    shapes = {s: {n: [d if d >= 0 else None for d in shape] for n, shape in e.shapes.items()}
              for s, e in engines.items()}
    for seg, profiles in chunked_decoder_profiles(shapes, sizes).items():
        engines[seg].profiles = [{r.name: (r.min, r.opt, r.max) for r in p.shapes} for p in profiles]
    return engines


@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_trt_chunked_executor_equals_the_reference(chunked_folder, chunk):
    """The TensorRT chunked executor (profile per chunk size, numpy staged through device buffers, features bound
    in place) gives the ONNX Runtime chunked reference's kept sets and scores, at k = 1 (real rejection) and all."""
    from sed_export.trt_profiles import chunk_sizes
    from sed_runtime.backends.trt_chunked import TrtChunkedSegments
    from sed_runtime.chunked_decoder import ort_chunked_segments, run_chunked_decoder

    folder, feats, text = chunked_folder
    cuda = FakeCuda()
    engines = _chunked_engines(folder, chunk_sizes(8))
    ex = TrtChunkedSegments(_TrtSegments(FakeTrt, cuda, stream=0, engines=engines, kernel=None, errors=[]), cuda, 0)
    dev_feats = {}
    for name, a in feats.items():
        ptr = cuda.malloc(a.nbytes)
        _write(ptr, a)
        dev_feats[name] = _Dev(ptr, a.shape, a.dtype)
    reference = ort_chunked_segments(folder)
    n = text.shape[0]
    for k in (1, n):
        want, want_rows, want_kept = run_chunked_decoder(reference, feats, text, k, n)  # one chunk: one pass
        probs, rows, kept = run_chunked_decoder(ex, dev_feats, text, k, chunk)
        assert [x.tolist() for x in kept] == [x.tolist() for x in want_kept]
        assert rows.tolist() == want_rows.tolist()
        np.testing.assert_allclose(probs, want, rtol=0, atol=1e-5)
    pre = ex.segments.contexts["chunk_pre"]
    # 23 classes in fixed sizes (8 + 8 + 4 + 2 + 1 for chunks of 8): every row count met its own static profile
    assert pre.profile_switches == 0 if chunk == 1 else pre.profile_switches >= 2
    assert all(ctx.profile_switches == 0 for seg, ctx in ex.segments.contexts.items() if seg == "chunk_skips")
    ex.close()


def test_trt_chunked_executor_refuses_rows_no_profile_was_built_for(chunked_folder):
    from sed_runtime.backends.trt_chunked import TrtChunkedSegments
    from sed_runtime.errors import SedUserError

    folder, feats, text = chunked_folder
    cuda = FakeCuda()
    ex = TrtChunkedSegments(_TrtSegments(FakeTrt, cuda, stream=0, engines=_chunked_engines(folder, (1, 2, 4)),
                                         kernel=None, errors=[]), cuda, 0)
    with pytest.raises(SedUserError, match=r"chunk_pre.plan has no profile for text \(3, 80, 64\)"):
        ex.run("chunk_pre", {"dense": feats["dense"], "text": text[:3]})
