"""ONNX -> TensorRT plans, for TensorRT 10/11 (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx_bindings`).

The only module of `sed_export` that touches TensorRT, and only through the module object passed in, so one
code path serves both builders (TensorRT-RTX exposes TensorRT 11's builder API). Networks are always
strongly typed: precision comes from the ONNX graph (our fp16 export keeps norms and CER ranking in fp32),
which is the only mode TensorRT 11 has and works the same on 10.x. TensorRT has no free-form plan metadata,
so everything a runtime must check (builder version, GPU, profiles, plugin hashes) goes into the bundle
manifest's `engines` section; plans are never prefixed with headers of our own.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sed_runtime.backends.trt_plans import RUNTIME_MODULES
from sed_runtime.bundle import sha256_file
from sed_runtime.errors import SedUserError

from .trt_profiles import (
    DEFAULT_CHUNK_MAX,
    ClassRange,
    Profile,
    check_network_inputs,
    chunk_sizes,
    chunked_decoder_profiles,
    class_range,
    decoder_profile,
    split_decoder_profiles,
)

if TYPE_CHECKING:  # the stubs (tensorrt-stubs, 10.x API) check our calls; at run time the module is a parameter
    import tensorrt

Log = Callable[[str], None]

ENGINES = ("tensorrt", "tensorrt-rtx")
ENGINE_CHOICES = ("auto", "onnx", *ENGINES)
# import names, first match wins (the RTX wheels name their module tensorrt_rtx_bindings); the runtime's table,
# so a plan is always loaded by the module flavour that built it
MODULES = RUNTIME_MODULES
INSTALL_HINTS = {
    "tensorrt": "pip install tensorrt (NVIDIA's index; needs a CUDA GPU to build)",
    "tensorrt-rtx": "pip install 'sed-deploy[rtx]' (tensorrt-rtx-cu13-libs + tensorrt-rtx-cu13-bindings)",
}
PLUGIN_DIR = "plugins"
TIMING_CACHE_DIR = ".timing-cache"
# TensorRT-RTX's documented default targets for AOT engines built without a GPU (Ampere and later RTX parts).
RTX_DEFAULT_TARGETS = "TensorRT-RTX default portable targets (compute capability 8.0/8.6/8.9/12.x; JIT on the GPU)"


def import_trt(engine: str) -> ModuleType:
    """The TensorRT module for `engine` ('tensorrt' or 'tensorrt-rtx'); SedUserError naming the install if absent.

    A module without `Builder` is refused too: `tensorrt-stubs` and PyPI's placeholder leave an importable but
    empty `tensorrt` namespace package behind.
    """
    if engine not in MODULES:
        raise SedUserError(f"unknown TensorRT engine {engine!r}; choose one of {', '.join(ENGINES)}")
    for name in MODULES[engine]:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        except Exception as e:  # a broken native library raises OSError/RuntimeError at import
            raise SedUserError(f"{name} is installed but cannot be loaded ({str(e).splitlines()[0][:160]})") from None
        if hasattr(mod, "Builder"):
            return mod
    flavour = "TensorRT-RTX" if engine == "tensorrt-rtx" else "TensorRT"
    raise SedUserError(
        f"--engine {engine}: {flavour} (module {MODULES[engine][0]}) is not installed; {INSTALL_HINTS[engine]}"
    )


def is_rtx(trt: ModuleType) -> bool:
    return "rtx" in trt.__name__


def engine_name(trt: ModuleType) -> str:
    return "tensorrt-rtx" if is_rtx(trt) else "tensorrt"


def trt_version(trt: ModuleType) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def build_gpu() -> dict[str, Any] | None:
    """Name and compute capability of CUDA device 0 ('8.6'), or None when no GPU is visible.

    cuda-python first (what the runtime uses), then torch (always present where bundles are exported).
    """
    from sed_runtime.backends.trt_env import current_gpu

    gpu = current_gpu()
    if gpu is not None:
        return gpu
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    return None


@dataclass(frozen=True)
class EngineChoice:
    """What `--engine` resolved to: a TensorRT flavour, or None (ONNX only) with the line saying why."""

    engine: str | None
    note: str | None = None


def resolve_engine(choice: str) -> EngineChoice:
    """auto -> tensorrt when it and a GPU are present, else ONNX only (never TensorRT-RTX: its plans need its runtime).

    An explicit tensorrt/tensorrt-rtx that cannot build raises here, before any export work.
    """
    if choice not in ENGINE_CHOICES:
        raise SedUserError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {choice!r}")
    if choice == "onnx":
        return EngineChoice(None)
    if choice == "tensorrt-rtx":
        import_trt("tensorrt-rtx")
        return EngineChoice("tensorrt-rtx")
    try:
        import_trt("tensorrt")
    except SedUserError as e:
        if choice == "tensorrt":
            raise
        return EngineChoice(None, f"no TensorRT plans: {e}".replace("--engine tensorrt: ", ""))
    if build_gpu() is None:
        msg = "TensorRT is installed but no CUDA GPU is visible (TensorRT builds plans on the GPU they run on)"
        if choice == "tensorrt":
            raise SedUserError(f"--engine tensorrt: {msg}; build on the target machine or use --engine tensorrt-rtx")
        return EngineChoice(None, f"no TensorRT plans: {msg}")
    return EngineChoice("tensorrt")


def make_logger(trt: ModuleType, echo: Log | None = None, echo_level: str = "ERROR") -> Any:
    """A TensorRT logger that keeps errors and warnings, so failures can be reported as one line."""
    sev = trt.ILogger.Severity
    threshold = int(getattr(sev, echo_level))

    base: Any = trt.ILogger  # a run-time base class: the module is a parameter

    class _Logger(base):  # type: ignore[misc,valid-type,unused-ignore]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= int(sev.ERROR):
                self.errors.append(msg)
            elif level == int(sev.WARNING):
                self.warnings.append(msg)
            if echo is not None and level <= threshold:
                echo(f"[TensorRT] {msg}")

    return _Logger()


def _first_line(text: str, limit: int = 240) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line[:limit]


def _parser_error(parser: Any, index: int) -> str:
    err = parser.get_error(index)
    where = ""
    try:
        node, op = err.node_name(), err.node_operator()
        if node or op:
            where = f" at node {node or '?'} ({op or '?'})"
    except Exception:  # older bindings lack these accessors
        pass
    return f"{_first_line(str(err.desc()))}{where}"


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes (or a buffer such as IHostMemory) to a temporary name and rename: a plan is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def timing_cache_file(root: Path, trt: ModuleType, gpu: dict[str, Any] | None) -> Path:
    """Timing caches are only valid for one TensorRT version and GPU, so the file name carries both."""
    cc = gpu["compute_capability"].replace(".", "") if gpu else "nogpu"
    return root / f"{engine_name(trt)}-{trt_version(trt)}-sm{cc}.cache"


@dataclass
class PlanInfo:
    """What one build produced, for the manifest."""

    file: str
    onnx: str
    sha256: str
    bytes: int
    seconds: float
    profiles: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    device_memory: int | None = None  # scratch bytes at the profile maximum (None: not known at build time)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "onnx": self.onnx, "sha256": self.sha256, "bytes": self.bytes,
            "build_seconds": round(self.seconds, 2), "profiles": self.profiles, "warnings": len(self.warnings),
        }


def load_plugin_libraries(trt: ModuleType, registry: Any, libraries: Sequence[Path]) -> None:
    """Register each plugin library's creators; a missing or unloadable library is a user error."""
    for lib in libraries:
        if not Path(lib).is_file():
            raise SedUserError(f"plugin library {lib} not found; build it (see kernels/README.md) or fix the path")
        try:
            handle = registry.load_library(str(lib))
        except Exception as e:
            reason = _first_line(str(e))
            raise SedUserError(f"plugin library {lib} cannot be loaded by {trt.__name__} ({reason})") from None
        if handle is None:
            raise SedUserError(
                f"plugin library {lib} was not loaded by {trt.__name__} (wrong TensorRT build, missing symbols, "
                "or its plugins are already registered)"
            )


def build_engine(
    trt: ModuleType,
    onnx_path: Path,
    plan_path: Path,
    profiles: Sequence[Profile] = (),
    *,
    workspace_bytes: int | None = None,
    timing_cache_path: Path | None = None,
    plugin_libraries: Sequence[Path] = (),
    log: Log | None = None,
) -> PlanInfo:
    """Parse `onnx_path`, build one strongly typed plan with `profiles`, write it atomically to `plan_path`.

    `timing_cache_path` is read if it exists and rewritten after the build (ignored by TensorRT-RTX, where
    timing caches are no-ops). `workspace_bytes` None leaves TensorRT's default (all device memory).
    """
    logger = make_logger(trt, echo=log)
    builder: tensorrt.Builder = trt.Builder(logger)
    if builder is None:
        raise SedUserError(f"{trt.__name__} could not create a builder ({_first_line(' '.join(logger.errors))})")
    if plugin_libraries:
        load_plugin_libraries(trt, builder.get_plugin_registry(), plugin_libraries)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 10: opt in; 11 / RTX: strongly typed is the only mode
        flags |= 1 << int(strongly_typed)
    network: tensorrt.INetworkDefinition = builder.create_network(flags)
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        first = _parser_error(parser, 0) if parser.num_errors else _first_line(" ".join(logger.errors))
        raise SedUserError(f"{trt.__name__} cannot parse {onnx_path.name}: {first}")

    inputs = {}
    shape_inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs[t.name] = [int(t.shape[j]) for j in range(len(t.shape))]
        if t.is_shape_tensor:
            shape_inputs.append(t.name)
    check_network_inputs(inputs, shape_inputs, profiles, onnx_path.name)

    config: tensorrt.IBuilderConfig = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for prof in profiles:
        p: tensorrt.IOptimizationProfile = builder.create_optimization_profile()
        for r in prof.shapes:
            p.set_shape(r.name, trt.Dims(list(r.min)), trt.Dims(list(r.opt)), trt.Dims(list(r.max)))
        for r in prof.values:
            if r.name not in shape_inputs:  # e.g. k of the plugin-node decoder: read on the GPU, no range needed
                continue
            # k is an INT64 shape input: TensorRT 10's set_shape_input takes int32 or int64 shape tensors (the
            # 10.13 API documents both); the runtime passes its value from pinned host memory
            p.set_shape_input(r.name, list(r.min), list(r.opt), list(r.max))
        if config.add_optimization_profile(p) < 0:
            raise SedUserError(f"{onnx_path.name}: TensorRT refused the optimisation profile {prof.to_json()}")

    use_cache = timing_cache_path is not None and not is_rtx(trt)
    if use_cache:
        assert timing_cache_path is not None
        old = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(old)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            if log:
                log(f"timing cache {timing_cache_path} does not fit this TensorRT/GPU; starting a new one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        reason = _first_line(logger.errors[0]) if logger.errors else "no reason logged"
        hint = "; try a larger --workspace or leave it unset" if "OutOfMemory" in reason or "memory" in reason else ""
        raise SedUserError(f"{trt.__name__} could not build {plan_path.name} from {onnx_path.name}: {reason}{hint}")
    _write_atomic(plan_path, plan)
    device_memory = None if is_rtx(trt) else plan_device_memory(trt, plan)
    if use_cache:
        assert timing_cache_path is not None
        timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(timing_cache_path, config.get_timing_cache().serialize())
    return PlanInfo(
        file=plan_path.name, onnx=onnx_path.name, sha256=sha256_file(plan_path), bytes=plan_path.stat().st_size,
        seconds=seconds, profiles=[p.to_json() for p in profiles], warnings=list(logger.warnings),
        device_memory=device_memory,
    )


def plan_device_memory(trt: ModuleType, plan: Any) -> int | None:
    """Scratch memory a context of this plan reserves at the profile maximum with the default (static)
    allocation; the runtime allocates for the shapes it runs instead, and reports both. Needs the plan to
    deserialise, so only GPU builds know it (TensorRT-RTX plans deserialise only with a GPU)."""
    try:
        engine = trt.Runtime(make_logger(trt)).deserialize_cuda_engine(plan)
        size = getattr(engine, "device_memory_size_v2", None)
        return None if engine is None or size is None else int(size)
    except Exception:
        return None


def build_encoder_engine(trt: ModuleType, bundle_dir: Path, **kw: Any) -> PlanInfo:
    """encoder.onnx (fixed 1x3xSxS) -> encoder.plan; no profile needed."""
    return build_engine(trt, bundle_dir / "encoder.onnx", bundle_dir / "encoder.plan", (), **kw)


def build_decoder_engine(
    trt: ModuleType, bundle_dir: Path, text_shape: Sequence[int | str | None], classes: ClassRange,
    *, onnx_name: str = "decoder.onnx", **kw: Any,
) -> PlanInfo:
    """decoder ONNX -> decoder.plan with one profile: N over `classes`, k over 1 .. classes.max."""
    profile = decoder_profile(text_shape, classes)
    return build_engine(trt, bundle_dir / onnx_name, bundle_dir / "decoder.plan", (profile,), **kw)


@dataclass(frozen=True)
class EngineOptions:
    """`sed-export build` options that shape the plans."""

    engine: str | None  # tensorrt | tensorrt-rtx; None: ONNX only (then no plan-shaping option may be given)
    max_classes: int = 1024
    workspace_bytes: int | None = None
    timing_cache: Path | None = None  # None: <bundle parent>/.timing-cache/<engine>-<version>-sm<cc>.cache
    plugin_lib: Path | None = None
    cer: str = "auto"  # auto: plugin with plugin_lib, else standard-ops; or split
    kernel_lib: Path | None = None  # split: libsed_topk_union.so to run between the segments (else the host rule)
    chunk_max: int = DEFAULT_CHUNK_MAX  # class-chunked segment plans for chunks up to this many classes; 0: none

    @property
    def cer_mode(self) -> str:
        """How CER runs in the plans: inside the decoder as standard ops or plugin nodes, or between segments.

        The one place that refuses a bad combination of --engine, --cer, --plugin-lib and --kernel-lib, or a
        library file that is not there; the CLI asks before exporting anything, `build_plans` again.
        """
        if self.cer not in CER_MODES:
            raise SedUserError(f"--cer must be one of {', '.join(CER_MODES)}, got {self.cer!r}")
        mode = self.cer if self.cer != "auto" else ("plugin" if self.plugin_lib is not None else "standard-ops")
        if mode == "plugin" and self.plugin_lib is None:
            raise SedUserError("--cer plugin needs --plugin-lib (build it from kernels/ against your TensorRT)")
        if mode != "plugin" and self.plugin_lib is not None:
            raise SedUserError(f"--plugin-lib is only used with --cer plugin, not --cer {mode}")
        if mode != "split" and self.kernel_lib is not None:
            raise SedUserError("--kernel-lib is only used with --cer split (the kernel runs between decoder segments)")
        libraries = (("--plugin-lib", self.plugin_lib), ("--kernel-lib", self.kernel_lib))
        if self.engine is None:
            for flag, given in (*libraries, (f"--cer {self.cer}", self.cer != "auto")):
                if given:
                    raise SedUserError(f"{flag} shapes TensorRT plans; pass --engine tensorrt (or tensorrt-rtx)")
        for flag, lib in libraries:
            if lib is not None and not lib.is_file():
                raise SedUserError(f"{flag} {lib} not found; build it from kernels/ first (see kernels/README.md)")
        return mode


CER_MODES = ("auto", "standard-ops", "plugin", "split")


def plugin_decoder(src: Path, dst: Path, max_classes: int) -> None:
    """Write the plugin-node decoder variant (CER subgraphs -> one custom node each) next to the standard one."""
    import onnx

    from .onnx_plugin import replace_cer_with_plugin

    model = onnx.load(str(src))
    out = replace_cer_with_plugin(model, max_classes=max_classes)
    tmp = dst.with_name(f".{dst.name}.tmp")
    onnx.save_model(out, str(tmp))
    tmp.replace(dst)


def library_cuda_archs(lib: Path) -> str | None:
    """The CUDA architectures a kernel or plugin library was compiled for, read from the marker string our
    CMake build puts in it ("SED_CUDA_ARCHS=80,86,90"); None for a library without one (built elsewhere)."""
    import re

    found = re.search(rb"SED_CUDA_ARCHS=([0-9A-Za-z_,;-]+)\0", Path(lib).read_bytes())
    return None if found is None or found.group(1) == b"unknown" else found.group(1).decode()


def _copy_library(lib: Path, bundle_dir: Path) -> dict[str, Any]:
    """Copy a shared library (checked by `EngineOptions.cer_mode`) into the bundle's plugins/; its record."""
    (bundle_dir / PLUGIN_DIR).mkdir(exist_ok=True)
    copied = bundle_dir / PLUGIN_DIR / lib.name
    shutil.copy2(lib, copied)
    return {"file": f"{PLUGIN_DIR}/{copied.name}", "sha256": sha256_file(copied), "bytes": copied.stat().st_size,
            "source": str(lib), "cuda_archs": library_cuda_archs(copied)}


def _build_split_decoder(
    trt: ModuleType, bundle_dir: Path, graphs: dict[str, Any], classes: ClassRange, log: Log, **kw: Any
) -> dict[str, PlanInfo]:
    """One plan per decoder segment (decoder_split/*.plan), each with its own class-axis profile."""
    from sed_runtime.split_decoder import SEGMENTS

    missing = [s for s in SEGMENTS if s not in graphs]
    if missing:
        raise SedUserError(f"the bundle has no split decoder graphs ({', '.join(missing)}); export with --cer split")
    shapes = {s: {i["name"]: i["shape"] for i in graphs[s]["inputs"]} for s in SEGMENTS}
    profiles = split_decoder_profiles(shapes, classes)
    plans = {}
    for seg in SEGMENTS:
        onnx_path = bundle_dir / graphs[seg]["file"]
        info = build_engine(trt, onnx_path, onnx_path.with_suffix(".plan"), (profiles[seg],), **kw)
        info.file, info.onnx = str(Path(graphs[seg]["file"]).with_suffix(".plan")), graphs[seg]["file"]
        log(f"{seg + '.plan':14s} {info.seconds:6.1f} s ({info.bytes / 2**20:.1f} MiB)")
        plans[seg] = info
    return plans


def _build_chunked_decoder(
    trt: ModuleType, bundle_dir: Path, graphs: dict[str, Any], sizes: Sequence[int], log: Log, **kw: Any
) -> dict[str, PlanInfo]:
    """One plan per class-chunked segment (decoder_chunked/*.plan), each with a static profile per chunk size: the
    runtime falls back to them when one pass over every class would not fit in device memory."""
    from sed_runtime.chunked_decoder import SEGMENTS as CHUNKED

    missing = [s for s in CHUNKED if s not in graphs]
    if missing:
        raise SedUserError(f"the bundle has no class-chunked decoder graphs ({', '.join(missing)}); rebuild it "
                           "with this sed-deploy, or pass --max-chunk 0")
    shapes = {s: {i["name"]: i["shape"] for i in graphs[s]["inputs"]} for s in CHUNKED}
    profiles = chunked_decoder_profiles(shapes, sizes)
    plans, t0 = {}, time.perf_counter()
    for seg in CHUNKED:
        onnx_path = bundle_dir / graphs[seg]["file"]
        info = build_engine(trt, onnx_path, onnx_path.with_suffix(".plan"), profiles[seg], **kw)
        info.file, info.onnx = str(Path(graphs[seg]["file"]).with_suffix(".plan")), graphs[seg]["file"]
        plans[seg] = info
    total = sum(p.bytes for p in plans.values())
    log(f"decoder_chunked/ {time.perf_counter() - t0:4.1f} s ({len(plans)} plans, {total / 2**20:.1f} MiB, chunks of "
        f"{', '.join(map(str, sizes))} classes)")
    return plans


def build_plans(
    opts: EngineOptions, bundle_dir: Path, graphs: dict[str, Any], vocab_size: int, precision: str, log: Log = print,
) -> dict[str, Any]:
    """Build encoder.plan and the decoder plan(s) inside `bundle_dir` (the bundle being written); return `engines`."""
    cer = opts.cer_mode
    if opts.engine is None:
        raise SedUserError("no TensorRT engine chosen; pass --engine tensorrt (or tensorrt-rtx)")
    trt = import_trt(opts.engine)
    rtx = is_rtx(trt)
    classes = class_range(vocab_size, opts.max_classes)
    gpu = None if rtx else build_gpu()
    if not rtx and gpu is None:
        raise SedUserError("--engine tensorrt: no CUDA GPU is visible; TensorRT builds plans on the GPU they run on")
    cache = None
    if not rtx:
        cache = opts.timing_cache or timing_cache_file(bundle_dir.parent / TIMING_CACHE_DIR, trt, gpu)
    plugins: list[dict[str, Any]] = []
    kernel = None
    libs: list[Path] = []
    decoder_onnx = "decoder.onnx"
    if cer == "plugin":
        assert opts.plugin_lib is not None
        plugins.append(_copy_library(opts.plugin_lib, bundle_dir))
        libs.append(bundle_dir / plugins[-1]["file"])
        decoder_onnx = "decoder_plugin.onnx"
        plugin_decoder(bundle_dir / "decoder.onnx", bundle_dir / decoder_onnx, classes.max)
    if cer == "split" and opts.kernel_lib is not None:
        from sed_runtime.kernel_lib import TopkUnionLibrary

        TopkUnionLibrary(opts.kernel_lib)  # refuse a wrong library now, not on the user's GPU
        kernel = _copy_library(opts.kernel_lib, bundle_dir)
    kw: dict[str, Any] = {"workspace_bytes": opts.workspace_bytes, "timing_cache_path": cache, "plugin_libraries": libs}
    enc = build_encoder_engine(trt, bundle_dir, **kw)
    log(f"encoder.plan   {enc.seconds:6.1f} s ({enc.bytes / 2**20:.1f} MiB, {trt.__name__} {trt_version(trt)})")
    if cer == "split":
        decoders = _build_split_decoder(trt, bundle_dir, graphs, classes, log, **kw)
        log(f"(decoder split at the CER points, N {classes.min}..{classes.max}, opt {classes.opt}; top-k union between "
            f"segments: {'the CUDA kernel' if kernel else 'the host rule'})")
    else:
        text_shape = graphs["decoder"]["inputs"][1]["shape"]
        decoders = {"decoder": build_decoder_engine(trt, bundle_dir, text_shape, classes, onnx_name=decoder_onnx, **kw)}
        dec = decoders["decoder"]
        log(f"decoder.plan   {dec.seconds:6.1f} s ({dec.bytes / 2**20:.1f} MiB, N {classes.min}..{classes.max}, "
            f"opt {classes.opt})")
    sizes = chunk_sizes(opts.chunk_max) if opts.chunk_max else ()
    chunked = _build_chunked_decoder(trt, bundle_dir, graphs, sizes, log, **kw) if sizes else {}
    warnings = [w for p in (enc, *decoders.values(), *chunked.values()) for w in p.warnings]
    if warnings:
        log(f"({len(warnings)} TensorRT builder warnings, e.g. {_first_line(warnings[0], 120)})")
    return {
        "engine": engine_name(trt),
        "builder": {"module": trt.__name__.split(".")[0], "version": trt_version(trt)},
        "precision": precision,
        "strongly_typed": True,
        "built_on": "cpu (TensorRT-RTX ahead-of-time)" if rtx else f"gpu: {gpu['name'] if gpu else '?'}",
        "compute_capability": None if rtx else (gpu or {}).get("compute_capability"),
        "targets": RTX_DEFAULT_TARGETS if rtx else "the build GPU's compute capability only",
        "workspace_bytes": opts.workspace_bytes,
        "timing_cache": None if cache is None else str(cache),
        "classes": classes.to_json(),
        "cer": cer,
        "plugins": plugins,
        "kernel": kernel,
        "plans": {"encoder": enc.to_json(), **{role: p.to_json() for role, p in (decoders | chunked).items()}},
        "chunk_sizes": list(sizes),  # the class-chunked plans' static profiles, in profile order ([]: none built)
        "device_memory": {role: p.device_memory for role, p in {"encoder": enc, **decoders, **chunked}.items()
                          if p.device_memory is not None},
    }
