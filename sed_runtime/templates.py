"""Prompt templates (the official SED prompt ensemble) and the official per-class prompt expansion."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from .errors import VocabularyError

__all__ = ["class_prompts", "known_templates", "load_templates"]


@functools.lru_cache(maxsize=1)
def _all_templates() -> dict[str, tuple[str, ...]]:
    text = (Path(__file__).parent / "data" / "templates.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    return {str(k): tuple(str(t) for t in v) for k, v in raw.items()}


def known_templates() -> tuple[str, ...]:
    """Names of the prompt ensembles shipped with the package."""
    return tuple(sorted(_all_templates()))


def load_templates(name: str = "imagenet") -> tuple[str, ...]:
    """The prompt ensemble `name` (each template holds one "{}"), in the official order."""
    table = _all_templates()
    if name not in table:
        raise VocabularyError(f"unknown prompt template set {name!r}; use one of: {', '.join(sorted(table))}")
    return table[name]


def class_prompts(class_name: str, templates: Sequence[str]) -> tuple[list[str], int]:
    """Prompts for one class and its number of synonyms S, in the official SED/CAT-Seg order.

    A name holding ", " is a list of synonyms: the prompts are template-major, then synonym
    (`[t.format(s) for t in templates for s in synonyms]`, so they reshape to (P, S)); any other name
    gives `[t.format(name) for t in templates]` and S = 1. The name is used verbatim (no stripping).
    """
    if ", " in class_name:
        splits = class_name.split(", ")
        return [t.format(s) for t in templates for s in splits], len(splits)
    return [t.format(class_name) for t in templates], 1
