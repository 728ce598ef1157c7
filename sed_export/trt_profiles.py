"""TensorRT optimisation profiles for the decoder's class axis N and the CER shape input k (pure Python).

TensorRT rejects shapes outside the profile a plan was built with, so the range is chosen at build time to
cover every shipped vocabulary (1 .. 1024 classes; ade847 has 847) and recorded in the manifest. The runtime
checks a vocabulary against that record with `check_classes` before calling into TensorRT, so a too-large
vocabulary gets one clear line instead of a TensorRT error. Nothing here imports TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sed_runtime.errors import SedUserError
from sed_runtime.profile_checks import check_classes, out_of_profile_message  # noqa: F401  (re-exported)

N_MIN = 1
N_MAX = 1024  # covers ade847 (the largest shipped vocabulary) with room for user lists
DEFAULT_TOPK = 8  # the paper's fast setting, the k the decoder plan is tuned for
CLASS_AXIS_INPUT = "text"  # decoder input (N, P, E)
TOPK_INPUT = "k"  # decoder shape input int64[1]


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of one input: dimensions for an execution tensor, values for a shape tensor."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError(f"profile for {self.name}: min/opt/max have different ranks")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not (0 <= lo <= mid <= hi):
                raise ValueError(f"profile for {self.name}: need 0 <= min <= opt <= max, got {lo}/{mid}/{hi}")

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Sequence[int]]) -> ShapeRange:
        return cls(name, tuple(int(v) for v in d["min"]), tuple(int(v) for v in d["opt"]),
                   tuple(int(v) for v in d["max"]))


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: ranges of dynamic execution inputs (`shapes`) and of shape inputs (`values`)."""

    shapes: tuple[ShapeRange, ...] = ()
    values: tuple[ShapeRange, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"shapes": {r.name: r.to_json() for r in self.shapes},
                "values": {r.name: r.to_json() for r in self.values}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Profile:
        return cls(tuple(ShapeRange.from_json(n, r) for n, r in d.get("shapes", {}).items()),
                   tuple(ShapeRange.from_json(n, r) for n, r in d.get("values", {}).items()))


@dataclass(frozen=True)
class ClassRange:
    """The class-axis range a decoder plan accepts; opt is the vocabulary TensorRT tunes the kernels for."""

    min: int
    opt: int
    max: int

    def to_json(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def class_range(vocab_size: int, n_max: int = N_MAX, n_min: int = N_MIN) -> ClassRange:
    """N range for a bundle built with a `vocab_size`-class vocabulary: opt = its size, max >= every shipped one."""
    if n_min < 1:
        raise SedUserError(f"the smallest class count of a profile must be >= 1, got {n_min}")
    if n_max < n_min:
        raise SedUserError(f"--max-classes {n_max} is below the minimum {n_min}")
    if vocab_size < 1:
        raise SedUserError("the vocabulary is empty; a decoder plan needs at least one class")
    if vocab_size > n_max:
        raise SedUserError(
            f"the vocabulary has {vocab_size} classes but --max-classes is {n_max}; "
            f"pass --max-classes {vocab_size} (or more) to cover it"
        )
    return ClassRange(n_min, max(n_min, vocab_size), n_max)


def _dims(shape: Sequence[int | str | None]) -> list[int | None]:
    """ONNX/TensorRT dims as ints, symbolic or -1 dims as None."""
    out: list[int | None] = []
    for d in shape:
        out.append(d if isinstance(d, int) and d >= 0 else None)
    return out


def decoder_profile(text_shape: Sequence[int | str | None], classes: ClassRange, topk: int = DEFAULT_TOPK) -> Profile:
    """The decoder's profile from its `text` input shape (N, P, E): N over `classes`, k over 1 .. max.

    The graph clamps k to N, so any k in 1 .. max is valid for every N and k's opt is the usual top-k.
    """
    dims = _dims(text_shape)
    if len(dims) != 3 or dims[0] is not None or dims[1] is None or dims[2] is None:
        raise SedUserError(
            f"decoder input '{CLASS_AXIS_INPUT}' has shape {list(text_shape)}; expected (N, P, E) with only N "
            "dynamic; rebuild the ONNX bundle with this sed-deploy"
        )
    p, e = int(dims[1] or 0), int(dims[2] or 0)
    text = ShapeRange(CLASS_AXIS_INPUT, (classes.min, p, e), (classes.opt, p, e), (classes.max, p, e))
    k_opt = min(max(topk, 1), classes.opt)  # the graph clamps k to N, so k > opt N is tuned as opt N
    k = ShapeRange(TOPK_INPUT, (1,), (k_opt,), (classes.max,))
    return Profile(shapes=(text,), values=(k,))


def check_network_inputs(
    inputs: Mapping[str, Sequence[int]], shape_inputs: Sequence[str], profiles: Sequence[Profile], what: str
) -> None:
    """Every dynamic input (a -1 dim) and every shape input has a range in each profile, and fixed dims agree.

    `inputs` maps name -> dims as the parsed network reports them (-1 = dynamic).
    """
    for prof in profiles:
        shapes = {r.name: r for r in prof.shapes}
        values = {r.name: r for r in prof.values}
        for name in set(shapes) | set(values):
            if name not in inputs:
                raise SedUserError(f"{what}: the profile names input '{name}' that the graph does not have")
        for name, dims in inputs.items():
            if name in shape_inputs:
                if name not in values:
                    raise SedUserError(f"{what}: shape input '{name}' needs a value range in the profile")
                continue
            dynamic = any(d < 0 for d in dims)
            if not dynamic:
                continue
            r = shapes.get(name)
            if r is None:
                raise SedUserError(f"{what}: input '{name}' has dynamic shape {list(dims)} but no profile range")
            if len(r.min) != len(dims):
                raise SedUserError(f"{what}: profile for '{name}' has rank {len(r.min)}, the graph {len(dims)}")
            for i, d in enumerate(dims):
                if d >= 0 and not (r.min[i] == r.opt[i] == r.max[i] == d):
                    raise SedUserError(
                        f"{what}: profile for '{name}' sets axis {i} to {r.min[i]}..{r.max[i]} but the graph fixes it "
                        f"to {d}"
                    )
    if not profiles and any(any(d < 0 for d in dims) for dims in inputs.values()):
        raise SedUserError(f"{what}: the graph has dynamic inputs but no optimisation profile was given")


OPT_KEPT = 64  # the class count after a CER point TensorRT tunes the later segments for (k = 8 keeps tens)


def _rows_range(name: str, shape: Sequence[int | str | None], lo: int, opt: int, hi: int, what: str) -> ShapeRange:
    """A range whose axis 0 is the dynamic class (row) axis and every other axis is fixed."""
    dims = _dims(shape)
    if not dims or dims[0] is not None or any(d is None for d in dims[1:]):
        raise SedUserError(
            f"{what} input '{name}' has shape {list(shape)}; expected only axis 0 dynamic; rebuild the ONNX bundle"
        )
    rest = tuple(int(d or 0) for d in dims[1:])
    return ShapeRange(name, (lo, *rest), (opt, *rest), (hi, *rest))


def split_decoder_profiles(
    inputs: Mapping[str, Mapping[str, Sequence[int | str | None]]], classes: ClassRange, opt_kept: int = OPT_KEPT
) -> dict[str, Profile]:
    """One profile per segment of the split decoder, from each segment's input shapes (name -> shape).

    decoder_pre: N over `classes`. decoder1 takes all N rows (x, cg) and K kept ones; decoder2/3 take the rows
    the previous layer kept. Every K and later row count is 1 .. classes.max, tuned for `opt_kept`.
    """
    from sed_runtime.split_decoder import LAYERS, PRE

    kept_opt = max(1, min(opt_kept, classes.opt))
    profiles = {PRE: Profile(shapes=(_rows_range("text", inputs[PRE]["text"], classes.min, classes.opt,
                                                 classes.max, PRE),))}
    for i, seg in enumerate(LAYERS):
        rows_opt = classes.opt if i == 0 else kept_opt
        shapes = [_rows_range(n, inputs[seg][n], 1, rows_opt, classes.max, seg) for n in ("x", "cg")]
        shapes.append(ShapeRange("keep", (1,), (min(kept_opt, rows_opt),), (classes.max,)))
        profiles[seg] = Profile(shapes=tuple(shapes))
    return profiles


DEFAULT_CHUNK_MAX = 64  # classes per step of the chunked plans; powers of two up to it each get a static profile


def chunk_sizes(chunk_max: int) -> tuple[int, ...]:
    """The row counts the class-chunked plans are built for: every power of two up to `chunk_max` (itself rounded
    down to one), which are exactly the sizes `chunked_decoder.chunk_spans(fixed_sizes=True)` hands out for any
    chunk that is itself one of them."""
    if chunk_max < 1:
        raise SedUserError(f"--max-chunk must be >= 1 (or 0 for no chunked plans), got {chunk_max}")
    return tuple(1 << i for i in range(chunk_max.bit_length()))


def chunked_decoder_profiles(
    inputs: Mapping[str, Mapping[str, Sequence[int | str | None]]], sizes: Sequence[int]
) -> dict[str, list[Profile]]:
    """Static profiles (min = opt = max) for each class-chunked segment, one per row count in `sizes`, in that
    order: every input whose axis 0 is the dynamic class axis takes that many rows. A segment without such an
    input (the per-image skips) gets no profile."""
    profiles: dict[str, list[Profile]] = {}
    for seg, shapes in inputs.items():
        rows = [n for n, s in shapes.items() if _dims(s)[:1] == [None]]
        profiles[seg] = [Profile(shapes=tuple(_rows_range(n, shapes[n], t, t, t, seg) for n in rows))
                         for t in sizes] if rows else []
    return profiles
