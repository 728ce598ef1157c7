"""TensorRT backend: runs a bundle's encoder.plan and decoder plan(s) on one CUDA stream.

Before TensorRT sees a byte, everything the manifest records is checked against this machine (`trt_plans`):
hashes, TensorRT release, GPU compute capability, the libraries' CUDA architectures. The encoder has fixed shapes,
so its context gets an exact scratch block and a CUDA graph; the decoder's contexts are user-managed and share
one scratch block sized for the shapes actually run (`cuda_memory.ContextMemory`). The decoder's kept-class
outputs have data-dependent lengths, so they are bound to an IOutputAllocator; everything else is preallocated.
Text embeddings come from the bundle's encode_text verb (`bundle_text`), as in the ONNX Runtime backend.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle import Bundle
from ..errors import SedUserError
from ..memory import DecoderMemory
from ..split_decoder import run_split_decoder
from ..vocab import Vocabulary
from .base import Backend, BackendResult, ImageFeatures, InputSpec
from .cuda_memory import ContextMemory, Cuda, DeviceBuffer, HostBuffer, make_output_allocator
from .trt_env import current_gpu, dims, load_plugin_library, make_logger, runtime_module
from .trt_plans import (
    REBUILD,
    BufferPlan,
    TensorDesc,
    check_files,
    check_gpu_fits,
    check_version,
    parse_engines,
    plan_buffers,
    plan_chunk,
)
from .trt_segments import DeviceTensor, TrtSegments

if TYPE_CHECKING:  # tensorrt-stubs (10.x API) type-check the calls; the module itself is chosen at run time
    import tensorrt

FEATURES = ("dense", "res4", "res3", "res2")  # encoder outputs, read by the decoder in place


def text_fingerprint(text: np.ndarray) -> tuple[tuple[int, ...], int]:
    """Shape and a hash of about 4096 evenly spaced values: catches an in-place edit of the embeddings held
    by the pipeline without hashing all of them (A-847 on sed-b is 200 MB) for every image."""
    flat = text.reshape(-1)
    return tuple(text.shape), hash(flat[:: max(1, flat.size // 4096)].tobytes())


def decoder_output_buffers(plan: BufferPlan) -> dict[str, int]:
    """The decoder's device outputs to allocate and bind: never an input (text, features, the plugin's device k
    are bound by the backend, and rebinding k would hand the plugin an unwritten buffer)."""
    return dict(plan.outputs)


class TrtBackend(Backend):
    """encoder.plan -> decoder.plan on one stream; checks everything it can before TensorRT sees a byte."""

    name = "trt"

    def __init__(self, bundle: Bundle | str | Path, *, cuda_graph: bool = True) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        root = self.bundle.root
        self.record = parse_engines(self.bundle.manifest, str(root))
        hashed = self.bundle.manifest["files"] if self.bundle.verified else None
        check_files(root, list(self.record.plans.values()), "plan", hashed)  # the chunked plans too
        check_files(root, self.record.plugins, "plugin library", hashed)
        if self.record.kernel is not None:
            check_files(root, [self.record.kernel], "kernel library", hashed)
        trt = runtime_module(self.record.engine)
        # Plans from another TensorRT release are wrong here on any machine: said before the GPU is looked for.
        check_version(self.record, trt.__name__, str(getattr(trt, "__version__", "?")))
        gpu = current_gpu()
        if gpu is None:
            raise SedUserError(
                "--backend trt needs an NVIDIA GPU through cuda-python (pip install 'sed-deploy[trt]'); none is "
                "visible here; run with --backend ort"
            )
        check_gpu_fits(self.record, gpu)
        self.gpu = gpu
        self._trt = trt
        self._cuda = Cuda()
        self._closed = True
        self._logger = make_logger(trt)
        runtime: tensorrt.Runtime = trt.Runtime(self._logger)
        self._runtime = runtime
        for lib in self.record.plugins:
            load_plugin_library(trt, runtime.get_plugin_registry(), root / lib.file, lib)
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
        self._scratch = ContextMemory(self._cuda, self._stream)  # every decoder context's, one after another
        self._segments: TrtSegments | None = None
        if self.record.cer == "split":
            self._segments = TrtSegments(trt, self._cuda, self._stream, decoders, kernel, self._logger.errors,
                                         self._scratch)
        else:
            self._decoder: tensorrt.ICudaEngine = decoders["decoder"]
            self._setup_decoder()
        # Class-chunked decoding (`sed_runtime.chunked_decoder`, the bundle's decoder_chunked/ plans): None runs the
        # one-pass decoder; an int bounds the decoder's device memory to that many classes per step (rounded down
        # to a chunk size the plans were built for). Its plans are deserialised on first use.
        self.class_chunk: int | None = None
        self.cer_select: Any = None  # benchmark hook (sed-bench --kept) for the chunked decoder's CER points
        self._chunked: Any = None

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
            shape = dims(ctx.get_tensor_shape(name))
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
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        ctx: tensorrt.IExecutionContext = self._encoder.create_execution_context(strategy)
        self._enc_ctx = ctx
        plan = plan_buffers(self._io(self._encoder, ctx))
        if plan.dynamic:
            raise SedUserError(f"encoder.plan has data-dependent outputs {plan.dynamic}; rebuild the bundle")
        self._enc_buffers = {name: cuda.malloc(n) for name, n in {**plan.inputs, **plan.outputs}.items()}
        for name, ptr in self._enc_buffers.items():
            ctx.set_tensor_address(name, ptr)
        # Fixed shapes: one exact block, bound once, so the captured CUDA graph's addresses never move.
        self._enc_scratch = ContextMemory(cuda, self._stream)
        self._enc_scratch.bind(ctx)
        self._image_host = HostBuffer(cuda)
        self._image_host.ensure(plan.inputs["image"])
        self._graph_exec: Any = None
        self._cuda_graph = cuda_graph

    def _capture_encoder(self) -> None:
        """After one normal run: capture the fixed-shape encoder into a CUDA graph; fall back silently."""
        rt, cuda = self._cuda.rt, self._cuda
        capturable = getattr(self._enc_ctx, "is_stream_capturable", None)
        if capturable is not None and not capturable(int(self._stream)):
            self._cuda_graph = False
            return
        capturing = False
        try:
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            cuda.call(rt.cudaStreamBeginCapture(self._stream, mode))
            capturing = True
            ok = self._enc_ctx.execute_async_v3(int(self._stream))
            capturing = False
            graph = cuda.call(rt.cudaStreamEndCapture(self._stream))
            if not ok:
                raise RuntimeError("enqueue refused during capture")
            self._graph_exec = cuda.call(rt.cudaGraphInstantiate(graph, 0))
            cuda.call(rt.cudaGraphDestroy(graph))
        except Exception:  # any failure: never leave the stream in capture mode, run without the graph
            if capturing:
                rt.cudaStreamEndCapture(self._stream)
            self._graph_exec, self._cuda_graph = None, False
            rt.cudaGetLastError()  # clear the sticky capture error before the plain path runs

    def _setup_text(self) -> None:
        self._text_dev = DeviceBuffer(self._cuda)
        self._text_host = HostBuffer(self._cuda)
        self._text_ref: np.ndarray | None = None  # held, so its id can never be reused by another array
        self._text_print: tuple[tuple[int, ...], int] | None = None
        self._static_out: dict[str, DeviceBuffer] = {}
        self._out_host: dict[str, HostBuffer] = {}

    def _upload_text(self, text: np.ndarray) -> np.ndarray:
        """The pipeline passes the same embeddings for every image: upload them once. The array is held and
        fingerprinted, so a freed temporary whose id is reused, or an in-place edit, uploads again."""
        if text.dtype != np.float32 or not text.flags.c_contiguous:
            text = np.ascontiguousarray(text, dtype=np.float32)
        fingerprint = text_fingerprint(text)
        if text is not self._text_ref or fingerprint != self._text_print:
            self._text_host.ensure(text.nbytes)
            np.copyto(self._text_host.array(text.dtype, text.shape), text)
            self._cuda.h2d(self._text_dev.ensure(text.nbytes), self._text_host.ptr, text.nbytes, self._stream)
            self._text_ref, self._text_print = text, fingerprint
        return text

    def _setup_decoder(self) -> None:
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        ctx: tensorrt.IExecutionContext = self._decoder.create_execution_context(strategy)
        self._dec_ctx = ctx
        for name in FEATURES:  # encoder outputs feed the decoder in place
            ctx.set_tensor_address(name, self._enc_buffers[name])
        self._k_pinned = HostBuffer(self._cuda)  # pinned: the device copy of k is a truly async copy
        self._k_pinned.ensure(8)
        self._k_host = self._k_pinned.array(np.dtype(np.int64), (1,))
        # Standard-op decoder: k sizes TopK, so it is a shape input TensorRT reads from host memory at enqueue.
        # Plugin-node decoder: only the plugin reads k, on the GPU, so it needs a device copy.
        self._k_dev: DeviceBuffer | None = None
        if self._decoder.is_shape_inference_io("k"):
            ctx.set_tensor_address("k", self._k_host.ctypes.data)
        else:
            self._k_dev = DeviceBuffer(self._cuda)
            ctx.set_tensor_address("k", self._k_dev.ensure(self._k_host.nbytes))
        self._allocator = make_output_allocator(self._trt, self._cuda)
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

    def _features(self) -> dict[str, DeviceTensor]:
        """The encoder's outputs as device tensors, for decoders that bind them in place."""
        return {name: DeviceTensor(self._enc_buffers[name], dims(self._enc_ctx.get_tensor_shape(name)),
                                   self._dtype(self._encoder, name)) for name in FEATURES}

    def chunk_size(self, chunk: int) -> int:
        """The classes per step a requested chunk runs with (`trt_plans.plan_chunk`)."""
        return plan_chunk(self.record, chunk, str(self.bundle.root))

    def _decode_chunked(self, text: np.ndarray, topk: int | None, chunk: int) -> BackendResult:
        from ..chunked_decoder import decode_chunked
        from .trt_chunked import TrtChunkedSegments

        size = self.chunk_size(chunk)
        if self._chunked is None:
            engines = {role: self._deserialize(role) for role in self.record.chunked_roles}
            segments = TrtSegments(self._trt, self._cuda, self._stream, engines, None, self._logger.errors,
                                   self._scratch)
            self._chunked = TrtChunkedSegments(segments, self._cuda, self._stream)
        return decode_chunked(self._chunked, self._features(), text, topk, size, self.cer_select)

    def decoder_memory(self) -> DecoderMemory | None:
        """The GPU memory the decoder adds (one pass, or one chunk of the chunked plans)."""
        return DecoderMemory.from_settings(self.bundle.manifest["model"]["sed"], len(self.bundle.templates), "trt")

    def free_memory_bytes(self) -> int | None:
        return self._cuda.free_bytes()

    def decode(self, features: ImageFeatures, text: np.ndarray, topk: int | None) -> BackendResult:
        from ..profile_checks import check_classes

        self._check_features(features, self._generation)
        n = int(text.shape[0])
        if self.class_chunk is not None:  # any N: the chunked plans see at most one chunk of classes
            return self._decode_chunked(text, topk, self.class_chunk)
        check_classes(n, self.record.classes, "this bundle's decoder.plan")
        cuda, stream, s = self._cuda, self._stream, int(self._stream)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        text = self._upload_text(text)
        k = n if topk is None else min(topk, n)
        if self._segments is not None:
            feats = self._features()
            dev_text = DeviceTensor(self._text_dev.ptr, tuple(text.shape), np.dtype(np.float32))
            probs, alive, kept_split = run_split_decoder(self._segments, feats, dev_text, n, k)
            timings["decoder"] = (time.perf_counter() - t0) * 1e3
            kept_out = None if topk is None else [x.astype(np.int32) for x in kept_split]
            return BackendResult(scores=probs, rows=alive.astype(np.int32), kept=kept_out, timings_ms=timings)
        ctx = self._dec_ctx
        ctx.set_tensor_address("text", self._text_dev.ptr)
        if not ctx.set_input_shape("text", tuple(text.shape)):
            raise SedUserError(f"decoder.plan refuses text of shape {text.shape}; rebuild the bundle")
        self._k_host[0] = k
        if self._k_dev is not None:
            cuda.h2d(self._k_dev.ptr, self._k_pinned.ptr, self._k_host.nbytes, stream)
        plan = plan_buffers(self._io(self._decoder, ctx))
        static, dynamic = decoder_output_buffers(plan), plan.dynamic
        for name, nbytes in static.items():
            buf = self._static_out.setdefault(name, DeviceBuffer(cuda))
            ctx.set_tensor_address(name, buf.ensure(nbytes))
        self._scratch.bind(ctx)
        for name in dynamic:
            if name not in self._dynamic_outputs:
                ctx.set_output_allocator(name, self._allocator)
                self._dynamic_outputs.append(name)
        if not ctx.execute_async_v3(s):
            raise RuntimeError(f"decoder enqueue failed: {self._logger.errors[-1:]}")

        outputs: dict[str, np.ndarray] = {}
        shapes = {name: dims(ctx.get_tensor_shape(name)) for name in static}
        shapes.update({name: self._allocator.shapes[name] for name in dynamic})
        if "probs" in shapes:  # kept-only rows: the N x h x w block stays on the device (125 MB at N = 847)
            del shapes["scores"]
        for name, shape in shapes.items():
            dtype = self._dtype(self._decoder, name)
            nbytes = int(np.prod(shape)) * dtype.itemsize if len(shape) else dtype.itemsize
            host = self._out_host.setdefault(name, HostBuffer(cuda))
            host.ensure(nbytes)
            src = self._allocator.buffers[name].ptr if name in dynamic else self._static_out[name].ptr
            if nbytes:
                cuda.d2h(host.ptr, src, nbytes, stream)
        cuda.sync(stream)
        for name, shape in shapes.items():
            outputs[name] = self._out_host[name].array(self._dtype(self._decoder, name), shape).copy()
        timings["decoder"] = (time.perf_counter() - t0) * 1e3
        kept = None if topk is None else [outputs[f"kept{i}"].astype(np.int32) for i in range(3)]
        if "probs" in outputs:
            return BackendResult(scores=outputs["probs"].astype(np.float32, copy=False),
                                 rows=outputs["kept2"].astype(np.int32), kept=kept, timings_ms=timings)
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
            "device_memory": {
                "encoder_scratch_bytes": self._enc_scratch.reserved,
                "decoder_scratch_bytes": self._scratch.reserved,
                "decoder_scratch_peak_bytes": self._scratch.peak,
                "at_profile_max_bytes": dict(self.record.device_memory),
            },
            "cer": self.record.cer if self.record.cer != "split" else
            f"split ({'kernel library' if self.record.kernel else 'host rule'} between segment plans)",
            "decoder": "one pass over all classes" if self.class_chunk is None else
            f"class-chunked plans, {self.chunk_size(self.class_chunk)} classes per step",
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
            if getattr(self, "_chunked", None) is not None:
                self._chunked.close()
            for h in (*self._out_host.values(), self._text_host, self._image_host,
                      *([self._k_pinned] if hasattr(self, "_k_pinned") else [])):
                h.close()
            self._scratch.close()
            self._enc_scratch.close()
            if self._segments is None:
                self._allocator.close()
            if self._graph_exec is not None:
                self._cuda.rt.cudaGraphExecDestroy(self._graph_exec)
            self._cuda.rt.cudaStreamDestroy(self._stream)
        except Exception:  # teardown must never raise (interpreter shutdown, lost context)
            pass

    def __del__(self) -> None:
        self.close()
