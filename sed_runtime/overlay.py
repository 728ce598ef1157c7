"""A human-readable picture of a segmentation: the image with class colours blended in, plus a legend panel.

Colours come from a fixed golden-ratio palette indexed by class, so the same class index has the same colour
in every image and every run; the legend lists only classes present, largest first, with their area.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .postprocess import class_fractions

__all__ = ["FALLBACK_FONTS", "palette", "render_overlay"]

MAX_LEGEND_ENTRIES = 40
_MAX_NAME_CHARS = 40
_BG = (255, 255, 255)
_FG = (20, 20, 20)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def palette(num: int) -> np.ndarray:
    """(num, 3) uint8 distinct colours: hue steps by the golden ratio so neighbours in index order differ most."""
    idx = np.arange(num)
    hues = (idx * 0.6180339887498949 + 0.11) % 1.0
    sats = 0.55 + 0.4 * ((idx * 0.7548776662466927) % 1.0)
    vals = 0.75 + 0.25 * ((idx * 0.5698402909980532) % 1.0)
    rgb = [colorsys.hsv_to_rgb(hh, ss, vv) for hh, ss, vv in zip(hues, sats, vals)]
    return (np.asarray(rgb, dtype=np.float64).reshape(num, 3) * 255 + 0.5).astype(np.uint8)


# Fonts tried, in order, for a legend label the built-in font cannot draw (it covers basic Latin only: not even
# "é"). SED_FONT (a .ttf/.otf/.ttc file) goes first. Labels no font here can draw show the missing characters
# as U+XXXX, so a class name is never a row of boxes; the JSON summary always holds the exact names.
FALLBACK_FONTS: tuple[str, ...] = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Latin, Greek, Cyrillic (Debian, Ubuntu)
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # fonts-noto-cjk
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf",  # emoji as outlines
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/seguisym.ttf",
    "C:/Windows/Fonts/arial.ttf",
)
_NOT_A_GLYPH = "\U000F0000"  # a private-use code point: fonts draw their "missing glyph" box for it


def _font(size: int) -> Font:
    """Pillow's built-in font, scaled where Pillow supports it (>= 10.1), else the fixed bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


class _LegendFonts:
    """The built-in font first, then the fallbacks that exist here, loaded on first need, at one size."""

    def __init__(self, size: int) -> None:
        import os

        self.size = size
        self.default = _font(size)
        extra = os.environ.get("SED_FONT")
        self._paths = [p for p in ((extra,) if extra else ()) + FALLBACK_FONTS if os.path.isfile(p)]
        self._loaded: list[Font] | None = None
        self._missing: dict[int, tuple[tuple[int, int], bytes]] = {}  # id(font) -> its missing-glyph mask

    def _fallbacks(self) -> list[Font]:
        if self._loaded is None:
            self._loaded = []
            for path in self._paths:
                try:
                    self._loaded.append(ImageFont.truetype(path, self.size))
                except OSError:  # unreadable or not a font: skip it
                    continue
        return self._loaded

    def _draws(self, font: Font, ch: str) -> bool:
        if ch.isspace():
            return True
        if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap font only encodes latin-1
            return ord(ch) < 256
        if id(font) not in self._missing:
            box = font.getmask(_NOT_A_GLYPH)
            self._missing[id(font)] = (box.size, bytes(box))
        glyph = font.getmask(ch)
        return (glyph.size, bytes(glyph)) != self._missing[id(font)]

    def pick(self, text: str) -> tuple[Font, str]:
        """The first font that draws every character of `text`; else the one drawing most, with the rest as U+XXXX."""
        best, best_count = self.default, -1
        for font in (self.default, *self._fallbacks()):
            count = sum(self._draws(font, ch) for ch in text)
            if count == len(text):
                return font, text
            if count > best_count:
                best, best_count = font, count
        return best, "".join(ch if self._draws(best, ch) else f"U+{ord(ch):04X}" for ch in text)


def _label(name: str, fraction: float) -> str:
    if len(name) > _MAX_NAME_CHARS:
        name = name[: _MAX_NAME_CHARS - 3] + "..."
    return f"{name}  {100.0 * fraction:.1f}%"


def render_overlay(
    img_rgb_uint8: np.ndarray, seg: np.ndarray, class_names: Sequence[str], alpha: float = 0.5
) -> Image.Image:
    """RGB image: left, the original-size image blended with class colours; right, a legend of classes present."""
    img = np.asarray(img_rgb_uint8)
    seg = np.asarray(seg)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {img.shape} dtype {img.dtype}")
    if seg.shape != img.shape[:2]:
        raise ValueError(f"segmentation {seg.shape} does not match image {img.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = seg.shape
    num = max(len(class_names), int(seg.max()) + 1 if seg.size else 0, 1)
    colours = palette(num)
    blended = img.astype(np.float32) * (1.0 - alpha) + colours[seg].astype(np.float32) * alpha
    left = np.clip(blended + 0.5, 0, 255).astype(np.uint8)

    present = class_fractions(seg, num)
    font_size = int(np.clip(round(h / 32), 12, 28))
    fonts = _LegendFonts(font_size)
    font = fonts.default
    shown = present[:MAX_LEGEND_ENTRIES]
    labels = [fonts.pick(_label(class_names[i] if i < len(class_names) else f"class {i}", f)) for i, f in shown]
    more = f"+ {len(present) - len(shown)} more" if len(present) > len(shown) else None

    def text_w(text: str, with_font: Font = font) -> int:
        box = with_font.getbbox(text)
        return int(box[2] - box[0])

    top, bottom = font.getbbox("Ag|")[1::2]
    line_h = int(bottom - top) + max(4, font_size // 3)
    swatch = int(bottom - top)
    pad = max(6, font_size // 2)
    title = "classes (area)"
    widths = [text_w(title), *(text_w(t, f) for f, t in labels), *([text_w(more)] if more else [])]
    panel_w = pad * 3 + swatch + max(widths)
    panel_h = pad * 2 + line_h * (len(widths))

    canvas = Image.new("RGB", (w + panel_w, max(h, panel_h)), _BG)
    canvas.paste(Image.fromarray(left), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0, y = w + pad, pad
    draw.text((x0, y - top), title, fill=_FG, font=font)
    y += line_h
    for (i, _), (label_font, label) in zip(shown, labels):
        c = tuple(int(v) for v in colours[i])
        draw.rectangle([x0, y, x0 + swatch - 1, y + swatch - 1], fill=c, outline=_FG)
        draw.text((x0 + swatch + pad, y - top), label, fill=_FG, font=label_font)
        y += line_h
    if more:
        draw.text((x0 + swatch + pad, y - top), more, fill=_FG, font=font)
    return canvas
