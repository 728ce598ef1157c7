"""CUDA memory for the TensorRT backend through cuda-python: checked calls, growable pinned and device buffers,
the IOutputAllocator for data-dependent outputs, and one device block shared by execution contexts.

Only the TensorRT modules import this; it never imports TensorRT itself (the allocator class is built from the
module the caller passes).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

from .trt_env import cudart


def grow(capacity: int, needed: int, factor: float = 2.0) -> int:
    """New capacity for a growable buffer: at least `needed`, growing by `factor` to avoid reallocating every call."""
    return capacity if needed <= capacity else max(needed, int(capacity * factor))


class Cuda:
    """Thin checked wrapper over cuda-python's runtime: every call raises on a CUDA error."""

    def __init__(self) -> None:
        self.rt = cudart()

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

    def free_bytes(self) -> int:
        """Free memory on the current device (what cudaMemGetInfo reports)."""
        free, _total = self.call(self.rt.cudaMemGetInfo())
        return int(free)


class HostBuffer:
    """A growable pinned host buffer."""

    def __init__(self, cuda: Cuda) -> None:
        self.cuda, self.ptr, self.capacity = cuda, 0, 0
        self.view = np.zeros(0, np.uint8)

    def ensure(self, nbytes: int) -> None:
        nbytes = max(int(nbytes), 1)
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


class DeviceBuffer:
    """A growable device buffer. Never hands out a null pointer: a zero-byte request still gets a real
    allocation (TensorRT treats a null address for a zero-size tensor as an error)."""

    def __init__(self, cuda: Cuda, factor: float = 2.0) -> None:
        self.cuda, self.ptr, self.capacity, self.factor = cuda, 0, 0, factor

    def ensure(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if nbytes > self.capacity:
            self.cuda.free(self.ptr)
            self.capacity = grow(self.capacity, nbytes, self.factor)
            self.ptr = self.cuda.malloc(self.capacity)
        return self.ptr

    def close(self) -> None:
        self.cuda.free(self.ptr)
        self.ptr = self.capacity = 0


class ContextMemory:
    """One user-managed device block for execution contexts that run one after another on one stream.

    Contexts are created with the USER_MANAGED allocation strategy, so TensorRT reserves nothing for the profile
    maximum (N up to 1024, every class kept). Before each enqueue the context reports what its current input
    shapes need (`update_device_memory_size_for_shapes`) and gets this block, grown when needed: the footprint
    follows the shapes actually run, and the split decoder's four contexts share one block instead of four.
    Sharing is safe because the stream orders their kernels; growing synchronises first, since work already
    enqueued may still use the old block.
    """

    def __init__(self, cuda: Cuda, stream: Any, factor: float = 1.25) -> None:
        self.cuda, self.stream = cuda, stream
        self.block = DeviceBuffer(cuda, factor)
        self.peak = 0  # the most any one enqueue needed

    def bind(self, ctx: Any) -> None:
        """Call after every input shape of `ctx` is set, before its enqueue."""
        need = int(ctx.update_device_memory_size_for_shapes())
        if need > self.block.capacity and self.block.ptr:
            self.cuda.sync(self.stream)
        ptr = self.block.ensure(need)
        ctx.set_device_memory(ptr, self.block.capacity)
        self.peak = max(self.peak, need)

    @property
    def reserved(self) -> int:
        return self.block.capacity

    @property
    def ptr(self) -> int:
        return self.block.ptr

    def close(self) -> None:
        self.block.close()


def make_output_allocator(trt: Any, cuda: Cuda) -> Any:
    """An IOutputAllocator keeping one growable device buffer per data-dependent output and its final shape."""

    class _OutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, DeviceBuffer] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int:
            buf = self.buffers.setdefault(tensor_name, DeviceBuffer(cuda))
            return buf.ensure(int(size))  # cudaMalloc is 256-byte aligned, beyond any alignment TensorRT asks

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            return self.reallocate_output_async(tensor_name, memory, size, alignment, 0)

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

        def close(self) -> None:
            for b in self.buffers.values():
                b.close()

    return _OutputAllocator()
