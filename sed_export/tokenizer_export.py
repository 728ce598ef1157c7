"""Write open_clip's CLIP BPE tokenizer as a Hugging Face `tokenizers` JSON, so the runtime needs no torch.

The vocabulary and merges come from the BPE file open_clip ships (the one SimpleTokenizer reads), laid out the
way SimpleTokenizer builds them: 256 byte symbols, the same with the `</w>` end-of-word suffix, one symbol per
merge, then `<start_of_text>` and `<end_of_text>`. Text cleaning (ftfy, HTML unescape, whitespace, lower case)
stays in Python (`sed_runtime.tokenizer`) because `tokenizers` has no ftfy.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SOT = "<start_of_text>"
EOT = "<end_of_text>"
# SimpleTokenizer's split pattern without its special-token alternatives (cleaned text never produces them
# from user input in a way that matters: special tokens are added by the post-processor).
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (same order as open_clip's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def default_bpe_path() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def clip_tokenizer_json(context_length: int = 77, bpe_path: Path | None = None) -> str:
    """The tokenizer as `tokenizers` JSON: ids equal open_clip's SimpleTokenizer on cleaned text."""
    path = bpe_path or default_bpe_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    sot, eot = vocab[SOT], vocab[EOT]
    spec = {
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": context_length, "strategy": "LongestFirst", "stride": 0},
        "padding": {
            "strategy": {"Fixed": context_length},
            "direction": "Right",
            "pad_to_multiple_of": None,
            "pad_id": 0,
            "pad_type_id": 0,
            "pad_token": "!",
        },
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t, i in ((SOT, sot), (EOT, eot))
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Removed", "invert": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": SOT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": EOT, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": SOT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": EOT, "type_id": 0}}],
            "special_tokens": {
                SOT: {"id": SOT, "ids": [sot], "tokens": [SOT]},
                EOT: {"id": EOT, "ids": [eot], "tokens": [EOT]},
            },
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": "</w>",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }
    return json.dumps(spec, ensure_ascii=False)
