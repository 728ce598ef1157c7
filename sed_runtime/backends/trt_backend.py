"""TensorRT backend: runs a bundle's encoder.plan and decoder.plan on one CUDA stream.

A plan only runs on the TensorRT build and GPU it was made for, and TensorRT reacts to a wrong plan with a
log line and a None (or worse, a crash inside a plugin). So everything that can be checked is checked first,
in plain Python against the manifest's `engines` section: plan and plugin hashes, TensorRT flavour and
version, GPU compute capability, the class count against the decoder profile. Only then is TensorRT called.

The runtime module is the one the manifest names (`tensorrt`, or `tensorrt_rtx_bindings` for TensorRT-RTX
plans; the API is the same). Device memory, pinned host buffers, the stream and the encoder's CUDA graph go
through cuda-python (`cuda.bindings.runtime`), NVIDIA's maintained binding. The decoder's kept-class outputs
have data-dependent lengths, so they are bound to an IOutputAllocator; everything else is preallocated.
Text embeddings come from the bundle / cache / bundled text encoder exactly as in the ONNX Runtime backend.
"""

from __future__ import annotations

import ctypes
import importlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle import Bundle, sha256_file
from ..errors import SedUserError
from ..split_decoder import SEGMENTS, run_split_decoder
from ..vocab import Vocabulary
from .base import Backend, BackendResult, ImageFeatures, InputSpec

if TYPE_CHECKING:  # tensorrt-stubs (10.x API) type-check the calls; the module itself is chosen at run time
    import tensorrt

RUNTIME_MODULES: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt",),
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx"),
}
RUNTIME_INSTALL = {
    "tensorrt": "pip install tensorrt (and 'sed-deploy[trt]' for cuda-python)",
    "tensorrt-rtx": "pip install 'sed-deploy[rtx,trt]'",
}
REBUILD = "rebuild the bundle on this machine with `sed-export build --engine tensorrt --force`, or run --backend ort"


# --------------------------------------------------------------------------------------------------------------
# Pure-Python checks (unit-tested on CPU)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRecord:
    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class EngineRecord:
    """The manifest's `engines` section, validated."""

    engine: str  # tensorrt | tensorrt-rtx
    version: str
    compute_capability: str | None  # None: portable TensorRT-RTX plans
    classes: Mapping[str, int]
    plans: Mapping[str, PlanRecord]
    plugins: tuple[PlanRecord, ...]
    precision: str
    cer: str = "standard-ops"  # standard-ops | plugin: CER inside decoder.plan; split: between segment plans
    kernel: PlanRecord | None = None  # split: the top-k-union kernel library (None: the rule on the host)

    @property
    def decoder_roles(self) -> tuple[str, ...]:
        return SEGMENTS if self.cer == "split" else ("decoder",)


def parse_engines(manifest: Mapping[str, Any], where: str = "bundle") -> EngineRecord:
    """Read and validate `engines`; a bundle without plans (or a malformed section) is a user error."""
    eng = manifest.get("engines")
    if not eng:
        raise SedUserError(
            f"{where} has no TensorRT plans; build them with `sed-export build --engine tensorrt` or use --backend ort"
        )
    def plan_record(d: Mapping[str, Any]) -> PlanRecord:
        return PlanRecord(str(d["file"]), str(d["sha256"]), int(d["bytes"]))

    try:
        cer = str(eng.get("cer", "standard-ops"))
        roles = ("encoder", *(SEGMENTS if cer == "split" else ("decoder",)))
        plans = {role: plan_record(eng["plans"][role]) for role in roles}
        plugins = tuple(plan_record(p) for p in eng.get("plugins", []))
        kernel = plan_record(eng["kernel"]) if eng.get("kernel") else None
        classes = {k: int(eng["classes"][k]) for k in ("min", "opt", "max")}
        engine = str(eng["engine"])
        version = str(eng["builder"]["version"])
    except (KeyError, TypeError, ValueError) as e:
        raise SedUserError(
            f"{where}: the manifest's engines section is malformed ({e!r}); rebuild with --force"
        ) from None
    if engine not in RUNTIME_MODULES:
        raise SedUserError(f"{where}: plans were built by unknown engine {engine!r}; rebuild with --force")
    cc = eng.get("compute_capability")
    if cer not in ("standard-ops", "plugin", "split"):
        raise SedUserError(f"{where}: unknown CER mode {cer!r} in the manifest; rebuild with this sed-deploy")
    return EngineRecord(engine, version, None if cc is None else str(cc), classes, plans, plugins,
                        str(eng.get("precision", manifest.get("precision", "?"))), cer, kernel)


def check_files(
    root: Path, records: Sequence[PlanRecord], what: str, hashed: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """Each file exists with its recorded size and sha256; size first so a truncated plan says so.

    `hashed`: manifest `files` entries already hashed by `Bundle.verify`; a record with the same sha256 there is
    not hashed again (plans run to hundreds of MB).
    """
    for rec in records:
        path = root / rec.file
        if not path.is_file():
            extra = " (the plugin library is copied into the bundle at build time)" if what == "plugin library" else ""
            raise SedUserError(f"{what} {path} is missing{extra}; rebuild the bundle with `sed-export build --force`")
        size = path.stat().st_size
        if size != rec.bytes:
            state = "truncated" if size < rec.bytes else "larger than recorded"
            raise SedUserError(
                f"{what} {path} is {state} ({size} of {rec.bytes} bytes); rebuild the bundle with --force"
            )
        if (hashed or {}).get(rec.file, {}).get("sha256") == rec.sha256:
            continue
        if sha256_file(path) != rec.sha256:
            raise SedUserError(f"{what} {path} does not match its manifest sha256; rebuild the bundle with --force")


def check_version(record: EngineRecord, module_name: str, installed: str) -> None:
    """Plans are tied to the exact TensorRT (or TensorRT-RTX) release that built them."""
    flavour = "TensorRT-RTX" if record.engine == "tensorrt-rtx" else "TensorRT"
    if installed != record.version:
        raise SedUserError(
            f"the plans were built by {flavour} {record.version} but {module_name} {installed} is installed; "
            f"install {flavour} {record.version} or {REBUILD}"
        )


def _cc(value: str) -> tuple[int, int]:
    major, _, minor = value.partition(".")
    return int(major), int(minor or 0)


def check_compute_capability(record: EngineRecord, current: str, gpu_name: str = "this GPU") -> None:
    """A TensorRT plan runs only on the compute capability it was built on; TensorRT-RTX plans need CC >= 8.0."""
    if record.compute_capability is None:  # TensorRT-RTX AOT plan: portable, the runtime JIT-compiles
        if _cc(current) < (8, 0):
            raise SedUserError(
                f"{gpu_name} has compute capability {current}; TensorRT-RTX plans built with default targets need "
                "8.0 or newer (Turing needs a plan built for sm75); run with --backend ort"
            )
        return
    if _cc(current) != _cc(record.compute_capability):
        raise SedUserError(
            f"the plans were built for compute capability {record.compute_capability} but {gpu_name} is "
            f"{current}; {REBUILD}"
        )


def choose_backend(has_engines: bool, trt_importable: bool, gpu: bool) -> tuple[str, str | None]:
    """`--backend auto` for a bundle: trt only when plans, their TensorRT and a GPU are all there; else ort + why."""
    if not has_engines:
        return "ort", None
    if not trt_importable:
        return "ort", "the bundle has TensorRT plans but their TensorRT runtime is not installed"
    if not gpu:
        return "ort", "the bundle has TensorRT plans but no CUDA GPU is visible"
    return "trt", None


def tensor_nbytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a tensor; dynamic (-1) dims are a planning error, 0-sized tensors get 1 byte (never malloc 0)."""
    n = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"shape {tuple(shape)} is not resolved")
        n *= int(d)
    return max(n * itemsize, 1)


@dataclass(frozen=True)
class TensorDesc:
    name: str
    is_input: bool
    shape: tuple[int, ...]  # as resolved for the current input shapes; -1 where data-dependent
    itemsize: int
    on_host: bool = False  # shape tensors (k) live in host memory


def plan_buffers(tensors: Sequence[TensorDesc]) -> tuple[dict[str, int], list[str]]:
    """Split IO tensors into preallocated device buffers (name -> bytes) and data-dependent outputs.

    Data-dependent outputs (a -1 dim after the input shapes are set) go to an IOutputAllocator; host tensors
    (shape inputs) need no device buffer.
    """
    static: dict[str, int] = {}
    dynamic: list[str] = []
    for t in tensors:
        if t.on_host:
            continue
        if any(d < 0 for d in t.shape):
            if t.is_input:
                raise ValueError(f"input {t.name} has unresolved shape {t.shape}")
            dynamic.append(t.name)
        else:
            static[t.name] = tensor_nbytes(t.shape, t.itemsize)
    return static, dynamic


def grow(capacity: int, needed: int) -> int:
    """New capacity for a growable buffer: at least `needed`, doubling to avoid reallocating every call."""
    return capacity if needed <= capacity else max(needed, 2 * capacity)


# --------------------------------------------------------------------------------------------------------------
# Environment probes
# --------------------------------------------------------------------------------------------------------------


def _cudart() -> Any:
    """cuda-python's runtime module (12.6+ layout first, then the older `cuda.cudart`)."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        from cuda import cudart  # type: ignore[attr-defined,unused-ignore]

        return cudart


def current_gpu() -> dict[str, Any] | None:
    """Name and compute capability of CUDA device 0 via cuda-python; None without cuda-python, driver or GPU."""
    try:
        rt = _cudart()
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return None
        err, prop = rt.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return None
    except Exception:  # no cuda-python, no driver library: no GPU as far as we can use one
        return None
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name, "compute_capability": f"{prop.major}.{prop.minor}"}


def runtime_module(engine: str) -> Any:
    """The TensorRT module a plan needs; refuses the empty namespace package that tensorrt-stubs leaves."""
    for name in RUNTIME_MODULES.get(engine, ()):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        except Exception as e:
            raise SedUserError(f"{name} is installed but cannot be loaded ({str(e).splitlines()[0][:160]})") from None
        if hasattr(mod, "Runtime"):
            return mod
    names = " or ".join(RUNTIME_MODULES.get(engine, (engine,)))
    raise SedUserError(f"the plans need {names}, which is not installed; {RUNTIME_INSTALL.get(engine, '')} "
                       "or run with --backend ort")


def trt_available(engine: str) -> bool:
    try:
        runtime_module(engine)
    except SedUserError:
        return False
    return True


def auto_backend(bundle_dir: Path) -> tuple[str, str | None]:
    """What `--backend auto` runs for this bundle (and, when it falls back to ort, why)."""
    manifest = Bundle.open(bundle_dir, verify=False).manifest
    eng = manifest.get("engines")
    if not eng:
        return choose_backend(False, False, False)
    return choose_backend(True, trt_available(str(eng.get("engine"))), current_gpu() is not None)


# --------------------------------------------------------------------------------------------------------------
# CUDA memory (cuda-python)
# --------------------------------------------------------------------------------------------------------------


class _Cuda:
    """Thin checked wrapper over cuda-python's runtime: every call raises on a CUDA error."""

    def __init__(self) -> None:
        self.rt = _cudart()

    def call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, name = self.rt.cudaGetErrorName(err)
            raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)

    def malloc(self, nbytes: int) -> int:
        return int(self.call(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        if ptr:
            self.call(self.rt.cudaFree(ptr))

    def host_alloc(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Pinned host memory and a uint8 numpy view of it (copies from pinned memory run asynchronously)."""
        ptr = int(self.call(self.rt.cudaMallocHost(max(int(nbytes), 1))))
        view = np.frombuffer(memoryview((ctypes.c_ubyte * max(int(nbytes), 1)).from_address(ptr)).cast("B"), np.uint8)
        return ptr, view

    def host_free(self, ptr: int) -> None:
        if ptr:
            self.call(self.rt.cudaFreeHost(ptr))

    def h2d(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.call(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.call(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def sync(self, stream: Any) -> None:
        self.call(self.rt.cudaStreamSynchronize(stream))


class _HostBuffer:
    """A growable pinned host buffer."""

    def __init__(self, cuda: _Cuda) -> None:
        self.cuda, self.ptr, self.capacity = cuda, 0, 0
        self.view = np.zeros(0, np.uint8)

    def ensure(self, nbytes: int) -> None:
        if nbytes > self.capacity:
            self.cuda.host_free(self.ptr)
            self.capacity = grow(self.capacity, nbytes)
            self.ptr, self.view = self.cuda.host_alloc(self.capacity)

    def array(self, dtype: np.dtype[Any], shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(shape)) if len(shape) else 1
        return self.view[: n * dtype.itemsize].view(dtype).reshape(tuple(shape))

    def close(self) -> None:
        self.cuda.host_free(self.ptr)
        self.ptr = self.capacity = 0


class _DeviceBuffer:
    """A growable device buffer."""

    def __init__(self, cuda: _Cuda) -> None:
        self.cuda, self.ptr, self.capacity = cuda, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.cuda.free(self.ptr)
            self.capacity = grow(self.capacity, nbytes)
            self.ptr = self.cuda.malloc(self.capacity)
        return self.ptr

    def close(self) -> None:
        self.cuda.free(self.ptr)
        self.ptr = self.capacity = 0


def _make_output_allocator(trt: Any, cuda: _Cuda) -> Any:
    """An IOutputAllocator keeping one growable device buffer per data-dependent output and its final shape."""

    class _OutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, _DeviceBuffer] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int:
            buf = self.buffers.setdefault(tensor_name, _DeviceBuffer(cuda))
            return buf.ensure(int(size))  # cudaMalloc is 256-byte aligned, beyond any alignment TensorRT asks

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            return self.reallocate_output_async(tensor_name, memory, size, alignment, 0)

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

        def close(self) -> None:
            for b in self.buffers.values():
                b.close()

    return _OutputAllocator()


def _dims(dims: Any) -> tuple[int, ...]:
    """TensorRT Dims as a tuple (the stubs declare indexing and len, not iteration)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _make_logger(trt: Any) -> Any:
    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return _Logger()


# --------------------------------------------------------------------------------------------------------------
# The split decoder's segments (CER between plans)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dev:
    """A tensor in device memory: what the split decoder's segments pass to each other."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize if self.shape else self.dtype.itemsize


class _TrtSegments:
    """`SegmentExecutor` over the segment plans: device tensors in and out, on the backend's one stream.

    Each segment owns its output buffers, so the pre-rejection skips stay valid while the layers run. The top-k
    union runs with the kernel library when the bundle has one, else with the ranking rule on the host; either
    way the host needs the kept count to set the next plan's input shapes, so each CER point synchronises once.
    One kept-index buffer serves every CER point: the layer reading it is enqueued on the same stream before
    the next point writes it.
    """

    def __init__(self, trt: Any, cuda: _Cuda, stream: Any, engines: Mapping[str, Any], kernel: Any,
                 errors: list[str]) -> None:
        self.trt, self.cuda, self.stream, self.kernel, self.errors = trt, cuda, stream, kernel, errors
        self.engines = dict(engines)
        self.contexts = {name: e.create_execution_context() for name, e in self.engines.items()}
        self.outputs: dict[tuple[str, str], _DeviceBuffer] = {}
        self.keep, self.count, self.workspace = _DeviceBuffer(cuda), _DeviceBuffer(cuda), _DeviceBuffer(cuda)
        self.host = _HostBuffer(cuda)

    def _dtype(self, segment: str, name: str) -> np.dtype[Any]:
        return np.dtype(self.trt.nptype(self.engines[segment].get_tensor_dtype(name)))

    def run(self, segment: str, feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        trt, ctx, engine = self.trt, self.contexts[segment], self.engines[segment]
        out_names = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                out_names.append(name)
                continue
            t: _Dev = feeds[name]
            want = self._dtype(segment, name)
            if t.dtype != want:
                raise RuntimeError(f"{segment}: input {name} is {t.dtype}, the plan expects {want}")
            if not ctx.set_input_shape(name, t.shape):
                raise SedUserError(f"{segment}.plan refuses {name} of shape {t.shape}; rebuild the bundle")
            ctx.set_tensor_address(name, t.ptr)
        result = {}
        for name in out_names:
            shape = _dims(ctx.get_tensor_shape(name))
            dev = _Dev(0, shape, self._dtype(segment, name))
            buf = self.outputs.setdefault((segment, name), _DeviceBuffer(self.cuda))
            result[name] = _Dev(buf.ensure(dev.nbytes), shape, dev.dtype)
            ctx.set_tensor_address(name, result[name].ptr)
        if not ctx.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{segment} enqueue failed: {self.errors[-1:]}")
        return result

    def topk_union(self, aux: Any, k: int) -> tuple[Any, np.ndarray]:
        cuda, stream = self.cuda, self.stream
        rows, pixels = aux.shape[0], int(np.prod(aux.shape[1:]))
        keep_ptr = self.keep.ensure(rows * 8)
        self.host.ensure(max(aux.nbytes, (rows + 1) * 8))
        if self.kernel is not None:
            ws = self.kernel.workspace_size(rows)
            self.kernel.launch(aux.ptr, aux.dtype.name, rows, pixels, k, keep_ptr, self.count.ensure(8),
                               self.workspace.ensure(ws), ws, int(stream))
            host = self.host.array(np.dtype(np.int64), (rows + 1,))
            cuda.d2h(self.host.ptr, self.count.ptr, 8, stream)
            cuda.d2h(self.host.ptr + 8, keep_ptr, rows * 8, stream)
            cuda.sync(stream)
            keep = host[1 : 1 + int(host[0])].copy()
        else:
            from ..topk_union_rule import topk_union_reference

            cuda.d2h(self.host.ptr, aux.ptr, aux.nbytes, stream)
            cuda.sync(stream)
            keep = topk_union_reference(self.host.array(aux.dtype, aux.shape), k)
            np.copyto(self.host.array(np.dtype(np.int64), keep.shape), keep)
            cuda.h2d(keep_ptr, self.host.ptr, keep.nbytes, stream)
            cuda.sync(stream)  # the pinned buffer is reused by the next CER point
        return _Dev(keep_ptr, (len(keep),), np.dtype(np.int64)), keep

    def to_host(self, tensor: Any) -> np.ndarray:
        self.host.ensure(tensor.nbytes)
        self.cuda.d2h(self.host.ptr, tensor.ptr, tensor.nbytes, self.stream)
        self.cuda.sync(self.stream)
        return self.host.array(tensor.dtype, tensor.shape).copy()

    def close(self) -> None:
        for b in (*self.outputs.values(), self.keep, self.count, self.workspace):
            b.close()
        self.host.close()


# --------------------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------------------


class TrtBackend(Backend):
    """encoder.plan -> decoder.plan on one stream; checks everything it can before TensorRT sees a byte."""

    name = "trt"

    def __init__(self, bundle: Bundle | str | Path, *, cuda_graph: bool = True) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        root = self.bundle.root
        self.record = parse_engines(self.bundle.manifest, str(root))
        hashed = self.bundle.manifest["files"] if self.bundle.verified else None
        check_files(root, list(self.record.plans.values()), "plan", hashed)
        check_files(root, self.record.plugins, "plugin library", hashed)
        if self.record.kernel is not None:
            check_files(root, [self.record.kernel], "kernel library", hashed)
        trt = runtime_module(self.record.engine)
        check_version(self.record, trt.__name__, str(getattr(trt, "__version__", "?")))
        gpu = current_gpu()
        if gpu is None:
            raise SedUserError(
                "--backend trt needs an NVIDIA GPU through cuda-python (pip install 'sed-deploy[trt]'); none is "
                "visible here; run with --backend ort"
            )
        check_compute_capability(self.record, gpu["compute_capability"], gpu["name"])
        self.gpu = gpu
        self._trt = trt
        self._cuda = _Cuda()
        self._closed = True
        self._logger = _make_logger(trt)
        runtime: tensorrt.Runtime = trt.Runtime(self._logger)
        self._runtime = runtime
        for lib in self.record.plugins:
            handle = runtime.get_plugin_registry().load_library(str(root / lib.file))
            if handle is None:
                raise SedUserError(f"plugin library {root / lib.file} could not be loaded by {trt.__name__}; "
                                   f"it must be built against {trt.__name__} {self.record.version}")
        self._encoder: tensorrt.ICudaEngine = self._deserialize("encoder")
        decoders = {role: self._deserialize(role) for role in self.record.decoder_roles}
        kernel = None
        if self.record.kernel is not None:
            from ..kernel_lib import TopkUnionLibrary

            kernel = TopkUnionLibrary(root / self.record.kernel.file)
        from ..bundle_text import BundleText

        self._text = BundleText(self.bundle)
        self._generation = 0  # encode_image calls so far: the encoder's device buffers hold the last one
        self._closed = False
        self._stream = self._cuda.call(self._cuda.rt.cudaStreamCreate())
        self._setup_encoder(cuda_graph)
        self._setup_text()
        self._segments: _TrtSegments | None = None
        if self.record.cer == "split":
            self._segments = _TrtSegments(trt, self._cuda, self._stream, decoders, kernel, self._logger.errors)
        else:
            self._decoder: tensorrt.ICudaEngine = decoders["decoder"]
            self._setup_decoder()

    # -- loading -------------------------------------------------------------------------------------------------

    def _deserialize(self, role: str) -> Any:
        path = self.bundle.root / self.record.plans[role].file
        data = path.read_bytes()
        validity = getattr(self._runtime, "get_engine_validity", None)  # TensorRT-RTX / 11: header check, no crash
        if validity is not None:
            try:
                state, diagnostics = validity(data)
            except Exception:
                state = None
            if state is not None and "INVALID" in str(state):
                raise SedUserError(f"{path} cannot run here ({self._trt.__name__} reports {state}, diagnostics "
                                   f"{diagnostics}); {REBUILD}")
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            first = self._logger.errors[0].splitlines()[0][:200] if self._logger.errors else "no reason logged"
            raise SedUserError(f"{path} could not be deserialised by {self._trt.__name__} ({first}); {REBUILD}")
        return engine

    def _io(self, engine: Any, ctx: Any) -> list[TensorDesc]:
        trt = self._trt
        out = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = _dims(ctx.get_tensor_shape(name))
            out.append(TensorDesc(
                name=name,
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                shape=shape,
                itemsize=np.dtype(trt.nptype(engine.get_tensor_dtype(name))).itemsize,
                on_host=engine.get_tensor_location(name) == trt.TensorLocation.HOST,
            ))
        return out

    def _dtype(self, engine: Any, name: str) -> np.dtype[Any]:
        return np.dtype(self._trt.nptype(engine.get_tensor_dtype(name)))

    def _setup_encoder(self, cuda_graph: bool) -> None:
        cuda = self._cuda
        ctx: tensorrt.IExecutionContext = self._encoder.create_execution_context()
        self._enc_ctx = ctx
        static, dynamic = plan_buffers(self._io(self._encoder, ctx))
        if dynamic:
            raise SedUserError(f"encoder.plan has data-dependent outputs {dynamic}; rebuild the bundle")
        self._enc_buffers = {name: cuda.malloc(n) for name, n in static.items()}
        for name, ptr in self._enc_buffers.items():
            ctx.set_tensor_address(name, ptr)
        self._image_host = _HostBuffer(cuda)
        self._image_host.ensure(static["image"])
        self._graph_exec: Any = None
        self._cuda_graph = cuda_graph

    def _capture_encoder(self) -> None:
        """After one normal run: capture the fixed-shape encoder into a CUDA graph; fall back silently."""
        rt, cuda = self._cuda.rt, self._cuda
        capturable = getattr(self._enc_ctx, "is_stream_capturable", None)
        if capturable is not None and not capturable(int(self._stream)):
            self._cuda_graph = False
            return
        try:
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            cuda.call(rt.cudaStreamBeginCapture(self._stream, mode))
            ok = self._enc_ctx.execute_async_v3(int(self._stream))
            graph = cuda.call(rt.cudaStreamEndCapture(self._stream))
            if not ok:
                raise RuntimeError("enqueue refused during capture")
            self._graph_exec = cuda.call(rt.cudaGraphInstantiate(graph, 0))
            cuda.call(rt.cudaGraphDestroy(graph))
        except RuntimeError:
            self._graph_exec, self._cuda_graph = None, False
            rt.cudaGetLastError()  # clear the sticky capture error before the plain path runs

    def _setup_text(self) -> None:
        self._text_dev = _DeviceBuffer(self._cuda)
        self._text_host = _HostBuffer(self._cuda)
        self._text_key: tuple[int, tuple[int, ...]] | None = None
        self._static_out: dict[str, _DeviceBuffer] = {}
        self._out_host: dict[str, _HostBuffer] = {}

    def _upload_text(self, text: np.ndarray) -> np.ndarray:
        """The pipeline passes the same embeddings for every image: upload them once."""
        text = np.ascontiguousarray(text, dtype=np.float32)
        key = (id(text) if text.base is None else id(text.base), text.shape)
        if key != self._text_key:
            self._text_host.ensure(text.nbytes)
            np.copyto(self._text_host.array(text.dtype, text.shape), text)
            self._cuda.h2d(self._text_dev.ensure(text.nbytes), self._text_host.ptr, text.nbytes, self._stream)
            self._text_key = key
        return text

    def _setup_decoder(self) -> None:
        ctx: tensorrt.IExecutionContext = self._decoder.create_execution_context()
        self._dec_ctx = ctx
        for name in ("dense", "res4", "res3", "res2"):  # encoder outputs feed the decoder in place
            ctx.set_tensor_address(name, self._enc_buffers[name])
        self._k_host = np.zeros(1, np.int64)
        # Standard-op decoder: k sizes TopK, so it is a shape input TensorRT reads from host memory at enqueue.
        # Plugin-node decoder: only the plugin reads k, on the GPU, so it needs a device copy.
        self._k_dev: _DeviceBuffer | None = None
        if self._decoder.is_shape_inference_io("k"):
            ctx.set_tensor_address("k", self._k_host.ctypes.data)
        else:
            self._k_dev = _DeviceBuffer(self._cuda)
            ctx.set_tensor_address("k", self._k_dev.ensure(self._k_host.nbytes))
        self._allocator = _make_output_allocator(self._trt, self._cuda)
        self._dynamic_outputs: list[str] = []

    # -- Backend interface ---------------------------------------------------------------------------------------

    @property
    def input_spec(self) -> InputSpec:
        return self.bundle.input_spec

    def encode_text(self, vocab: Vocabulary, progress: bool = True) -> np.ndarray:
        from ..profile_checks import check_classes

        check_classes(len(vocab), self.record.classes, "this bundle's decoder.plan")
        try:
            emb: np.ndarray = self._text.embeddings(vocab, progress=progress)
        except ImportError:
            raise SedUserError(
                f"embedding the new vocabulary {vocab.name} needs onnxruntime for the bundled text encoder: "
                "pip install 'sed-deploy[onnx]', or embed it once with `sed-export embed-text`"
            ) from None
        return emb

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        """Runs the encoder into its device buffers, which the decoder reads in place: the features stay valid
        until the next encode_image (their generation says which)."""
        cuda, stream, s = self._cuda, self._stream, int(self._stream)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        img = self._image_host.array(np.dtype(np.float32), image.shape)
        np.copyto(img, image, casting="same_kind")
        cuda.h2d(self._enc_buffers["image"], self._image_host.ptr, img.nbytes, stream)
        if self._graph_exec is not None:
            cuda.call(cuda.rt.cudaGraphLaunch(self._graph_exec, stream))
        elif not self._enc_ctx.execute_async_v3(s):
            raise RuntimeError(f"encoder enqueue failed: {self._logger.errors[-1:]}")
        cuda.sync(stream)
        timings["encoder"] = (time.perf_counter() - t0) * 1e3
        if self._cuda_graph and self._graph_exec is None:
            self._capture_encoder()
        self._generation += 1
        return ImageFeatures(None, self.name, self._generation, timings)

    def decode(self, features: ImageFeatures, text: np.ndarray, topk: int | None) -> BackendResult:
        from ..profile_checks import check_classes

        self._check_features(features, self._generation)
        n = int(text.shape[0])
        check_classes(n, self.record.classes, "this bundle's decoder.plan")
        cuda, stream, s = self._cuda, self._stream, int(self._stream)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        text = self._upload_text(text)
        k = n if topk is None else min(topk, n)
        if self._segments is not None:
            feats = {name: _Dev(ptr, _dims(self._enc_ctx.get_tensor_shape(name)), self._dtype(self._encoder, name))
                     for name, ptr in self._enc_buffers.items() if name != "image"}
            dev_text = _Dev(self._text_dev.ptr, tuple(text.shape), np.dtype(np.float32))
            scores, kept_split = run_split_decoder(self._segments, feats, dev_text, n, k)
            timings["decoder"] = (time.perf_counter() - t0) * 1e3
            kept_out = None if topk is None else [x.astype(np.int32) for x in kept_split]
            return BackendResult(scores=scores, kept=kept_out, timings_ms=timings)
        ctx = self._dec_ctx
        ctx.set_tensor_address("text", self._text_dev.ptr)
        if not ctx.set_input_shape("text", tuple(text.shape)):
            raise SedUserError(f"decoder.plan refuses text of shape {text.shape}; rebuild the bundle")
        self._k_host[0] = k
        if self._k_dev is not None:
            cuda.h2d(self._k_dev.ptr, self._k_host.ctypes.data, self._k_host.nbytes, stream)
        static, dynamic = plan_buffers(self._io(self._decoder, ctx))
        for name, nbytes in static.items():
            if name in ("dense", "res4", "res3", "res2", "text"):
                continue
            buf = self._static_out.setdefault(name, _DeviceBuffer(cuda))
            ctx.set_tensor_address(name, buf.ensure(nbytes))
        for name in dynamic:
            if name not in self._dynamic_outputs:
                ctx.set_output_allocator(name, self._allocator)
                self._dynamic_outputs.append(name)
        if not ctx.execute_async_v3(s):
            raise RuntimeError(f"decoder enqueue failed: {self._logger.errors[-1:]}")

        outputs: dict[str, np.ndarray] = {}
        shapes = {name: _dims(ctx.get_tensor_shape(name)) for name in static
                  if name not in ("dense", "res4", "res3", "res2", "text")}
        shapes.update({name: self._allocator.shapes[name] for name in dynamic})
        for name, shape in shapes.items():
            dtype = self._dtype(self._decoder, name)
            nbytes = int(np.prod(shape)) * dtype.itemsize if len(shape) else dtype.itemsize
            host = self._out_host.setdefault(name, _HostBuffer(cuda))
            host.ensure(nbytes)
            src = self._allocator.buffers[name].ptr if name in dynamic else self._static_out[name].ptr
            if nbytes:
                cuda.d2h(host.ptr, src, nbytes, stream)
        cuda.sync(stream)
        for name, shape in shapes.items():
            outputs[name] = self._out_host[name].array(self._dtype(self._decoder, name), shape).copy()
        timings["decoder"] = (time.perf_counter() - t0) * 1e3
        kept = None if topk is None else [outputs[f"kept{i}"].astype(np.int32) for i in range(3)]
        return BackendResult(scores=outputs["scores"].astype(np.float32, copy=False), kept=kept, timings_ms=timings)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            **self.bundle.summary,
            "precision": self.record.precision,
            "engine": self.record.engine,
            "tensorrt": self.record.version,
            "gpu": self.gpu["name"],
            "compute_capability": self.gpu["compute_capability"],
            "cuda_graph_encoder": self._graph_exec is not None,
            "cer": self.record.cer if self.record.cer != "split" else
            f"split ({'kernel library' if self.record.kernel else 'host rule'} between segment plans)",
        }

    def close(self) -> None:
        """Free device and pinned memory (also on garbage collection)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._cuda.sync(self._stream)
            for ptr in self._enc_buffers.values():
                self._cuda.free(ptr)
            k_dev = getattr(self, "_k_dev", None)
            for b in (*self._static_out.values(), self._text_dev, *([k_dev] if k_dev else [])):
                b.close()
            if self._segments is not None:
                self._segments.close()
            for h in (*self._out_host.values(), self._text_host, self._image_host):
                h.close()
            if self._segments is None:
                self._allocator.close()
            if self._graph_exec is not None:
                self._cuda.rt.cudaGraphExecDestroy(self._graph_exec)
            self._cuda.rt.cudaStreamDestroy(self._stream)
        except Exception:  # teardown must never raise (interpreter shutdown, lost context)
            pass

    def __del__(self) -> None:
        self.close()
