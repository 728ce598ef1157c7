"""The Python API raises our documented exception types (sed_runtime.errors), each a SedUserError with the
same one-line message the CLIs print; no plain ValueError or traceback-only failure for bad user input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import need

from sed_runtime.errors import (
    BundleError,
    DatasetError,
    ImageError,
    OutputError,
    SedUserError,
    VocabularyError,
)


def _fake_bundle(root: Path, sha: str) -> Path:
    from sed_runtime.bundle import FORMAT, MANIFEST

    root.mkdir()
    (root / "decoder.onnx").write_bytes(b"not really a graph")
    manifest = {"format": FORMAT, "model": {"name": "x"}, "precision": "fp32", "graphs": {}, "input": {},
                "templates": [], "weights": {},
                "files": {"decoder.onnx": {"bytes": 18, "sha256": sha}}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_bundle_errors(tmp_path):
    from sed_runtime.bundle import Bundle, sha256_file

    with pytest.raises(BundleError, match="is not a bundle"):
        Bundle.open(tmp_path)
    damaged = _fake_bundle(tmp_path / "b", "0" * 64)
    with pytest.raises(BundleError, match="does not match its manifest hash") as err:
        Bundle.open(damaged)
    assert isinstance(err.value, SedUserError) and "\n" not in str(err.value)
    good = _fake_bundle(tmp_path / "c", sha256_file(damaged / "decoder.onnx"))
    assert Bundle.open(good).verified


def test_image_vocabulary_dataset_and_output_errors(tmp_path):
    from sed_runtime.cli_common import check_output_folder
    from sed_runtime.evaluation import folder_dataset
    from sed_runtime.preprocess import load_image
    from sed_runtime.vocab import load_vocabulary

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(VocabularyError):
        load_vocabulary("no-such-vocabulary")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DatasetError):
        folder_dataset(tmp_path / "images", tmp_path / "labels", 3)
    with pytest.raises(OutputError, match="is a file"):
        check_output_folder(tmp_path / "notes.png")


def test_model_errors():
    need("torch")
    from sed_export.config import load_model_config
    from sed_runtime.errors import ModelError

    with pytest.raises(ModelError, match="unknown model"):
        load_model_config("sed-xl")
