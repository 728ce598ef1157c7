"""Deployable bundles: a folder of graphs, tokenizer, text embeddings and `manifest.json` that names them all.

This module only reads bundles (the runtime stays torch-free); `sed_export.bundle` writes them. The manifest
records the model config, weights, precision, opset, producer versions, every graph's inputs and outputs,
and the sha256 of every file, so a bundle that was edited, truncated or mixed up is refused up front.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import InputSpec, weights_label
from .errors import BundleError

FORMAT = "sed-deploy-bundle/1"
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_bundle_dir(path: str | Path) -> Path | None:
    """The bundle folder for a path that is the folder itself or a file in it or in one of its subfolders
    (decoder_split/*.plan); None if neither."""
    p = Path(path)
    for candidate in (p.parent, p.parent.parent) if p.is_file() else (p,):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


_MANIFEST_TYPES = {"model": dict, "precision": str, "graphs": dict, "files": dict, "input": dict,
                   "templates": list, "weights": dict}


def _check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """Every key there with its type, and file entries inside the bundle: a manifest from another tool or a hand
    edit must fail here in one line, not deep in a backend."""
    rebuild = "rebuild the bundle with `sed-export build --force`"
    for key, kind in _MANIFEST_TYPES.items():
        if key not in manifest:
            raise BundleError(f"{where} lacks '{key}'; {rebuild}")
        if not isinstance(manifest[key], kind):
            raise BundleError(f"{where}: '{key}' is a {type(manifest[key]).__name__}, not a {kind.__name__}; {rebuild}")
    for name, meta in manifest["files"].items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise BundleError(f"{where}: file entry {name!r} points outside the bundle; {rebuild}")
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(
                meta.get("sha256"), str):
            raise BundleError(f"{where}: file entry {name!r} lacks its bytes and sha256; {rebuild}")


@dataclass
class Bundle:
    """An opened (and by default verified) bundle."""

    root: Path
    manifest: dict[str, Any]
    verified: bool = False  # every file in manifest["files"] matched its size and sha256

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bundle:
        root = find_bundle_dir(path)
        if root is None:
            raise BundleError(f"{path} is not a bundle (no {MANIFEST} beside it); build one with `sed-export build`")
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{root / MANIFEST} is not valid JSON ({e}); rebuild the bundle with --force") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise BundleError(
                f"{root / MANIFEST} is not a {FORMAT} manifest (format {found!r}); rebuild it with this sed-deploy"
            )
        _check_manifest(manifest, root / MANIFEST)
        bundle = cls(root=root, manifest=manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Every file the manifest lists exists with its recorded size and sha256."""
        for name, meta in self.manifest["files"].items():
            path = self.root / name
            if not path.is_file():
                raise BundleError(f"bundle file {path} is missing; rebuild the bundle with `sed-export build --force`")
            if path.stat().st_size != meta.get("bytes") or sha256_file(path) != meta.get("sha256"):
                raise BundleError(
                    f"bundle file {path} does not match its manifest hash (modified or truncated); "
                    "rebuild the bundle with `sed-export build --force`"
                )
        self.verified = True

    def path(self, graph: str) -> Path:
        return self.root / self.manifest["graphs"][graph]["file"]

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def summary(self) -> dict[str, object]:
        """The `describe()` fields every bundle backend reports: model, folder, and the weights it was exported from."""
        w = self.manifest["weights"]
        return {"model": self.model_name, "bundle": str(self.root), "checkpoint_sha256": w.get("checkpoint_sha256"),
                "weights": weights_label(w.get("source"), w.get("checkpoint_name"))}

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["model"]["clip"]["embed_dim"])

    @property
    def templates(self) -> tuple[str, ...]:
        return tuple(self.manifest["templates"])

    @property
    def input_spec(self) -> InputSpec:
        i = self.manifest["input"]
        return InputSpec(
            int(i["input_size"]), int(i["min_size"]), int(i["max_size"]), tuple(i["pixel_mean"]), tuple(i["pixel_std"])
        )  # type: ignore[arg-type]

    def bundled_embeddings(self) -> tuple[tuple[str, ...], str, np.ndarray] | None:
        """(class names, digest, (N, P, E) embeddings) of the vocabulary the bundle was built with."""
        voc = self.manifest.get("vocabulary")
        if not voc:
            return None
        from safetensors.numpy import load_file

        arr = load_file(str(self.root / voc["embeddings"]))["embeddings"]
        return tuple(voc["classes"]), str(voc["digest"]), arr
