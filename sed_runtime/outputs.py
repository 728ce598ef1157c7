"""Per-image output files: overlay PNG, JSON summary, optional npz. Written whole or not at all."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError
from .overlay import render_overlay
from .pipeline import Segmentation


def output_paths(out_dir: Path, stem: str, save_npz: bool) -> dict[str, Path]:
    paths = {"overlay": out_dir / f"{stem}_overlay.png", "json": out_dir / f"{stem}.json"}
    if save_npz:
        paths["npz"] = out_dir / f"{stem}.npz"
    return paths


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    """Stop before any work if an output exists and --force was not given."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputError(f"{existing[0]} already exists{more}; pass --force to overwrite or choose another --out")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def npz_payload(result: Segmentation) -> dict[str, np.ndarray]:
    """scores (N x h x w float32), seg (H x W int32), kept0..2 (sorted int32; absent for topk=all)."""
    payload = {"scores": result.full_scores().astype(np.float32), "seg": result.seg.astype(np.int32)}
    if result.kept is not None:
        for i, k in enumerate(result.kept):
            payload[f"kept{i}"] = np.asarray(k, dtype=np.int32)
    return payload


def write_outputs(
    result: Segmentation, image: np.ndarray, paths: dict[str, Path], extra: dict[str, Any] | None = None
) -> None:
    """Render every file in memory first, then move each into place."""
    # The legend names a class as the JSON does (synonyms included), shortened only when very long.
    names = [n.strip() if len(n.strip()) <= 40 else n.strip()[:37] + "..." for n in result.class_names]
    png = io.BytesIO()
    render_overlay(image, result.seg, names).save(png, format="PNG")
    summary = {**(extra or {}), **result.summary()}
    blobs = {"overlay": png.getvalue(), "json": (json.dumps(summary, indent=2) + "\n").encode()}
    if "npz" in paths:
        buf = io.BytesIO()
        np.savez_compressed(buf, **npz_payload(result))
        blobs["npz"] = buf.getvalue()
    for key, path in paths.items():
        _write_atomic(path, blobs[key])
