"""What the numbers were measured on, and memory: machine, versions, host RSS (Linux /proc), device memory."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from sed_runtime.memory import peak_rss_mb, reset_peak_rss, rss_mb

__all__ = ["cpu_model", "machine_info", "peak_rss_mb", "reset_peak_rss", "rss_mb"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    phys = core = None
    for line in text.splitlines() + [""]:
        if line.startswith("physical id"):
            phys = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            core = line.split(":", 1)[1].strip()
        elif not line.strip():
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    return len(cores) or None


def machine_info(torch_device: str | None = None) -> dict[str, Any]:
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch_device and torch_device.startswith("cuda"):
        import torch

        idx = torch.device(torch_device).index or 0
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return info


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("sed-deploy", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "open_clip_torch", "timm"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def thread_info() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            out[var] = os.environ[var]
    try:
        import sys

        if "torch" in sys.modules:
            out["torch_threads"] = sys.modules["torch"].get_num_threads()
    except Exception:  # pragma: no cover - informative only
        pass
    return out
