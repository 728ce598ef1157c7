"""Vocabularies: the official benchmark class lists, user class-list files and inline class lists.

A class name may hold synonyms separated by ", " (the official convention, e.g. "building, edifice"); the
text encoder averages the synonyms' embeddings. Built-in and JSON vocabularies are kept byte-for-byte
(ade150 has "bed " with a trailing space, and that is what the official model saw).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import VocabularyError

__all__ = ["BUILTIN_VOCABULARIES", "Vocabulary", "builtin_vocabularies", "load_vocabulary"]

BUILTIN_VOCABULARIES: tuple[str, ...] = ("ade150", "ade847", "coco", "pc459", "pc59", "voc20", "voc20b", "shapes")
_INLINE_HINT = "--classes 'cat; dog, puppy; sky'"


@dataclass(frozen=True)
class Vocabulary:
    """A named, ordered list of class names; index i of every score map is `classes[i]`."""

    name: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return len(self.classes)

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of the class list (names verbatim, order kept)."""
        canon = json.dumps(list(self.classes), ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @property
    def display_names(self) -> tuple[str, ...]:
        """One short label per class for legends: the first synonym, stripped."""
        return tuple(c.split(",")[0].strip() for c in self.classes)


def builtin_vocabularies() -> tuple[str, ...]:
    """Names of the vocabularies shipped with the package (the official benchmark class lists)."""
    return BUILTIN_VOCABULARIES


def load_vocabulary(spec: str | os.PathLike[str] | None = None, *, classes: str | None = None) -> Vocabulary:
    """Load a vocabulary from a built-in name, a class-list file, or an inline list.

    spec: a built-in name (see `builtin_vocabularies()`), a `.json` file holding a JSON list of strings
        (the official format, names kept verbatim), or any other text file with one class per line (blank
        lines and lines starting with '#' ignored, whitespace around the line and around each ","-separated
        synonym stripped, synonyms re-joined with ", ").
    classes: an inline list, classes separated by ";" and synonyms by ",":
        "cat; dog, puppy; sky" -> ["cat", "dog, puppy", "sky"].
    Exactly one of the two must be given. Every problem raises a one-line `SedUserError`.
    """
    if (spec is None) == (classes is None):
        raise VocabularyError(
            "give exactly one vocabulary: a built-in name or class-list file, or an inline list "
            f"({_INLINE_HINT}), not {'both' if spec is not None else 'neither'}"
        )
    if classes is not None:
        vocab = Vocabulary("custom", _parse_inline(classes))
        source = "--classes"
    else:
        vocab, source = _load_spec(spec)  # type: ignore[arg-type]
    _validate(vocab.classes, source)
    return vocab


# ---------------------------------------------------------------------------------------------------------


def _builtin_list() -> str:
    return ", ".join(BUILTIN_VOCABULARIES)


def _normalise_synonyms(entry: str) -> str:
    return ", ".join(s.strip() for s in entry.split(","))


def _parse_inline(text: str) -> tuple[str, ...]:
    if not text.strip():
        raise VocabularyError(f"--classes is empty; list at least one class, e.g. {_INLINE_HINT}")
    return tuple(_normalise_synonyms(part) for part in text.split(";"))


def _load_spec(spec: str | os.PathLike[str]) -> tuple[Vocabulary, str]:
    text = os.fspath(spec)
    key = text.strip().lower()
    if key in BUILTIN_VOCABULARIES:
        data = Path(__file__).parent / "data" / "vocabularies" / f"{key}.json"  # package data
        return Vocabulary(
            key, _parse_json(data.read_text(encoding="utf-8"), f"built-in vocabulary {key}")
        ), key
    path = Path(text).expanduser()
    if path.is_dir():
        raise VocabularyError(f"vocabulary path {str(path)!r} is a folder; give a .json or .txt class-list file")
    if not path.exists():
        if _looks_like_path(text):
            raise VocabularyError(
                f"vocabulary file {str(path)!r} not found; check the path, or use a built-in "
                f"({_builtin_list()}) or {_INLINE_HINT}"
            )
        raise VocabularyError(
            f"unknown vocabulary {text!r}; use a built-in ({_builtin_list()}), a path to a .json/.txt "
            f"class-list file, or {_INLINE_HINT}"
        )
    source = f"vocabulary file {str(path)!r}"
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise VocabularyError(f"{source} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise VocabularyError(f"cannot read {source} ({e.strerror or e}); check its permissions") from None
    if path.suffix.lower() == ".json":
        names = _parse_json(content, source)
    else:
        names = _parse_lines(content)
    return Vocabulary(path.stem, names), source


def _looks_like_path(text: str) -> bool:
    seps = {"/", os.sep, os.altsep or "/"}
    return any(sep in text for sep in seps) or Path(text).suffix != ""


def _parse_json(content: str, source: str) -> tuple[str, ...]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        raise VocabularyError(
            f"{source} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            'it must be a JSON list of class names like ["cat", "dog, puppy"]'
        ) from None
    if not isinstance(data, list):
        raise VocabularyError(
            f"{source} holds a JSON {type(data).__name__}, not a list; "
            'it must be a JSON list of class names like ["cat", "dog, puppy"]'
        )
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise VocabularyError(
                f"{source}: item {i} is a {type(item).__name__} ({json.dumps(item)[:40]}), not a string; "
                "every class name must be a JSON string"
            )
    return tuple(data)


def _parse_lines(content: str) -> tuple[str, ...]:
    names = []
    for line in content.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        names.append(_normalise_synonyms(s))
    return tuple(names)


def _dup_key(name: str) -> str:
    # The CLIP tokenizer lower-cases and collapses whitespace, so these spellings give identical prompts.
    return ", ".join(" ".join(s.split()) for s in name.split(",")).casefold()


def _validate(names: Iterable[str], source: str) -> None:
    names = tuple(names)
    if not names:
        raise VocabularyError(f"{source} has no classes; give at least one class name")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name.strip():
            raise VocabularyError(f"{source}: class {i} has an empty name; remove it or give it a name")
        if any(not s.strip() for s in name.split(",")):
            raise VocabularyError(
                f"{source}: class {i} ({name.strip()!r}) has an empty synonym; "
                "separate synonyms with single commas and drop trailing ones"
            )
        key = _dup_key(name)
        if key in seen:
            raise VocabularyError(
                f"{source}: duplicate class {name.strip()!r} (classes {seen[key]} and {i}); "
                "each class may appear only once"
            )
        seen[key] = i
