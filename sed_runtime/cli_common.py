"""Shared CLI plumbing: one-line errors with exit code 2, argument parsing helpers."""

from __future__ import annotations

import functools
import glob
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from .errors import ImageError, OutputError, SedUserError

F = TypeVar("F", bound=Callable[..., Any])

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# Optional dependencies -> the extra that installs them (a missing one is the user's setup, not a bug).
EXTRA_OF_MODULE = {
    "torch": "export", "torchvision": "export", "open_clip": "export", "timm": "export", "regex": "export",
    "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "tokenizers": "onnx", "ftfy": "onnx",
    "matplotlib": "bench",
}


def user_errors(fn: F) -> F:
    """Turn SedUserError (and a missing optional dependency) into one `error:` line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SedUserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in EXTRA_OF_MODULE:
                raise
            print(f"error: this command needs {top}, which is not installed: "
                  f"pip install 'sed-deploy[{EXTRA_OF_MODULE[top]}]'", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_topk(value: str) -> int | None:
    """`--topk`: a positive integer, or `all` for the full model (no early rejection)."""
    if value.strip().lower() == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        raise SedUserError(f"--topk must be a positive integer or 'all', got {value!r}") from None
    if k < 1:
        raise SedUserError(f"--topk must be >= 1 (or 'all'), got {k}")
    return k


def parse_gib(value: str | None, option: str = "--max-memory") -> float | None:
    """A memory size in GiB: '12', '12.5', '12G', '12GB' or '12GiB'."""
    if value is None:
        return None
    text = value.strip().lower().removesuffix("ib").removesuffix("b").removesuffix("g").strip()
    try:
        gib = float(text)
    except ValueError:
        raise SedUserError(f"{option} must be a number of GiB such as 12 or 12.5, got {value!r}") from None
    if not gib > 0 or gib == float("inf"):
        raise SedUserError(f"{option} must be a positive number of GiB, got {value!r}")
    return gib


def expand_images(items: list[str]) -> list[Path]:
    """Files as given, folders as their image files (sorted), globs expanded."""
    found: list[Path] = []
    for item in items:
        if any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise ImageError(f"no image matches {item!r}; check the pattern")
            found.extend(matches)
        elif Path(item).is_dir():
            files = sorted(p for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ImageError(f"folder {item} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found.extend(files)
        elif Path(item).is_file():
            found.append(Path(item))
        else:
            raise ImageError(f"image {item} not found; pass an existing file, folder or glob")
    return found


def unique_stems(paths: list[Path]) -> list[str]:
    """Output name per image; repeated stems get a numeric suffix so nothing collides."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}-{n}")
    return stems


def check_output_folder(out: Path, option: str = "--out") -> None:
    """Before any work: `out` must be a folder that exists or can be created, and be writable (one line if not)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is a file; give a folder")
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{option} {out} cannot be created: {probe} is a file; choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {out} is not writable ({probe} refuses new files); choose another folder")
