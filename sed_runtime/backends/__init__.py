"""Backends behind one interface (`Backend`); `make_backend` picks one from what the user passed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..errors import SedUserError
from .base import Backend, BackendResult, InputSpec

__all__ = ["Backend", "BackendResult", "InputSpec", "make_backend", "BACKENDS"]

BACKENDS = ("auto", "ort", "openvino", "trt", "torch")


def openvino_installed() -> bool:
    """Whether the openvino extra is installed (found without importing it: `--help` stays fast)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def make_backend(
    backend: str = "auto",
    *,
    bundle: Path | None = None,
    model: str | Path = "sed-tiny",
    checkpoint: Path | None = None,
    device: str = "cpu",
    providers: str = "cpu",
    allow_pickle: bool = False,
    low_memory: bool = False,
    torch_precision: str = "fp32",
    openvino_precision: str = "fp32",
) -> Backend:
    """auto: TensorRT for a bundle with plans (when their TensorRT and a GPU are here); else, for a bundle on the
    CPU, OpenVINO when it is installed (measured faster than ONNX Runtime on the same bundles, README) unless
    --low-memory, GPU providers or a GPU device point at ONNX Runtime, else ONNX Runtime; the PyTorch reference
    for a model name or config."""
    backend, _, variant = backend.partition(":")
    if backend not in BACKENDS:
        raise SedUserError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if variant:  # `openvino:bf16`: bf16 inference on CPUs with bf16/AMX units (README: measured speed and accuracy)
        if (backend, variant) != ("openvino", "bf16"):
            raise SedUserError(f"--backend {backend}:{variant}: the only variant is openvino:bf16 (bf16 inference)")
        openvino_precision = variant
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise SedUserError(f"unknown --device {device!r}; use cpu, cuda or cuda:N")
    if backend == "auto":
        backend = "ort" if bundle is not None else "torch"
        if bundle is not None:
            from .trt_env import auto_backend

            backend, why = auto_backend(bundle)
            if backend == "ort" and providers == "cpu" and device == "cpu" and not low_memory and openvino_installed():
                backend = "openvino"
            if why:
                engine = "OpenVINO" if backend == "openvino" else "ONNX Runtime"
                print(f"note: {why}; running {engine} (--backend {backend})", file=sys.stderr)
    if backend == "trt":
        if bundle is None:
            raise SedUserError(
                "--backend trt runs a bundle's plans: build one with `sed-export build --engine tensorrt`"
            )
        from .trt_backend import TrtBackend

        return TrtBackend(bundle)
    if backend == "openvino":
        if bundle is None:
            raise SedUserError("--backend openvino runs a bundle: build one with `sed-export build` and pass "
                               "its folder")
        if device != "cpu":
            raise SedUserError(f"--device {device} is for --backend torch; the openvino backend runs on the CPU")
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(bundle, precision=openvino_precision)
    if backend == "ort":
        if bundle is None:
            raise SedUserError("--backend ort runs a bundle: build one with `sed-export build` and pass its folder")
        if device != "cpu":
            raise SedUserError(f"--device {device} is for --backend torch; ONNX Runtime takes its device from "
                               "--providers (cuda, tensorrt or auto)")
        from .ort_backend import OrtBackend

        return OrtBackend(bundle, providers=providers, low_memory=low_memory)
    from .torch_backend import TorchBackend

    if bundle is not None:  # the reference model the bundle was exported from
        from ..bundle import Bundle

        b = Bundle.open(bundle)
        weights = b.manifest["weights"]
        if weights.get("source") == "checkpoint" and checkpoint is None:
            raise SedUserError(
                f"bundle {b.root} was built from checkpoint {weights.get('checkpoint_name')}; "
                "pass it with --checkpoint to run --backend torch"
            )
        return TorchBackend(
            b.manifest["model"], checkpoint, device=device, allow_pickle=allow_pickle, seed=int(weights.get("seed", 0)),
            precision=torch_precision,
        )
    return TorchBackend(model, checkpoint, device=device, allow_pickle=allow_pickle, precision=torch_precision)
