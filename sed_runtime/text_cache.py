"""On-disk cache of per-vocabulary text embeddings, so a second run does not need the text tower.

One safetensors file per key (`<key>.safetensors`, tensor "embeddings", float32 (N, P, E)); the metadata
(model, weights hash, vocabulary name, number of classes, templates digest) rides in the safetensors header.
Files are written to a temporary name in the same folder and `os.replace`d, so a reader sees a whole file
or none. A file that cannot be read back is treated as a miss and removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["TextEmbeddingCache", "default_cache_dir", "templates_digest", "text_cache_key"]

_TENSOR = "embeddings"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_FORMAT = "1"


def default_cache_dir() -> Path:
    """`$SED_CACHE_DIR` when set, else `~/.cache/sed-deploy/text`."""
    env = os.environ.get("SED_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/sed-deploy/text").expanduser()


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


def templates_digest(templates: Sequence[str]) -> str:
    """sha256 hex of the canonical JSON of the template list (order matters)."""
    return hashlib.sha256(_canonical(list(templates))).hexdigest()


def text_cache_key(
    model_name: str, weights_hash: str, templates: Sequence[str], class_names: Sequence[str]
) -> str:
    """sha256 hex over (model name, weights hash, templates, class names) as canonical JSON."""
    payload = {
        "model": str(model_name),
        "weights": str(weights_hash),
        "templates": list(templates),
        "classes": list(class_names),
    }
    return hashlib.sha256(_canonical(payload)).hexdigest()


class TextEmbeddingCache:
    """A folder of `<key>.safetensors` files; `get` never raises for a bad file, it reports a miss."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"text cache key must be 64 lowercase hex characters, got {key!r}")
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> np.ndarray | None:
        """The cached array, or None when absent or unreadable (an unreadable file is deleted)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                names = f.keys()
                if meta.get("key", key) != key or _TENSOR not in names:
                    raise ValueError("cache entry does not match its key")
                arr = f.get_tensor(_TENSOR)
            if "num_classes" in meta and arr.ndim >= 1 and int(meta["num_classes"]) != arr.shape[0]:
                raise ValueError("cache entry has the wrong number of classes")
            if not np.all(np.isfinite(arr)):
                raise ValueError("cache entry holds non-finite values")
        except Exception:  # noqa: BLE001 - any unreadable file is a miss, never a crash
            # Corrupt, truncated or foreign file: drop it and recompute.
            try:
                path.unlink()
            except OSError:
                pass
            return None
        return np.ascontiguousarray(arr, dtype=np.float32)

    def put(self, key: str, array: np.ndarray, metadata: Mapping[str, object] | None = None) -> Path:
        """Store `array` (as float32) under `key`, atomically; returns the file's path."""
        from safetensors.numpy import save

        path = self.path(key)
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["key"] = key
        meta["format"] = _FORMAT
        arr = np.ascontiguousarray(array, dtype=np.float32)
        meta.setdefault("num_classes", str(arr.shape[0]) if arr.ndim else "0")
        blob = save({_TENSOR: arr}, metadata=meta)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path
