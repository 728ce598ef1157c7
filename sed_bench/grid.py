"""The benchmark grid: vocabularies x k values (x backends), argument parsing and validation.

Pure Python (no torch, no onnxruntime) so the CLI refuses bad input before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from sed_runtime.cli_common import parse_topk
from sed_runtime.errors import SedUserError
from sed_runtime.vocab import Vocabulary, load_vocabulary

from .paper import PAPER_COLUMNS, paper_kept

BACKEND_CHOICES = ("torch", "ort", "openvino", "trt")
# Variants after a colon, joined by '+': `ort:int8` runs an int8 QDQ encoder; `openvino:bf16` asks OpenVINO for bf16
# inference (where the CPU has bf16 or AMX units); `openvino:int8+bf16` both.
BACKEND_VARIANTS = {"ort": ("int8",), "openvino": ("int8", "bf16")}
KEPT_PAPER = "paper"


@dataclass(frozen=True)
class Cell:
    """One (vocabulary, k) setting. forced: kept counts at CER points 0, 1, 2 (synthetic mode), else None."""

    vocab: str  # unique label of the vocabulary in this run
    num_classes: int
    topk: int | None  # None = all classes, no early rejection
    forced: tuple[int, int, int] | None = None

    @property
    def k_label(self) -> str:
        return "all" if self.topk is None else str(self.topk)

    @property
    def key(self) -> str:
        return f"{self.vocab}/k={self.k_label}"

    def decoder_classes(self) -> int:
        """Classes entering decoder layer 1: a memory/cost proxy known before the run (N when unknown)."""
        if self.topk is None or self.forced is None:
            return self.num_classes
        return self.forced[0]


def backend_kind(spec: str) -> str:
    """`openvino:int8+bf16` -> `openvino`."""
    return spec.split(":", 1)[0]


def backend_variants(spec: str) -> tuple[str, ...]:
    """`openvino:int8+bf16` -> ("int8", "bf16")."""
    return tuple(spec.split(":", 1)[1].split("+")) if ":" in spec else ()


def parse_backends(spec: str) -> list[str]:
    """`--backend torch,ort,ort:int8,openvino:bf16`: known backends and variants in the given order (tensorrt is
    an alias of trt), each variant list normalised to BACKEND_VARIANTS' order."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise SedUserError("--backend needs at least one of " + ", ".join(BACKEND_CHOICES))
    out: list[str] = []
    for name in names:
        kind, colon, rest = name.partition(":")
        kind = "trt" if kind == "tensorrt" else kind
        if kind not in BACKEND_CHOICES:
            raise SedUserError(f"unknown --backend {kind!r}; choose from {', '.join(BACKEND_CHOICES)}")
        allowed = BACKEND_VARIANTS.get(kind, ())
        wanted = [v for v in rest.split("+") if v] if rest else []
        for v in wanted:
            if v not in allowed:
                raise SedUserError(f"--backend {name}: {kind} has no variant {v!r}; "
                                   + (f"choose from {', '.join(allowed)}" if allowed else "it takes none"))
        if colon and not wanted:
            raise SedUserError(f"--backend {name}: name a variant after the colon, e.g. ort:int8")
        spec_ = kind + (":" + "+".join(v for v in allowed if v in wanted) if wanted else "")
        if spec_ not in out:
            out.append(spec_)
    return out


def parse_topks(spec: str) -> list[int | None]:
    """`--topk 1,2,4,8,all`: distinct values, ascending, `all` last."""
    values = [parse_topk(v) for v in spec.split(",") if v.strip()]
    if not values:
        raise SedUserError("--topk needs at least one value, e.g. 1,2,4,8,all")
    ks = sorted({v for v in values if v is not None})
    return [*ks, None] if None in values else ks


def parse_vocabs(spec: str) -> list[tuple[str, Vocabulary]]:
    """`--vocabs ade847,pc459,my_classes.txt`: built-in names or class-list files, each with a unique label."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise SedUserError("--vocabs needs at least one vocabulary, e.g. ade150 or a .txt/.json class list")
    out: list[tuple[str, Vocabulary]] = []
    seen: dict[str, int] = {}
    for item in items:
        vocab = load_vocabulary(item)
        n = seen.get(vocab.name, 0)
        seen[vocab.name] = n + 1
        out.append((vocab.name if n == 0 else f"{vocab.name}-{n}", vocab))
    return out


def parse_kept(spec: str | None) -> tuple[int, int, int] | str | None:
    """`--kept paper` or `--kept CER0,CER1,CER2` (positive, non-increasing: CER only ever rejects more)."""
    if spec is None:
        return None
    if spec.strip().lower() == KEPT_PAPER:
        return KEPT_PAPER
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 3:
        raise SedUserError(
            f"--kept needs three counts CER0,CER1,CER2 (e.g. 48,40,32) or 'paper', got {len(parts)} value(s): {spec!r}"
        )
    try:
        counts = tuple(int(p) for p in parts)
    except ValueError:
        raise SedUserError(f"--kept counts must be integers, got {spec!r}") from None
    if min(counts) < 1:
        raise SedUserError(f"--kept counts must be >= 1, got {spec!r}")
    if not counts[0] >= counts[1] >= counts[2]:
        raise SedUserError(f"--kept counts must not increase (each CER point keeps a subset), got {spec!r}")
    return counts  # type: ignore[return-value]


def build_grid(
    vocabs: list[tuple[str, Vocabulary]], topks: list[int | None], kept: tuple[int, int, int] | str | None
) -> list[Cell]:
    """Every (vocabulary, k) cell in table order; validates --kept against each vocabulary's size."""
    cells: list[Cell] = []
    for label, vocab in vocabs:
        n = len(vocab)
        for k in topks:
            forced: tuple[int, int, int] | None = None
            if k is not None and kept == KEPT_PAPER:
                s = paper_kept(vocab.name, n, k)
                if s is None:
                    have = ", ".join(PAPER_COLUMNS)
                    raise SedUserError(
                        f"--kept paper has counts for k = 1, 2, 4, 8 on {have} only, not {label} (N={n}) at k={k}; "
                        "pass explicit counts --kept CER0,CER1,CER2"
                    )
                forced = (s, s, s)
            elif k is not None and isinstance(kept, tuple):
                if kept[0] > n:
                    raise SedUserError(
                        f"--kept {','.join(map(str, kept))}: {kept[0]} classes is more than {label} has (N={n})"
                    )
                forced = kept
            cells.append(Cell(label, n, k, forced))
    return cells


def run_order(cells: list[Cell]) -> list[Cell]:
    """Cheapest first (by classes entering the decoder, then N), so peak memory mostly grows through the run
    and a memory limit can be checked against the cells already measured."""
    return sorted(cells, key=lambda c: (c.topk is None, c.decoder_classes(), c.num_classes, c.topk or 0))
