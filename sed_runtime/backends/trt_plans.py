"""What a bundle's TensorRT plans need, checked in plain Python before TensorRT sees a byte.

A plan only runs on the TensorRT build and GPU it was made for, and TensorRT reacts to a wrong plan with a log
line and a None (or worse, a crash inside a plugin). So the manifest's `engines` section is validated here:
plan, plugin and kernel hashes, TensorRT flavour and version, GPU compute capability and the CUDA
architectures the kernel libraries were compiled for. Also the buffer plan of an engine's IO tensors.
Everything here is unit-tested on CPU; nothing imports TensorRT or CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import sha256_file
from ..errors import SedUserError
from ..split_decoder import SEGMENTS

RUNTIME_MODULES: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt",),
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx"),
}
RUNTIME_INSTALL = {
    "tensorrt": "pip install tensorrt (and 'sed-deploy[trt]' for cuda-python)",
    "tensorrt-rtx": "pip install 'sed-deploy[rtx,trt]'",
}
REBUILD = "rebuild the bundle on this machine with `sed-export build --engine tensorrt --force`, or run --backend ort"


@dataclass(frozen=True)
class PlanRecord:
    file: str
    sha256: str
    bytes: int
    cuda_archs: str | None = None  # kernel/plugin libraries: the architectures they were compiled for


@dataclass(frozen=True)
class EngineRecord:
    """The manifest's `engines` section, validated."""

    engine: str  # tensorrt | tensorrt-rtx
    version: str
    compute_capability: str | None  # None: portable TensorRT-RTX plans
    classes: Mapping[str, int]
    plans: Mapping[str, PlanRecord]
    plugins: tuple[PlanRecord, ...]
    precision: str
    cer: str = "standard-ops"  # standard-ops | plugin: CER inside decoder.plan; split: between segment plans
    kernel: PlanRecord | None = None  # split: the top-k-union kernel library (None: the rule on the host)
    device_memory: Mapping[str, int] = field(default_factory=dict)  # role -> bytes at the profile maximum
    chunk_sizes: tuple[int, ...] = ()  # the class-chunked plans' static profiles, in order (empty: none built)

    @property
    def decoder_roles(self) -> tuple[str, ...]:
        return _decoder_roles(self.cer)

    @property
    def chunked_roles(self) -> tuple[str, ...]:
        return _chunked_roles(self.chunk_sizes)


def _decoder_roles(cer: str) -> tuple[str, ...]:
    """The one-pass decoder's plans: the segment plans with CER between them, or one decoder.plan."""
    return SEGMENTS if cer == "split" else ("decoder",)


def _chunked_roles(chunk_sizes: Sequence[int]) -> tuple[str, ...]:
    """The class-chunked decoder's plans, when the bundle has any."""
    from ..chunked_decoder import SEGMENTS as CHUNKED  # lazy: chunked_decoder imports the backends package

    return CHUNKED if chunk_sizes else ()


def parse_engines(manifest: Mapping[str, Any], where: str = "bundle") -> EngineRecord:
    """Read and validate `engines`; a bundle without plans (or a malformed section) is a user error."""
    eng = manifest.get("engines")
    if not eng:
        raise SedUserError(
            f"{where} has no TensorRT plans; build them with `sed-export build --engine tensorrt` or use --backend ort"
        )

    def plan_record(d: Mapping[str, Any]) -> PlanRecord:
        archs = d.get("cuda_archs")
        return PlanRecord(str(d["file"]), str(d["sha256"]), int(d["bytes"]), None if archs is None else str(archs))

    try:
        cer = str(eng.get("cer", "standard-ops"))
        sizes = tuple(int(t) for t in eng.get("chunk_sizes", []))
        roles = ("encoder", *_decoder_roles(cer), *_chunked_roles(sizes))
        plans = {role: plan_record(eng["plans"][role]) for role in roles}
        plugins = tuple(plan_record(p) for p in eng.get("plugins", []))
        kernel = plan_record(eng["kernel"]) if eng.get("kernel") else None
        classes = {k: int(eng["classes"][k]) for k in ("min", "opt", "max")}
        engine = str(eng["engine"])
        version = str(eng["builder"]["version"])
        device_memory = {str(k): int(v) for k, v in eng.get("device_memory", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SedUserError(
            f"{where}: the manifest's engines section is malformed ({e!r}); rebuild with --force"
        ) from None
    if engine not in RUNTIME_MODULES:
        raise SedUserError(f"{where}: plans were built by unknown engine {engine!r}; rebuild with --force")
    cc = eng.get("compute_capability")
    if cer not in ("standard-ops", "plugin", "split"):
        raise SedUserError(f"{where}: unknown CER mode {cer!r} in the manifest; rebuild with this sed-deploy")
    if any(t < 1 for t in sizes):
        raise SedUserError(f"{where}: chunk sizes {list(sizes)} in the manifest are not all >= 1; rebuild with --force")
    return EngineRecord(engine, version, None if cc is None else str(cc), classes, plans, plugins,
                        str(eng.get("precision", manifest.get("precision", "?"))), cer, kernel, device_memory, sizes)


def plan_chunk(record: EngineRecord, chunk: int, where: str = "bundle") -> int:
    """Classes per step for a requested chunk on the class-chunked plans: the largest size they were built for
    that is not above it (the runner then only cuts chunks of built sizes); refused in one line when the bundle
    has no chunked plans."""
    if not record.chunk_sizes:
        raise SedUserError(f"{where} has no class-chunked decoder plans (built with --max-chunk 0 or before they "
                           "existed); rebuild it with `sed-export build --engine ... --force`, or give the decoder "
                           "more GPU memory (--max-memory)")
    return max([t for t in record.chunk_sizes if t <= chunk] or [min(record.chunk_sizes)])


def check_files(
    root: Path, records: Sequence[PlanRecord], what: str, hashed: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """Each file exists with its recorded size and sha256; size first so a truncated plan says so.

    `hashed`: manifest `files` entries already hashed by `Bundle.verify`; a record with the same sha256 there is
    not hashed again (plans run to hundreds of MB).
    """
    for rec in records:
        path = root / rec.file
        if not path.is_file():
            extra = " (the plugin library is copied into the bundle at build time)" if what == "plugin library" else ""
            raise SedUserError(f"{what} {path} is missing{extra}; rebuild the bundle with `sed-export build --force`")
        size = path.stat().st_size
        if size != rec.bytes:
            state = "truncated" if size < rec.bytes else "larger than recorded"
            raise SedUserError(
                f"{what} {path} is {state} ({size} of {rec.bytes} bytes); rebuild the bundle with --force"
            )
        if (hashed or {}).get(rec.file, {}).get("sha256") == rec.sha256:
            continue
        if sha256_file(path) != rec.sha256:
            raise SedUserError(f"{what} {path} does not match its manifest sha256; rebuild the bundle with --force")


def check_version(record: EngineRecord, module_name: str, installed: str) -> None:
    """Plans are tied to the exact TensorRT (or TensorRT-RTX) release that built them."""
    flavour = "TensorRT-RTX" if record.engine == "tensorrt-rtx" else "TensorRT"
    if installed != record.version:
        raise SedUserError(
            f"the plans were built by {flavour} {record.version} but {module_name} {installed} is installed; "
            f"install {flavour} {record.version} or {REBUILD}"
        )


def _cc(value: str) -> tuple[int, int]:
    major, _, minor = value.partition(".")
    return int(major), int(minor or 0)


def check_compute_capability(record: EngineRecord, current: str, gpu_name: str = "this GPU") -> None:
    """A TensorRT plan runs only on the compute capability it was built on; TensorRT-RTX plans need CC >= 8.0."""
    if record.compute_capability is None:  # TensorRT-RTX AOT plan: portable, the runtime JIT-compiles
        if _cc(current) < (8, 0):
            raise SedUserError(
                f"{gpu_name} has compute capability {current}; TensorRT-RTX plans built with default targets need "
                "8.0 or newer (Turing needs a plan built for sm75); run with --backend ort"
            )
        return
    if _cc(current) != _cc(record.compute_capability):
        raise SedUserError(
            f"the plans were built for compute capability {record.compute_capability} but {gpu_name} is "
            f"{current}; {REBUILD}"
        )


def arch_runs_on(archs: str, current: str) -> bool:
    """Whether code compiled for CMake-style `archs` ("80;86;90", entries may end in -real or -virtual) runs on
    compute capability `current`: machine code (SASS) for the same major and a minor not above it, or PTX
    (a plain or -virtual entry) of an architecture not above it, which the driver JIT-compiles. Entries it
    cannot read ("native", "all") leave the answer to the load: True when none can be read."""
    cc = _cc(current)
    known = False
    for entry in filter(None, (e.strip() for e in archs.replace(",", ";").split(";"))):
        number, _, kind = entry.partition("-")
        digits = number.removeprefix("sm_").removeprefix("compute_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        known = True
        arch = (int(digits[:-1]), int(digits[-1]))
        sass = kind in ("", "real") and arch[0] == cc[0] and arch[1] <= cc[1]
        ptx = kind in ("", "virtual") and arch <= cc
        if sass or ptx:
            return True
    return not known


def check_library_archs(record: PlanRecord, what: str, current: str, gpu_name: str = "this GPU") -> None:
    """Refuse at load, not mid-run, a kernel or plugin library compiled for other GPUs."""
    if record.cuda_archs is not None and not arch_runs_on(record.cuda_archs, current):
        raise SedUserError(
            f"{what} {record.file} was compiled for CUDA architectures {record.cuda_archs}, which cannot run on "
            f"{gpu_name} (compute capability {current}); rebuild kernels/ with -DCMAKE_CUDA_ARCHITECTURES="
            f"{current.replace('.', '')} and the bundle with --force, or run --backend ort"
        )


def check_engines_here(record: EngineRecord, module_name: str, installed: str, gpu: Mapping[str, str]) -> None:
    """Everything about the plans that depends on this machine: TensorRT release, GPU, library architectures."""
    check_version(record, module_name, installed)
    check_gpu_fits(record, gpu)


def check_gpu_fits(record: EngineRecord, gpu: Mapping[str, str]) -> None:
    """The plans' compute capability and the libraries' CUDA architectures against this GPU."""
    check_compute_capability(record, gpu["compute_capability"], gpu["name"])
    for lib in record.plugins:
        check_library_archs(lib, "plugin library", gpu["compute_capability"], gpu["name"])
    if record.kernel is not None:
        check_library_archs(record.kernel, "kernel library", gpu["compute_capability"], gpu["name"])


def choose_backend(has_engines: bool, trt_importable: bool, gpu: bool, mismatch: str | None = None
                   ) -> tuple[str, str | None]:
    """`--backend auto` for a bundle: trt only when plans, their TensorRT and a GPU are all there and the plans
    were built for them; else ort + why."""
    if not has_engines:
        return "ort", None
    if not trt_importable:
        return "ort", "the bundle has TensorRT plans but their TensorRT runtime is not installed"
    if not gpu:
        return "ort", "the bundle has TensorRT plans but no CUDA GPU is visible"
    if mismatch:
        return "ort", f"the bundle's TensorRT plans cannot run here ({mismatch})"
    return "trt", None


def tensor_nbytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a tensor; dynamic (-1) dims are a planning error, 0-sized tensors get 1 byte (never malloc 0)."""
    n = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"shape {tuple(shape)} is not resolved")
        n *= int(d)
    return max(n * itemsize, 1)


@dataclass(frozen=True)
class TensorDesc:
    name: str
    is_input: bool
    shape: tuple[int, ...]  # as resolved for the current input shapes; -1 where data-dependent
    itemsize: int
    on_host: bool = False  # shape tensors (k) live in host memory


@dataclass(frozen=True)
class BufferPlan:
    """Device buffers an engine needs: inputs (bound by the caller), outputs of known size, and data-dependent
    outputs (left to an IOutputAllocator). Host tensors (shape inputs) need none."""

    inputs: dict[str, int]
    outputs: dict[str, int]
    dynamic: list[str]


def plan_buffers(tensors: Sequence[TensorDesc]) -> BufferPlan:
    """Split IO tensors by who provides their memory. Outputs are kept apart from inputs so that binding output
    buffers can never rebind an input the caller already wrote (such as the plugin decoder's device `k`)."""
    inputs: dict[str, int] = {}
    outputs: dict[str, int] = {}
    dynamic: list[str] = []
    for t in tensors:
        if t.on_host:
            continue
        if any(d < 0 for d in t.shape):
            if t.is_input:
                raise ValueError(f"input {t.name} has unresolved shape {t.shape}")
            dynamic.append(t.name)
        else:
            (inputs if t.is_input else outputs)[t.name] = tensor_nbytes(t.shape, t.itemsize)
    return BufferPlan(inputs, outputs, dynamic)
