"""The split decoder's executor on TensorRT: the segment plans run on the backend's one stream and pass device
tensors to each other; the top-k union runs between them (kernel library, or the ranking rule on the host).

`sed_runtime.split_decoder.run_split_decoder` drives it exactly as it drives the ONNX Runtime executor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SedUserError
from .cuda_memory import ContextMemory, Cuda, DeviceBuffer, HostBuffer
from .trt_env import dims


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in device memory: what the split decoder's segments pass to each other."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize if self.shape else self.dtype.itemsize


class TrtSegments:
    """`SegmentExecutor` over the segment plans: device tensors in and out, on the backend's one stream.

    Each segment owns its output buffers, so the pre-rejection skips stay valid while the layers run. The four
    contexts are user-managed and share one scratch block (`ContextMemory`) sized for the shapes actually run.
    The host needs the kept count to set the next plan's input shapes, so each CER point synchronises once.
    One kept-index buffer serves every CER point: the layer reading it is enqueued on the same stream before
    the next point writes it.
    """

    def __init__(self, trt: Any, cuda: Cuda, stream: Any, engines: Mapping[str, Any], kernel: Any,
                 errors: list[str], scratch: ContextMemory | None = None) -> None:
        self.trt, self.cuda, self.stream, self.kernel, self.errors = trt, cuda, stream, kernel, errors
        self.engines = dict(engines)
        self.scratch = scratch or ContextMemory(cuda, stream)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = {name: e.create_execution_context(strategy) for name, e in self.engines.items()}
        self.outputs: dict[tuple[str, str], DeviceBuffer] = {}
        self.keep, self.count, self.workspace = DeviceBuffer(cuda), DeviceBuffer(cuda), DeviceBuffer(cuda)
        self.host = HostBuffer(cuda)
        self.active_profile: dict[str, int] = {}  # segment -> the profile its context runs (plans with several)

    def _select_profile(self, segment: str, ctx: Any, feeds: Mapping[str, Any]) -> None:
        """A plan with several optimisation profiles (the class-chunked plans: one static profile per chunk size)
        runs the first one that admits every input's shape; switching is a stream-ordered call, done only when the
        shapes change profile."""
        engine = self.engines[segment]
        count = int(getattr(engine, "num_optimization_profiles", 1))
        if count <= 1:
            return
        dynamic = [name for name, t in feeds.items() if any(d < 0 for d in dims(engine.get_tensor_shape(name)))]
        for index in range(count):
            if all(_admits(engine.get_tensor_profile_shape(name, index), feeds[name].shape) for name in dynamic):
                break
        else:
            shapes = ", ".join(f"{name} {tuple(feeds[name].shape)}" for name in dynamic)
            raise SedUserError(f"{segment}.plan has no profile for {shapes}; rebuild the bundle with --force")
        if self.active_profile.get(segment, 0) != index:
            if not ctx.set_optimization_profile_async(index, int(self.stream)):
                raise RuntimeError(f"{segment}: switching to profile {index} failed: {self.errors[-1:]}")
            self.active_profile[segment] = index

    def _dtype(self, segment: str, name: str) -> np.dtype[Any]:
        return np.dtype(self.trt.nptype(self.engines[segment].get_tensor_dtype(name)))

    def run(self, segment: str, feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        trt, ctx, engine = self.trt, self.contexts[segment], self.engines[segment]
        out_names = []
        self._select_profile(segment, ctx, feeds)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                out_names.append(name)
                continue
            t: DeviceTensor = feeds[name]
            want = self._dtype(segment, name)
            if t.dtype != want:
                raise RuntimeError(f"{segment}: input {name} is {t.dtype}, the plan expects {want}")
            if not ctx.set_input_shape(name, t.shape):
                raise SedUserError(f"{segment}.plan refuses {name} of shape {t.shape}; rebuild the bundle")
            ctx.set_tensor_address(name, t.ptr)
        result = {}
        for name in out_names:
            shape = dims(ctx.get_tensor_shape(name))
            dev = DeviceTensor(0, shape, self._dtype(segment, name))
            buf = self.outputs.setdefault((segment, name), DeviceBuffer(self.cuda))
            result[name] = DeviceTensor(buf.ensure(dev.nbytes), shape, dev.dtype)
            ctx.set_tensor_address(name, result[name].ptr)
        self.scratch.bind(ctx)
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
        return DeviceTensor(keep_ptr, (len(keep),), np.dtype(np.int64)), keep

    def to_host(self, tensor: Any) -> np.ndarray:
        self.host.ensure(tensor.nbytes)
        self.cuda.d2h(self.host.ptr, tensor.ptr, tensor.nbytes, self.stream)
        self.cuda.sync(self.stream)
        return self.host.array(tensor.dtype, tensor.shape).copy()

    def close(self) -> None:
        for b in (*self.outputs.values(), self.keep, self.count, self.workspace):
            b.close()
        self.host.close()
        self.scratch.close()


def _admits(profile: Any, shape: tuple[int, ...]) -> bool:
    """Whether an input shape lies inside one profile's (min, opt, max) dimensions."""
    lo, _, hi = (dims(d) for d in profile)
    return len(lo) == len(shape) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
