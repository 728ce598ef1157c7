"""The official SED test-time preprocessing, reproduced in numpy + Pillow so the runtime needs no torch.

Official path (detectron2 + SED `forward`): `read_image(format="RGB")` -> `ResizeShortestEdge(640, 2560)` with
PIL bilinear -> `(x - mean) / std` in float32 -> `F.interpolate(..., (768, 768), "bilinear",
align_corners=False)`. Every step below copies that arithmetic, so backends see the tensor the reference sees.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError, SedUserError

__all__ = [
    "Preprocessed",
    "bilinear_resize_chw",
    "lerp",
    "linear_taps",
    "load_image",
    "preprocess",
    "resize_shortest_edge",
    "shortest_edge_size",
]

_DECODE_FIX = "re-export it as JPEG or PNG, or remove it from the inputs"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """HxWx3 uint8 RGB, as detectron2's `read_image(format="RGB")`: EXIF orientation applied, alpha dropped.

    Decodes fully here (`.load()`), so a truncated or corrupt file fails before any work is done, with a
    one-line `SedUserError` naming the file and the fix instead of a traceback deep in the pipeline.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image not found: {p}; check the path and that the file exists")
    if p.is_dir():
        raise ImageError(f"{p} is a folder, not an image file; pass image files (.jpg, .png, ...)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (two raw lines) above 89 MP; a photo that size is legitimate input, and it errors
            # out by itself above twice that (DecompressionBombError, handled below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Corrupt metadata Pillow skips by itself (TIFF tags, EXIF) is reported as raw UserWarnings; the
            # pixels still decode, and a broken image fails below with one line.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(p) as im:
                im.load()  # the first frame of a multi-frame file (GIF, TIFF): what detectron2 reads too
                oriented = ImageOps.exif_transpose(im)
                rgb = _to_rgb8(oriented, p)
    except SedUserError:
        raise
    except PermissionError as e:
        raise ImageError(f"cannot read image {p}: permission denied; fix its permissions") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {p} is too large to decode safely ({_one_line(e)}); downscale it first") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's errors for unknown/corrupt/truncated data
        reason = _one_line(e) or type(e).__name__
        raise ImageError(f"cannot decode image {p} ({reason}); {_DECODE_FIX}") from e
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image {p} decoded to an unusable shape {arr.shape}; {_DECODE_FIX}")
    return np.ascontiguousarray(arr)


def _to_rgb8(im: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB as detectron2 reads it, without Pillow's silent clipping of high-bit-depth modes.

    RGBA/LA lose alpha without compositing and L/P/1/CMYK/YCbCr become RGB (Pillow's conversions). 16- and
    32-bit integer grey ("I;16", "I") is scaled from its full range (65535 -> 255): Pillow's own convert() clips
    every value above 255 to white. Float grey ("F") in [0, 1] is scaled by 255, in [0, 255] kept; anything else
    is refused rather than guessed.
    """
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the documented route for palette transparency (no warning); alpha dropped next
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F":
            if not np.isfinite(a).all() or lo < 0 or hi > 255:
                raise ImageError(f"image {path} is a float image with values in [{lo:g}, {hi:g}]; only [0, 1] or "
                                   "[0, 255] can be read: convert it to an 8-bit PNG or JPEG")
            scale = 255.0 if hi <= 1.0 else 1.0
        else:
            if lo < 0 or hi > 65535:
                raise ImageError(f"image {path} has {mode} values in [{lo:g}, {hi:g}], outside 16 bits; convert it "
                                   "to an 8-bit PNG or JPEG")
            scale = 255.0 / 65535.0 if (mode.startswith("I;16") or hi > 255) else 1.0
        grey = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    return im.convert("RGB")


def shortest_edge_size(h: int, w: int, short: int = 640, max_size: int = 2560) -> tuple[int, int]:
    """(new_h, new_w) exactly as detectron2 `ResizeShortestEdge.get_output_shape` (same float steps, +0.5 trunc)."""
    size = short * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_shortest_edge(img: np.ndarray, short: int = 640, max_size: int = 2560) -> np.ndarray:
    """PIL bilinear resize to `shortest_edge_size`: what detectron2's ResizeTransform does for uint8 images."""
    h, w = img.shape[:2]
    newh, neww = shortest_edge_size(h, w, short, max_size)
    if (newh, neww) == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((neww, newh), Image.Resampling.BILINEAR))


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and float32 weights (w0, w1) of torch bilinear, align_corners=False, along one axis.

    PyTorch's CPU rule: scale = float32(in / out); src = scale * (dst + 0.5) - 0.5 (compiled as one FMA, which
    the float64 evaluation reproduces exactly), clamped at 0; i0 = min(floor(src), in - 1);
    i1 = min(i0 + 1, in - 1); w1 = clamp(src - i0, 0, 1); w0 = 1 - w1. Same size: identity (i1 = i0, w = 1, 0).
    The one place both pre- and post-processing get their interpolation rule from.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in={in_size} out={out_size}")
    dst = np.arange(out_size)
    if in_size == out_size:
        return dst, dst.copy(), np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)  # exact product, one rounding: an FMA
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, w0, w1


def lerp(a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """float32 `a * wa + b * wb` rounded as torch's CPU kernel computes it: fma(a, wa, float32(b * wb)).

    The float64 product a * wa is exact, so the result equals the fused multiply-add (bar double rounding,
    about 1 in 2**29); matching it bit for bit keeps argmax ties where torch has them.
    """
    bw = np.multiply(b, wb, dtype=np.float32)
    out = np.multiply(a, wa, dtype=np.float64)
    out += bw
    return out.astype(np.float32)


def bilinear_resize_chw(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, out_h, out_w) float32, equal to torch `F.interpolate(bilinear, align_corners=False,
    antialias=False)` on CPU: width pass first, then height, as torch's generic kernel nests them."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected (C, H, W), got shape {x.shape}")
    _, h, w = x.shape
    r0, r1, wr0, wr1 = linear_taps(h, out_h)
    c0, c1, wc0, wc1 = linear_taps(w, out_w)
    if h <= 2 * out_h:  # width pass over every input row, then pick the rows
        xw = lerp(x[:, :, c0], x[:, :, c1], wc0, wc1)
        top, bottom = xw[:, r0, :], xw[:, r1, :]
    else:  # strong downscale in height: width pass only on the rows used
        top = lerp(x[:, r0][:, :, c0], x[:, r0][:, :, c1], wc0, wc1)
        bottom = lerp(x[:, r1][:, :, c0], x[:, r1][:, :, c1], wc0, wc1)
    return lerp(top, bottom, wr0[:, None], wr1[:, None])


@dataclass(frozen=True)
class Preprocessed:
    """The model input plus the sizes postprocessing needs to map scores back onto the original image."""

    tensor: np.ndarray  # (1, 3, input_size, input_size) float32
    orig_hw: tuple[int, int]  # the image as loaded
    resized_hw: tuple[int, int]  # after the shortest-edge resize, before the square squash


def preprocess(
    img_rgb_uint8: np.ndarray,
    *,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    input_size: int = 768,
    min_size: int = 640,
    max_size: int = 2560,
) -> Preprocessed:
    """Official SED input for one HxWx3 uint8 RGB image; mean/std in 0-255 units (torch float32 arithmetic)."""
    img = np.asarray(img_rgb_uint8)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(
            f"expected an HxWx3 uint8 RGB image, got shape {img.shape} dtype {img.dtype}; use load_image()"
        )
    h, w = img.shape[:2]
    resized = resize_shortest_edge(img, min_size, max_size)
    mean = np.asarray(pixel_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pixel_std, dtype=np.float32).reshape(3, 1, 1)
    chw = resized.transpose(2, 0, 1).astype(np.float32)
    chw -= mean
    chw /= std  # a true division, as `(x - mean) / std` in torch (not a multiply by 1/std)
    tensor = bilinear_resize_chw(chw, input_size, input_size)[None]
    return Preprocessed(
        tensor=np.ascontiguousarray(tensor), orig_hw=(h, w), resized_hw=(resized.shape[0], resized.shape[1])
    )
