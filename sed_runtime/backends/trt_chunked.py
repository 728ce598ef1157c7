"""The class-chunked decoder's executor on TensorRT: for vocabularies whose one-pass decoder would not fit in GPU
memory.

`chunked_decoder.run_chunked_decoder` keeps what it holds for every alive class (each layer's input, guidance and
output) as numpy arrays on the host and hands a segment one chunk at a time. This executor uploads a chunk's
inputs, runs the segment's plan (`TrtSegments`: device tensors, one stream, a static profile per chunk size) and
fetches its outputs, so the device holds one chunk's working set however many classes the vocabulary has. The
encoder's outputs stay on the device and are bound in place. Chunks come in a few fixed sizes
(`fixed_chunk_sizes`), the sizes the plans' profiles were built for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..split_decoder import HostCer
from .cuda_memory import Cuda, DeviceBuffer, HostBuffer
from .trt_segments import DeviceTensor, TrtSegments


class TrtChunkedSegments(HostCer):
    """`SegmentExecutor` of the chunked segment plans: numpy in and out, device tensors (the encoder's features)
    bound in place; CER ranks on the host, where the runner keeps the aux maps."""

    fixed_chunk_sizes = True

    def __init__(self, segments: TrtSegments, cuda: Cuda, stream: Any) -> None:
        self.segments, self.cuda, self.stream = segments, cuda, stream
        self.staged: dict[tuple[str, str], tuple[HostBuffer, DeviceBuffer]] = {}
        self.fetched: dict[tuple[str, str], HostBuffer] = {}

    def _upload(self, segment: str, name: str, value: np.ndarray) -> DeviceTensor:
        host, dev = self.staged.setdefault((segment, name), (HostBuffer(self.cuda), DeviceBuffer(self.cuda)))
        value = np.ascontiguousarray(value)
        host.ensure(value.nbytes)
        np.copyto(host.array(value.dtype, value.shape), value)
        ptr = dev.ensure(value.nbytes)
        self.cuda.h2d(ptr, host.ptr, value.nbytes, self.stream)  # the pinned block is reused after this run's sync
        return DeviceTensor(ptr, tuple(value.shape), value.dtype)

    def run(self, segment: str, feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        device = {name: value if isinstance(value, DeviceTensor) else self._upload(segment, name, np.asarray(value))
                  for name, value in feeds.items()}
        outputs = self.segments.run(segment, device)
        for name, t in outputs.items():
            host = self.fetched.setdefault((segment, name), HostBuffer(self.cuda))
            host.ensure(t.nbytes)
            self.cuda.d2h(host.ptr, t.ptr, t.nbytes, self.stream)
        self.cuda.sync(self.stream)
        return {name: self.fetched[(segment, name)].array(t.dtype, t.shape).copy() for name, t in outputs.items()}

    def close(self) -> None:
        for host, dev in self.staged.values():
            host.close()
            dev.close()
        for host in self.fetched.values():
            host.close()
        self.segments.close()
