"""Vocabulary loading: built-ins, class-list files, inline lists, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sed_runtime.errors import SedUserError
from sed_runtime.templates import class_prompts, load_templates
from sed_runtime.vocab import Vocabulary, builtin_vocabularies, load_vocabulary

OFFICIAL_SIZES = {
    "ade150": 150,
    "ade847": 847,
    "coco": 171,
    "pc459": 459,
    "pc59": 59,
    "voc20": 20,
    "voc20b": 59,
}


def test_builtin_list() -> None:
    assert set(builtin_vocabularies()) == set(OFFICIAL_SIZES) | {"shapes"}  # + the trained model's own


@pytest.mark.parametrize("name,size", sorted(OFFICIAL_SIZES.items()))
def test_builtins_load_with_official_sizes(name: str, size: int) -> None:
    v = load_vocabulary(name)
    assert v.name == name
    assert len(v) == size
    assert all(isinstance(c, str) for c in v.classes)
    assert len(v.display_names) == size


def test_builtin_name_case_insensitive() -> None:
    assert load_vocabulary("ADE150") == load_vocabulary("ade150")


def test_ade847_synonyms_and_ade150_kept_verbatim() -> None:
    ade847 = load_vocabulary("ade847")
    assert sum(", " in c for c in ade847.classes) == 217
    ade150 = load_vocabulary("ade150")
    assert "bed " in ade150.classes  # the official trailing space is kept
    assert "bed" in ade150.display_names


def test_display_names_and_digest() -> None:
    v = Vocabulary("x", ("building, edifice", " sky ", "cat"))
    assert v.display_names == ("building", "sky", "cat")
    assert v.digest() == Vocabulary("other-name", ["building, edifice", " sky ", "cat"]).digest()
    assert v.digest() != Vocabulary("x", ("cat", "building, edifice", " sky ")).digest()
    assert len(v.digest()) == 64
    assert isinstance(Vocabulary("x", ["a"]).classes, tuple)


def test_json_file(tmp_path: Path) -> None:
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(["cat", "dog, puppy", "bed "]), encoding="utf-8")
    v = load_vocabulary(str(p))
    assert v.name == "mine"
    assert v.classes == ("cat", "dog, puppy", "bed ")  # verbatim, official format
    assert load_vocabulary(p) == v  # a Path works too


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "classes.txt"
    p.write_text(
        "# my classes\n\n  cat  \ndog,puppy\n  # indented comment\nsky , heaven\n\n", encoding="utf-8"
    )
    v = load_vocabulary(str(p))
    assert v.name == "classes"
    assert v.classes == ("cat", "dog, puppy", "sky, heaven")
    q = tmp_path / "noext"
    q.write_text("a\nb\n", encoding="utf-8")
    assert load_vocabulary(str(q)).classes == ("a", "b")


def test_inline() -> None:
    v = load_vocabulary(classes="cat; dog, puppy; sky")
    assert v.classes == ("cat", "dog, puppy", "sky")
    assert load_vocabulary(classes=" cat ;dog,puppy;  sky ").classes == v.classes
    assert load_vocabulary(classes="road").classes == ("road",)
    assert v.display_names == ("cat", "dog", "sky")


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def _write_bytes(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


BAD_CASES = {
    "neither": lambda t: load_vocabulary(),
    "both": lambda t: load_vocabulary("ade150", classes="cat"),
    "unknown-name": lambda t: load_vocabulary("ade999"),
    "missing-json": lambda t: load_vocabulary(str(t / "nope.json")),
    "missing-path": lambda t: load_vocabulary(str(t / "sub" / "nope")),
    "folder": lambda t: load_vocabulary(str(t)),
    "inline-empty": lambda t: load_vocabulary(classes="  "),
    "inline-empty-class": lambda t: load_vocabulary(classes="cat;;dog"),
    "inline-trailing-sep": lambda t: load_vocabulary(classes="cat; dog;"),
    "inline-empty-synonym": lambda t: load_vocabulary(classes="cat; dog,"),
    "inline-duplicate": lambda t: load_vocabulary(classes="cat; dog; cat"),
    "inline-duplicate-case": lambda t: load_vocabulary(classes="Cat; dog; cat"),
    "json-invalid": lambda t: load_vocabulary(_write(t, "a.json", '["cat", ')),
    "json-not-list": lambda t: load_vocabulary(_write(t, "a.json", '{"classes": ["cat"]}')),
    "json-not-strings": lambda t: load_vocabulary(_write(t, "a.json", '["cat", 3]')),
    "json-empty": lambda t: load_vocabulary(_write(t, "a.json", "[]")),
    "json-empty-name": lambda t: load_vocabulary(_write(t, "a.json", '["cat", "  "]')),
    "json-duplicate": lambda t: load_vocabulary(_write(t, "a.json", '["cat", "dog", "cat"]')),
    "txt-empty": lambda t: load_vocabulary(_write(t, "a.txt", "# only a comment\n\n")),
    "txt-duplicate": lambda t: load_vocabulary(_write(t, "a.txt", "cat\ndog\n cat\n")),
    "txt-not-utf8": lambda t: load_vocabulary(_write_bytes(t, "b.txt", b"\xff\xfe\xfa cat")),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_user_error(case: str, tmp_path: Path) -> None:
    with pytest.raises(SedUserError) as exc:
        BAD_CASES[case](tmp_path)
    msg = str(exc.value)
    assert msg and "\n" not in msg and ";" in msg, msg  # problem; fix


def test_error_messages_are_specific(tmp_path: Path) -> None:
    with pytest.raises(SedUserError, match="ade150.*--classes"):
        load_vocabulary("ade999")
    with pytest.raises(SedUserError, match="not found"):
        load_vocabulary(str(tmp_path / "nope.json"))
    with pytest.raises(SedUserError, match="duplicate class 'cat'"):
        load_vocabulary(classes="cat; dog; cat")
    with pytest.raises(SedUserError, match="no classes"):
        load_vocabulary(_write(tmp_path, "e.json", "[]"))
    with pytest.raises(SedUserError, match="not valid JSON"):
        load_vocabulary(_write(tmp_path, "i.json", "[1,"))
    with pytest.raises(SedUserError, match="not a string"):
        load_vocabulary(_write(tmp_path, "s.json", '["a", null]'))


def test_templates() -> None:
    t = load_templates()
    assert len(t) == 80 and all("{}" in x for x in t)
    assert load_templates("imagenet") is t
    with pytest.raises(SedUserError, match="imagenet") as exc:
        load_templates("nope")
    assert "\n" not in str(exc.value)


def test_class_prompts_plain() -> None:
    texts, s = class_prompts("bed ", ("a {}.", "the {} here"))
    assert s == 1 and texts == ["a bed .", "the bed  here"]
