"""The top-k-union CUDA kernel as a PyTorch op, compiled on first use.

`load_topk_union_op()` builds `kernels/topk_union.cu` + `kernels/torch/topk_union_op.cpp` with
`torch.utils.cpp_extension.load` (cached by torch under $TORCH_EXTENSIONS_DIR) and registers
`torch.ops.sed_kernels.topk_union(Tensor logits, int k) -> Tensor`. Building needs nvcc and a CUDA build of
torch, not a GPU; running needs a GPU. The op follows `sed_runtime.topk_union_rule` exactly, which equals
`sed_export.cer.topk_union` whenever no tie straddles a pixel's k-th place.

The torch backend on a GPU ranks CER with it (`TorchBackend(cer_kernel="auto")`, the default, sets
`SedDecoder.select_classes = topk_union_cuda` when the op builds); same (T, H, W) input and sorted int64 output
as `cer.topk_union`.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
SOURCES = (KERNELS_DIR / "topk_union.cu", KERNELS_DIR / "torch" / "topk_union_op.cpp")
EXTENSION_NAME = "sed_topk_union"
DEFAULT_ARCH_LIST = "8.0;8.6;9.0"  # A100, A6000, H100/H200; used only when no GPU tells torch what to build for

_lock = threading.Lock()
_loaded = False


class CudaOpUnavailable(RuntimeError):
    """The CUDA op cannot be built or run here; the message says what is missing."""


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - the export extra always has torch
        raise CudaOpUnavailable("torch is not installed (pip install -e '.[export]')") from exc
    return torch


def build_problem() -> str | None:
    """Why the op cannot be built here, or None when it can (nvcc + CUDA torch + sources present)."""
    torch = _torch()
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; the CUDA op needs a CUDA build of torch"
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or shutil.which("nvcc") is None and not (Path(home) / "bin" / "nvcc").exists():
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    if not (Path(home) / "include" / "cuda_runtime.h").exists():
        # torch guesses CUDA_HOME from `which nvcc`; a /usr/local/bin/nvcc link makes it /usr/local.
        nvcc = shutil.which("nvcc")
        guesses = ([Path(nvcc).resolve().parent.parent] if nvcc else []) + [Path("/usr/local/cuda")]
        found = [g for g in guesses if (g / "include" / "cuda_runtime.h").exists()]
        hint = f" (e.g. CUDA_HOME={found[0]})" if found else ""
        return f"CUDA_HOME={home} has no include/cuda_runtime.h: set CUDA_HOME to the toolkit root{hint}"
    missing = [str(p) for p in SOURCES if not p.exists()]
    if missing:
        return f"kernel sources missing: {', '.join(missing)}"
    return None


def load_topk_union_op(verbose: bool = False) -> Any:
    """Compile (once per process; torch caches the build) and register the op; returns its OpOverloadPacket."""
    global _loaded
    torch = _torch()
    with _lock:
        if not _loaded:
            problem = build_problem()
            if problem is not None:
                raise CudaOpUnavailable(f"cannot build the top-k-union CUDA op: {problem}")
            from torch.utils import cpp_extension

            env_set = "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available()
            if env_set:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
            try:
                cpp_extension.load(
                    name=EXTENSION_NAME,
                    sources=[str(p) for p in SOURCES],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3"],
                    is_python_module=False,
                    verbose=verbose,
                )
            except (RuntimeError, OSError) as exc:
                raise CudaOpUnavailable(f"building the top-k-union CUDA op failed: {exc}") from exc
            finally:
                if env_set:
                    del os.environ["TORCH_CUDA_ARCH_LIST"]
            _loaded = True
    return torch.ops.sed_kernels.topk_union


def topk_union_cuda(logits: Any, k: int) -> Any:
    """Sorted int64 indices (on the logits' device) of the classes in the top-k of at least one pixel.

    logits: (C, H, W) or (C, P), float32 or float16, on a CUDA device. Same contract as `cer.topk_union`
    (k < 1 refused, k >= C keeps every class); reads the kept count back, so it synchronises once.
    """
    torch = _torch()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not isinstance(logits, torch.Tensor) or not logits.is_cuda:
        raise ValueError("topk_union_cuda needs a CUDA tensor; use sed_export.cer.topk_union on the CPU")
    if logits.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"logits must be float32 or float16, got {logits.dtype}")
    op = load_topk_union_op()
    return op(logits, int(k))
