"""CLIP tokenizer without torch: the bundle's `tokenizer.json` run by Hugging Face `tokenizers`.

Cleaning matches open_clip's SimpleTokenizer ("lower" mode): ftfy.fix_text, HTML unescape twice, strip,
collapse whitespace, lower case. Over-long prompts are cut to context_length with the end token kept last,
as open_clip does.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VocabularyError


def longest_prompt(tokens: Any) -> int:
    """Columns a causal CLIP text tower needs for this batch: up to the last end-of-text token (inclusive).

    The end token has the largest id, so `argmax` finds it in each row, as CLIP's pooling does. A causal
    transformer's output at that position does not depend on any later column, so cutting the batch there
    gives the same embeddings for a fraction of the work (prompts are 10-20 of 77 tokens). Works on numpy
    arrays and torch tensors alike.
    """
    if tokens.shape[0] == 0:
        return int(tokens.shape[1])
    return int(tokens.argmax(-1).max()) + 1


def clean_text(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Callable: list of texts -> int64 (T, context_length) token ids, zero padded."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        trunc = tokenizer.truncation
        if not trunc or not tokenizer.padding:
            raise VocabularyError("tokenizer.json has no fixed truncation/padding; re-export the bundle")
        self.context_length = int(trunc["max_length"])

    @classmethod
    def from_str(cls, text: str) -> ClipTokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text))
        except Exception as exc:  # tokenizers raises plain Exception subclasses with long messages
            raise VocabularyError(f"tokenizer.json is not a valid tokenizer ({str(exc).splitlines()[0][:120]}); "
                               "re-export the bundle") from None

    @classmethod
    def from_file(cls, path: Path | str) -> ClipTokenizer:
        p = Path(path)
        try:
            return cls.from_str(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise VocabularyError(f"cannot read tokenizer {p}: {exc.strerror}; re-export the bundle") from None

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        encs = self._tok.encode_batch([clean_text(t) for t in texts])
        return np.asarray([e.ids for e in encs], dtype=np.int64).reshape(len(texts), self.context_length)
