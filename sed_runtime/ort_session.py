"""ONNX Runtime sessions as every part of the runtime opens them: providers by name, threads, arena, and a
broken graph reported as a bundle problem in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import BundleError, SedUserError

__all__ = ["ort_providers", "ort_session"]


def ort_providers(choice: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "auto":
        preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        return [p for p in preferred if p in available] + ["CPUExecutionProvider"]
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(choice)
    if wanted is None or wanted not in available:
        raise SedUserError(
            f"ONNX Runtime provider {choice!r} is not available here (have: {', '.join(available)}); "
            "use --providers cpu or install onnxruntime-gpu"
        )
    return [wanted, "CPUExecutionProvider"]


def ort_session(path: Path, providers: list[str], threads: int | None, arena: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # Without the CPU arena, freed intermediates go back to the system: about half the decoder's peak RSS for
    # large N with every class kept, for some speed (see README, --low-memory).
    opts.enable_cpu_mem_arena = arena
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types for broken graphs
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BundleError(f"{path} cannot be loaded by ONNX Runtime ({first}); rebuild the bundle") from None
