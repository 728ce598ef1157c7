"""Checks of a vocabulary against a decoder plan's recorded class range, before TensorRT sees it.

Lives in the runtime (the TensorRT backend needs it without the export package); `sed_export.trt_profiles`
re-exports it for the builder's messages.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import SedUserError


def out_of_profile_message(n: int, lo: int, hi: int, plan: str) -> str:
    """The one line for a vocabulary whose size the plan cannot run (shared by builder docs and runtime)."""
    return (
        f"the vocabulary has {n} classes but {plan} accepts {lo}..{hi} classes (its TensorRT profile); "
        f"rebuild with `sed-export build --engine ... --max-classes {max(n, hi)}` or run with --backend ort"
    )


def check_classes(n: int, classes: Mapping[str, int], plan: str = "the decoder plan") -> None:
    """Refuse a class count outside the recorded profile range before TensorRT sees it."""
    lo, hi = int(classes["min"]), int(classes["max"])
    if not lo <= n <= hi:
        raise SedUserError(out_of_profile_message(n, lo, hi, plan))
