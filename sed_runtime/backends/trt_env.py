"""The TensorRT and CUDA environment of this process: which runtime module a bundle's plans need, which GPU is
here, what `--backend auto` picks, plugin libraries (loaded once per process), TensorRT's logger.

The runtime module is the one the manifest names (`tensorrt`, or `tensorrt_rtx_bindings` for TensorRT-RTX
plans; the API is the same). CUDA goes through cuda-python (`cuda.bindings.runtime`), NVIDIA's maintained binding.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any

from ..bundle import Bundle
from ..errors import SedUserError
from .trt_plans import RUNTIME_INSTALL, RUNTIME_MODULES, PlanRecord, check_engines_here, choose_backend, parse_engines


def cudart() -> Any:
    """cuda-python's runtime module (12.6+ layout first, then the older `cuda.cudart`)."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        from cuda import cudart as legacy  # type: ignore[attr-defined,unused-ignore]

        return legacy


def current_gpu() -> dict[str, Any] | None:
    """Name and compute capability of CUDA device 0 via cuda-python; None without cuda-python, driver or GPU."""
    try:
        rt = cudart()
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
    """What `--backend auto` runs for this bundle (and, when it falls back to ort, why): trt only when the plans'
    TensorRT release, the GPU and the libraries' architectures all match; the checks are the backend's own."""
    manifest = Bundle.open(bundle_dir, verify=False).manifest
    if not manifest.get("engines"):
        return choose_backend(False, False, False)
    try:
        record = parse_engines(manifest, str(bundle_dir))
    except SedUserError as e:
        return choose_backend(True, True, True, str(e))
    if not trt_available(record.engine):
        return choose_backend(True, False, False)
    gpu = current_gpu()
    if gpu is None:
        return choose_backend(True, True, False)
    trt = runtime_module(record.engine)
    try:
        check_engines_here(record, trt.__name__, str(getattr(trt, "__version__", "?")), gpu)
    except SedUserError as e:
        return choose_backend(True, True, True, str(e).split(";")[0])
    return choose_backend(True, True, True)


_plugin_lock = threading.Lock()
_loaded_plugins: dict[tuple[str, str], str] = {}  # (runtime module, library sha256) -> path it was loaded from


def load_plugin_library(trt: Any, registry: Any, path: Path, record: PlanRecord) -> None:
    """Register a plugin library's creators once per process and TensorRT module.

    The registry is process-wide: loading the same library a second time (a second backend, or the same plugin
    copied into another bundle) fails because its creators are registered already. Keyed by content, so a
    bundle carrying the same library at another path reuses the first registration.
    """
    key = (trt.__name__, record.sha256)
    with _plugin_lock:
        if key in _loaded_plugins:
            return
        if registry.load_library(str(path)) is None:
            others = [p for (mod, _), p in _loaded_plugins.items() if mod == trt.__name__]
            hint = (f"; another build of it is loaded already from {others[0]}: run one bundle per process"
                    if others else f"; it must be built against {trt.__name__} of the plans")
            raise SedUserError(f"plugin library {path} could not be loaded by {trt.__name__}{hint}")
        _loaded_plugins[key] = str(path)


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps error messages for the one-line reports."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return _Logger()


def dims(value: Any) -> tuple[int, ...]:
    """TensorRT Dims as a tuple (the stubs declare indexing and len, not iteration)."""
    return tuple(int(value[i]) for i in range(len(value)))
