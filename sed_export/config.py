"""Model configs as data: built-in `sed-b`, `sed-l`, `sed-tiny`, or any JSON file of the same shape.

A config is `{"name", "clip": <open_clip model config>, "sed": <decoder + preprocessing settings>}`. The
`sed` keys are the official config keys, lowercased (DECODER_DIMS -> decoder_dims, ...).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sed_runtime.errors import ModelError

PROMPT_ENSEMBLES = ("imagenet",)
CONFIG_DIR = Path(__file__).with_name("configs")  # package data, next to this module
WEIGHTS_DIR = Path(__file__).with_name("weights")  # trained weights shipped with the package (model cards beside)


@dataclass(frozen=True)
class SedSettings:
    """Decoder and preprocessing settings (the `sed` block)."""

    decoder_dims: tuple[int, int, int]
    decoder_guidance_dims: tuple[int, int, int]
    decoder_guidance_proj_dims: tuple[int, int, int]
    hidden_dims: int
    num_heads: int
    kernel_size: tuple[int, int, int]
    pooling_sizes: tuple[int, int]
    text_guidance_dim: int
    prompt_ensemble: str
    input_size: int
    min_size_test: int
    max_size_test: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]


@dataclass(frozen=True)
class ModelConfig:
    """A complete model description: what to build and how to feed it."""

    name: str
    clip: dict[str, Any]
    sed: SedSettings
    description: str = ""
    weights: str | None = None  # file name under sed_export/weights/: trained weights shipped with the package

    @property
    def shipped_weights(self) -> Path | None:
        """Path of the weights shipped for this config (used when no --checkpoint is given), if any."""
        return WEIGHTS_DIR / self.weights if self.weights else None

    @property
    def embed_dim(self) -> int:
        return int(self.clip["embed_dim"])

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "description": self.description, "clip": self.clip, "sed": asdict(self.sed)}
        if self.weights:
            d["weights"] = self.weights
        return json.loads(json.dumps(d))  # tuples -> lists, deep copy


_SED_FIELDS: dict[str, tuple[type, int | None]] = {
    # key: (element type, expected length or None for a scalar)
    "decoder_dims": (int, 3),
    "decoder_guidance_dims": (int, 3),
    "decoder_guidance_proj_dims": (int, 3),
    "hidden_dims": (int, None),
    "num_heads": (int, None),
    "kernel_size": (int, 3),
    "pooling_sizes": (int, 2),
    "text_guidance_dim": (int, None),
    "prompt_ensemble": (str, None),
    "input_size": (int, None),
    "min_size_test": (int, None),
    "max_size_test": (int, None),
    "pixel_mean": (float, 3),
    "pixel_std": (float, 3),
}


def builtin_models() -> list[str]:
    """Names of the configs shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _fits(value: Any, kind: type) -> bool:
    """Is `value` a JSON scalar of `kind` (ints must be whole numbers; bools are not numbers)?"""
    if kind is str:
        return isinstance(value, str)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return numeric and (kind is float or float(value).is_integer())


def _parse_sed(raw: Any, where: str) -> SedSettings:
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: 'sed' must be an object with keys {', '.join(_SED_FIELDS)}")
    missing = [k for k in _SED_FIELDS if k not in raw]
    unknown = [k for k in raw if k not in _SED_FIELDS]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(unknown)}")
        raise ModelError(f"{where}: 'sed' block has {'; '.join(parts)}; use the keys of a built-in config")
    values: dict[str, Any] = {}
    for key, (kind, length) in _SED_FIELDS.items():
        v = raw[key]
        if length is None:
            if not _fits(v, kind):
                raise ModelError(f"{where}: sed.{key} must be a {kind.__name__}, got {v!r}")
            values[key] = kind(v)
        else:
            if not (isinstance(v, list) and len(v) == length and all(_fits(x, kind) for x in v)):
                raise ModelError(f"{where}: sed.{key} must be a list of {length} {kind.__name__}s, got {v!r}")
            values[key] = tuple(kind(x) for x in v)
    s = SedSettings(**values)
    if s.prompt_ensemble not in PROMPT_ENSEMBLES:
        raise ModelError(f"{where}: sed.prompt_ensemble {s.prompt_ensemble!r} is not supported; use 'imagenet'")
    if s.text_guidance_dim != 0:
        raise ModelError(f"{where}: sed.text_guidance_dim must be 0 (the official SED configs disable it)")
    if any(p < 1 for p in s.pooling_sizes) or min(s.decoder_dims + s.decoder_guidance_proj_dims) < 1:
        raise ModelError(f"{where}: sed dims and pooling_sizes must be positive")
    if s.hidden_dims % s.num_heads or any(d % s.num_heads for d in s.decoder_dims[:2]):
        raise ModelError(f"{where}: sed.hidden_dims and decoder_dims[:2] must be divisible by num_heads")
    if any(d % 16 for d in s.decoder_dims):
        raise ModelError(f"{where}: sed.decoder_dims must be multiples of 16 (GroupNorm uses dims // 16 groups)")
    return s


def _parse_clip(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(raw):
        raise ModelError(f"{where}: 'clip' must be an open_clip model config with embed_dim, vision_cfg and text_cfg")
    vision = raw["vision_cfg"]
    if not isinstance(vision, dict) or "timm_model_name" not in vision:
        raise ModelError(f"{where}: clip.vision_cfg must name a timm ConvNeXt trunk (timm_model_name)")
    if not str(vision["timm_model_name"]).startswith("convnext"):
        raise ModelError(
            f"{where}: clip.vision_cfg.timm_model_name {vision['timm_model_name']!r} is not a ConvNeXt; "
            "SED needs a ConvNeXt CLIP"
        )
    return raw


def model_config_from_dict(raw: Any, where: str = "model config") -> ModelConfig:
    """Validate a config dict; every problem becomes one SedUserError line."""
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: expected a JSON object with 'name', 'clip' and 'sed'")
    for key in ("name", "clip", "sed"):
        if key not in raw:
            raise ModelError(f"{where}: missing '{key}'; see sed_export/configs/sed-b.json for the shape")
    return ModelConfig(
        name=str(raw["name"]),
        clip=_parse_clip(raw["clip"], where),
        sed=_parse_sed(raw["sed"], where),
        description=str(raw.get("description", "")),
        weights=_parse_weights(raw.get("weights"), where),
    )


def _parse_weights(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "/" in value or "\\" in value or not value.endswith(".safetensors"):
        raise ModelError(f"{where}: 'weights' must be the file name of a .safetensors file in sed_export/weights")
    return value


def load_model_config(spec: str | Path) -> ModelConfig:
    """Resolve `--model`: a built-in name (`sed-b`, `sed-l`, `sed-tiny`) or a JSON file of the same shape."""
    spec_s = str(spec)
    if spec_s in builtin_models():
        text = (CONFIG_DIR / f"{spec_s}.json").read_text()
        return model_config_from_dict(json.loads(text), where=spec_s)
    path = Path(spec_s)
    if not path.exists():
        raise ModelError(
            f"unknown model {spec_s!r}: use one of {', '.join(builtin_models())} or a path to a model JSON file"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read model config {path}: {e}; pass a valid JSON file") from None
    return model_config_from_dict(raw, where=str(path))
