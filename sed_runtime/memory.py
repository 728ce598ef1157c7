"""How much memory a run will need, known before it starts: the decoder's peak from N, the kept counts and the
model's dimensions, so a run that cannot fit is refused with one line instead of being killed.

The decoder treats the class axis as a batch axis, so its working set is linear in the classes it carries:
all N before the first CER point (cost volume, conv1, the first aux head), then the classes kept at each
point through that layer. `decoder_elements` counts the per-class float elements alive at each stage's peak
from the config; a per-backend bytes-per-element factor, fitted on measured peak RSS (sed-b and sed-tiny,
768 x 768, 20-847 classes: benchmarks/results/cpu-sed-b-synthetic, cpu-sed-tiny-synthetic and
cpu-sed-b-ort-low-memory, plus fresh-process ONNX Runtime runs), turns that into bytes. It is an estimate:
within about 20% for torch, and an upper end for ONNX Runtime, whose arena grows in doubling chunks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import MemoryBudgetError

__all__ = ["DecoderMemory", "available_bytes", "check_fits", "choose_class_chunk", "decoder_elements", "held_elements",
           "peak_rss_mb", "reset_peak_rss", "rss_mb", "trim_heap"]

# bytes per counted element, fitted on measured peaks (increment over the loaded process, every class kept):
# torch 4.76 (sed-b grid, 25 cells; within 20% for cells above 1 GB). ONNX Runtime with its arena: 5.9 / 6.7 /
# 8.1 in fresh processes (sed-tiny fp32, N = 100 / 300 / 450), about 10 in the sed-b grid, and the same run
# (demo bundle, N = 300) peaked at 1.06 GB alone and 2.38 GB inside the test suite, and after a re-export
# 1.43 GB alone and 2.94 GB inside a suite run beside two training processes: the arena grows in doubling
# chunks and its peak varies run to run (with thread timing), so the upper end is used. Without the arena 3.7 (N = 300)
# to 5.5 (sed-b, N = 847). OpenVINO (CPU plugin, decoder compiled for the N): 5.6 / 5.2 (sed-shapes fp32, N = 100 /
# 300, fresh processes). A refusal should not let a run be killed, so the upper ends are used.
BYTES_PER_ELEMENT = {"torch": 4.8, "ort": 12.5, "ort-low-memory": 5.5, "openvino": 5.8}
GiB = 2**30


def decoder_elements(sed: Mapping[str, Any], num_templates: int) -> tuple[float, tuple[float, float, float]]:
    """Per-class float elements at the peak of (the pre-CER part, decoder layer 1, 2, 3), from the config.

    Pre-CER: cost volume (P), conv1 (hidden) and an aux map at the 1/32 grid. Layer i at grid R with c input
    channels, guidance g, output d: the larger of its FAM (ConvNeXt MLP 4c and the attention's q, k, v, output
    and norms, about 10c at R^2) and its SFM (the up-sampled map, the concat, the cost guidance and the
    DoubleConv's conv/norm outputs: 2c + g + 3d at (2R)^2).
    """
    side = int(sed["input_size"]) // 32
    hidden = int(sed["hidden_dims"])
    dims = [hidden, *(int(d) for d in sed["decoder_dims"])]
    guid = [int(g) for g in sed["decoder_guidance_proj_dims"]]
    pre = (num_templates + hidden + 1) * side * side
    layers = []
    for i in range(3):
        grid = side * 2**i
        c, g, d = dims[i], guid[i], dims[i + 1]
        fam = 10 * c * grid * grid
        sfm = (2 * c + g + 3 * d) * (2 * grid) ** 2
        layers.append(float(max(fam, sfm)))
    return float(pre), (layers[0], layers[1], layers[2])


def held_elements(sed: Mapping[str, Any], num_templates: int) -> tuple[float, float, float]:
    """Per-class float elements a class-chunked decoder holds for every alive class while running layer i: its
    input (c at R^2; the graph segments overwrite it with the ConvNeXt block's output, the same shape), the cost
    guidance it projects from (P at the 1/32 grid, then g at R^2), and its output (d at (2R)^2; the last layer's
    is one score map). Layer 1's input and guidance are the pre-CER outputs, so the pre-CER part holds no more."""
    side = int(sed["input_size"]) // 32
    dims = [int(sed["hidden_dims"]), *(int(d) for d in sed["decoder_dims"])]
    guid = [num_templates, *(int(g) for g in sed["decoder_guidance_proj_dims"])]
    held = []
    for i in range(3):
        grid = side * 2**i
        inp, guidance = dims[i] * grid * grid, guid[i] * grid * grid
        out = (1 if i == 2 else dims[i + 1]) * (2 * grid) ** 2
        held.append(float(inp + guidance + out))
    return held[0], held[1], held[2]


# What a class-chunked decoder holds for every class is plain fp32 arrays (torch tensors, or numpy arrays between
# the graph segments), counted at torch's factor; one chunk's working set has its own factor per backend. Fitted
# on sed-b, every class kept, N = 459 and 847 (two unknowns from two runs per backend) with
# benchmarks/chunked_decoder.py: a first run in chunks of 49-101 gave held 4.8 / 4.6 / 7.6 and working set
# 5.8 / 5.2 / 6.7 bytes per element for torch / ONNX Runtime (no arena) / OpenVINO; the committed rerun with these
# factors (benchmarks/results/cpu-sed-b-chunked-backends, chunks of 23-88) gives 4.6 / 5.1 / 8.0 and
# 6.5 / 4.5 / 7.7. OpenVINO's compiled segments keep memory beyond this model (its excess over held data at 4.8
# was 8.3-11.9 bytes per working-set element), so its upper end is used, and it still under-predicts A-847.
CHUNKED_BYTES_PER_ELEMENT = BYTES_PER_ELEMENT["torch"]
CHUNK_WORKING_SET_BYTES = {"torch": 6.0, "ort": 5.5, "ort-low-memory": 5.5, "openvino": 12.0}
# OpenVINO holds more per class than the others and keeps its compiled segment programs whatever N and the
# chunk. Refitted with the heap trimmed between segments (`trim_heap`) on sed-b, every class kept, budget 3 GiB:
# 459 in chunks of 34 peaked at 2.36 GiB and 847 in chunks of 17 at 3.12 GiB (benchmarks/chunked_decoder.py),
# which give 6.4 bytes per held element and 0.11 GiB fixed. The fixed part grows with the model: on sed-shapes
# (384 input, 1/5.5 of sed-b's layer-3 elements per class) it is about 40 MiB (chunks of 1 at N = 30 and 300
# peaked 56 and 171 MiB, 35 and 44 above the held data and working set). So it is counted as 24 MiB plus 21
# bytes per layer-3 element of one class, which gives both.
CHUNKED_HELD_BYTES = {"openvino": 6.4}
CHUNKED_FIXED_BYTES = {"openvino": (24 * 2**20, 21.0)}  # (bytes, bytes per layer-3 element of one class)
# GPU memory (the decoder's device memory, not the process's RSS): torch on CUDA and the TensorRT plans. No GPU has
# fitted these yet, so they are CPU torch's factors (the same fp32 tensors; TensorRT reuses activation memory
# within a plan, so for it they should be an upper end). benchmarks/gpu_session.sh measures the device peak of a
# chunked A-847 run next to this prediction. The TensorRT chunked executor keeps what it holds for every class in
# host memory, so only one chunk's working set is on the device.
DEVICE_BACKENDS = {"torch-cuda": "torch", "trt": "torch"}
HELD_ON_HOST = ("trt",)


@dataclass(frozen=True)
class DecoderMemory:
    """Bytes the decoder adds to a process for given class counts, on one backend."""

    pre_cer_bytes_per_class: float
    layer_bytes_per_class: tuple[float, float, float]
    backend: str
    # class-chunked: held for every alive class (the pre-CER outputs; each layer's input, guidance and output) and
    # one chunk's working set per class
    held_pre_bytes_per_class: float = 0.0
    held_bytes_per_class: tuple[float, float, float] = (0.0, 0.0, 0.0)
    chunk_bytes_per_class: tuple[float, float, float] = (0.0, 0.0, 0.0)
    chunk_pre_bytes_per_class: float = 0.0
    device: str = "host"  # whose memory: "host" (RSS) or "cuda" (the GPU's)
    chunk_fixed_bytes: float = 0.0  # held by a chunked run whatever N and the chunk (compiled programs)

    @classmethod
    def from_settings(cls, sed: Mapping[str, Any], num_templates: int, backend: str) -> DecoderMemory:
        """`backend`: torch, ort, ort-low-memory, openvino (host memory), or torch-cuda, trt (device memory)."""
        fitted = DEVICE_BACKENDS.get(backend, backend)
        factor = BYTES_PER_ELEMENT[fitted]
        chunk_factor = CHUNK_WORKING_SET_BYTES[fitted]
        held_factor = 0.0 if backend in HELD_ON_HOST else CHUNKED_HELD_BYTES.get(backend, CHUNKED_BYTES_PER_ELEMENT)
        pre, layers = decoder_elements(sed, num_templates)
        held = tuple(h * held_factor for h in held_elements(sed, num_templates))
        fixed_bytes, fixed_per_element = CHUNKED_FIXED_BYTES.get(backend, (0.0, 0.0))
        return cls(pre * factor, (layers[0] * factor, layers[1] * factor, layers[2] * factor), backend,
                   pre * held_factor, (held[0], held[1], held[2]),
                   (layers[0] * chunk_factor, layers[1] * chunk_factor, layers[2] * chunk_factor), pre * chunk_factor,
                   "cuda" if backend in DEVICE_BACKENDS else "host", fixed_bytes + fixed_per_element * layers[2])

    def chunked_peak_bytes(self, num_classes: int, chunk: int, kept: Sequence[int] | None = None) -> float:
        """Peak of the class-chunked decoder: what it holds for every alive class plus one chunk's working set,
        at the stage where that is largest (the pre-CER pass or one of the layers)."""
        counts = _kept_counts(num_classes, kept)
        pre = self.held_pre_bytes_per_class * num_classes + self.chunk_pre_bytes_per_class * min(chunk, num_classes)
        return self.chunk_fixed_bytes + max(pre, *(h * k + b * min(chunk, k) for h, b, k in
                                                   zip(self.held_bytes_per_class, self.chunk_bytes_per_class, counts)))

    def peak_bytes(self, num_classes: int, kept: Sequence[int] | None = None) -> float:
        """Peak added by one image: N classes before CER, `kept[i]` through layer i (None: every class)."""
        counts = _kept_counts(num_classes, kept)
        return self.pre_cer_bytes_per_class * num_classes + max(
            b * k for b, k in zip(self.layer_bytes_per_class, counts))


def _kept_counts(num_classes: int, kept: Sequence[int] | None) -> list[int]:
    """Classes alive through each decoder layer: `kept` capped at N (None: every class)."""
    return [num_classes] * 3 if kept is None else [min(int(k), num_classes) for k in kept]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _status_kb(field: str, pid: int | None = None) -> float | None:
    try:
        for line in _read(f"/proc/{pid or 'self'}/status").splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb(pid: int | None = None) -> float | None:
    """Resident set size of this process, or of process `pid`; None where /proc cannot tell."""
    kb = _status_kb("VmRSS", pid)
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    """Peak resident set size since the last `reset_peak_rss` (or process start)."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`); False where there is no glibc.

    Why: large buffers that native runtimes free in between segment runs stay in the process as free heap,
    fragmented, and the next segment's buffers do not fit into them. OpenVINO's class-chunked decoder at sed-b
    A-847 (chunks of 23) peaked at 3.72-3.73 GiB without it and 3.20-3.26 GiB with it, in the same time (two runs
    each, alternating).
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (musl and macOS have no malloc_trim)
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC: Any = None


def available_bytes() -> int | None:
    """Memory the machine can still give this process (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def choose_class_chunk(memory: DecoderMemory | None, num_classes: int, budget_bytes: float | None,
                       kept: Sequence[int] | None = None) -> int | None:
    """Classes per decoder step for a run that would not fit in one pass: the largest chunk whose predicted peak
    fits the budget (None: one pass fits, or nothing is known, or not even one class at a time fits)."""
    if memory is None or budget_bytes is None or memory.peak_bytes(num_classes, kept) <= budget_bytes:
        return None
    if memory.chunked_peak_bytes(num_classes, 1, kept) > budget_bytes:
        return None
    lo, hi = 1, num_classes
    while lo < hi:  # the peak grows with the chunk: the largest chunk that fits
        mid = (lo + hi + 1) // 2
        if memory.chunked_peak_bytes(num_classes, mid, kept) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_fits(memory: DecoderMemory | None, num_classes: int, topk: int | None, *, random_weights: bool,
               budget_bytes: float | None) -> str | None:
    """Refuse (MemoryBudgetError) a run whose decoder peak would pass the budget; return a note or None.

    With k = all the class count is exact. With CER the kept counts are only known per image: random weights
    keep nearly every class (all N assumed), a trained model far fewer, so there the every-class peak only
    earns a note, not a refusal.
    """
    if memory is None or budget_bytes is None:
        return None
    worst = memory.peak_bytes(num_classes)
    if worst <= budget_bytes:
        return None
    need, have = worst / GiB, budget_bytes / GiB
    if topk is None or topk >= num_classes or random_weights:
        why = "every class is kept" if topk is None or topk >= num_classes else \
            "random weights keep nearly every class at each CER point"
        raise MemoryBudgetError(
            f"this run needs about {need:.1f} GiB for the decoder ({num_classes} classes, {why}) but has "
            f"{max(have, 0.0):.1f} GiB ({'free GPU memory' if memory.device == 'cuda' else 'free memory'}, or "
            "--max-memory); use fewer classes, a smaller --topk with "
            "trained weights, "
            f"{'--low-memory, ' if memory.backend == 'ort' else ''}or --max-memory GB to run anyway")
    return (f"note: if CER kept all {num_classes} classes the decoder would need about {need:.1f} GiB "
            f"({max(have, 0.0):.1f} GiB available); a trained model at --topk {topk} keeps far fewer")
