"""The CLIP side of SED: an open_clip ConvNeXt CLIP and its dense (per-pixel) image embedding.

Stock open_clip only returns a pooled vector; SED's modified `TimmModel.forward(dense=True)` returns the
multi-scale trunk features plus the CLIP projection applied at every pixel of the last stage. We rebuild
that path from the stock modules so the official checkpoint's keys load unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class ImageFeatures(NamedTuple):
    """Encoder outputs for one image: the dense CLIP map F_v and the skip features F4, F3, F2."""

    dense: torch.Tensor  # (1, E, 24, 24)
    res4: torch.Tensor  # (1, C4, 48, 48)
    res3: torch.Tensor  # (1, C3, 96, 96)
    res2: torch.Tensor  # (1, C2, 192, 192)


# ConvNeXt trunks smaller than timm's smallest (convnext_atto), for models we train ourselves on CPU. Named
# like timm's variants so a config can use them as `timm_model_name`; registered with timm on first use.
SMALL_CONVNEXTS: dict[str, dict[str, tuple[int, ...]]] = {
    "convnext_sed_micro": {"depths": (2, 2, 4, 2), "dims": (32, 64, 128, 256)},
}


def register_small_convnexts() -> None:
    """Make `SMALL_CONVNEXTS` creatable with `timm.create_model` (as open_clip's TimmModel does)."""
    from timm.models import is_model, register_model
    from timm.models.convnext import _create_convnext

    for name, arch in SMALL_CONVNEXTS.items():
        if is_model(name):
            continue

        def builder(pretrained: bool = False, _name: str = name, _arch: dict = arch, **kwargs: object) -> nn.Module:
            if pretrained:
                raise ValueError(f"{_name} has no pretrained weights")
            if kwargs.get("pretrained_cfg") is None:  # timm passes None; a config of our own keeps it quiet
                kwargs["pretrained_cfg"] = {"architecture": _name}
            return _create_convnext(_name, pretrained=False, **dict(_arch, conv_mlp=True, **kwargs))

        builder.__name__ = name
        builder.__module__ = __name__
        register_model(builder)


def build_clip(config: ModelConfig) -> nn.Module:
    """Instantiate the open_clip CLIP described by `config.clip`, with random weights (no download)."""
    import open_clip

    register_small_convnexts()

    cfg = config.clip
    extra = {k: v for k, v in cfg.items() if k not in ("embed_dim", "vision_cfg", "text_cfg")}
    return open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]), text_cfg=dict(cfg["text_cfg"]), **extra
    )


def encode_image_dense(clip_model: nn.Module, image: torch.Tensor) -> ImageFeatures:
    """Run the ConvNeXt trunk stage by stage and project the last stage per pixel into the CLIP space.

    Equivalent to the official `clip_model.encode_image(x, dense=True)`: stem -> stages -> norm_pre ->
    trunk.head (avg-pool of a 1x1 map is the identity, LayerNorm2d, flatten) -> visual.head (proj or MLP).
    The per-pixel LayerNorm is done channels-last instead of on a fake (H*W, C, 1, 1) batch.
    """
    visual = clip_model.visual
    trunk = visual.trunk
    x = trunk.stem(image)
    feats = []
    for stage in trunk.stages:
        x = stage(x)
        feats.append(x)
    res2, res3, res4, res5 = feats
    x = trunk.norm_pre(res5)
    norm = trunk.head.norm
    y = F.layer_norm(
        x.permute(0, 2, 3, 1).float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
    ).to(x.dtype)  # fp32 even in a half-precision export
    y = visual.head(y)  # Linear / Mlp act on the last (channel) axis
    dense = y.permute(0, 3, 1, 2)
    return ImageFeatures(dense=dense, res4=res4, res3=res3, res2=res2)


def check_dense_head(clip_model: nn.Module) -> None:
    """Fail early if the timm head is not the norm-only head the dense path assumes."""
    head = clip_model.visual.trunk.head
    for name in ("fc", "pre_logits"):
        mod = getattr(head, name, None)
        if mod is not None and not isinstance(mod, nn.Identity):
            raise ValueError(f"unexpected timm head: trunk.head.{name} is {type(mod).__name__}, expected Identity")
