"""The top-k-union CUDA kernel through its C library (`libsed_topk_union.so`, built from kernels/ by CMake).

ctypes, not a Python extension: the library needs no TensorRT and no torch, so the torch-free runtime can run
the kernel between the split decoder's TensorRT engines, on their stream, with device pointers it already has.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from .errors import SedUserError

ABI_VERSION = 1
DTYPES = {"float32": 0, "float16": 1}
CUDA_ERROR_INVALID_VALUE = 1


class TopkUnionLibrary:
    """`launch` enqueues the kernel; it never synchronises (the count stays on the device)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise SedUserError(f"kernel library {path} not found; build it with CMake (see kernels/README.md)")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            reason = str(e).splitlines()[0][:200]
            raise SedUserError(f"kernel library {path} cannot be loaded ({reason}); is the CUDA runtime it was "
                               "linked against installed?") from None
        for symbol in ("sed_topk_union_abi_version", "sed_topk_union_workspace_size", "sed_topk_union"):
            if not hasattr(lib, symbol):
                raise SedUserError(f"{path} is not the top-k-union kernel library (no {symbol}); rebuild kernels/")
        lib.sed_topk_union_abi_version.restype = ctypes.c_int
        version = int(lib.sed_topk_union_abi_version())
        if version != ABI_VERSION:
            raise SedUserError(f"kernel library {path} has ABI version {version}, this runtime needs {ABI_VERSION}; "
                               "rebuild kernels/ from this checkout")
        lib.sed_topk_union_workspace_size.restype = ctypes.c_size_t
        lib.sed_topk_union_workspace_size.argtypes = [ctypes.c_int64]
        lib.sed_topk_union.restype = ctypes.c_int
        lib.sed_topk_union.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
        ]
        self.path, self._lib = path, lib

    def workspace_size(self, num_classes: int) -> int:
        return int(self._lib.sed_topk_union_workspace_size(int(num_classes)))

    def launch(
        self, logits: int, dtype: str, num_classes: int, num_pixels: int, k: int, kept: int, count: int,
        workspace: int, workspace_bytes: int, stream: int, k_device: int = 0,
    ) -> None:
        """logits (C, P) and kept int64[C], count int64[1], workspace: device pointers; raises on a CUDA error."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        err = self._lib.sed_topk_union(
            logits or None, DTYPES[dtype], int(num_classes), int(num_pixels), k_device or None, int(k),
            kept or None, count or None, workspace or None, int(workspace_bytes), stream or None,
        )
        if err != 0:
            raise RuntimeError(f"top-k-union kernel failed with CUDA error {err}")
