"""Synthetic "shapes" scenes: images with exact label maps, generated from (seed, index) with numpy + Pillow.

They give us a task a small SED can really learn on two CPU cores, so accuracy claims (fp16, int8, CER,
chunking) are judged by mIoU against ground truth instead of on random weights. No torch here: the runtime,
calibration, evaluation and tests all import it.

A scene is one or two "stuff" regions (textured backgrounds: sky, grass, water, sand, wall, road) with 1-3
"things" (flat-ish coloured shapes) on top, at random scale and rotation, occluding each other and cut by the
image border. Label maps hold class indices of `SHAPES_CLASSES`; pixels on an anti-aliased shape edge are
`IGNORE_INDEX` (255), as real datasets mark ambiguous boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["IGNORE_INDEX", "SHAPES_CLASSES", "STUFF", "THINGS", "Scene", "generate_scene", "parse_scene_spec",
           "write_scene_folder"]

IGNORE_INDEX = 255

STUFF: tuple[str, ...] = ("sky", "grass, lawn", "water, sea", "sand, beach", "wall", "road, asphalt")
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
# Every thing class has its own colour (three colours per shape kind), chosen away from the stuff textures' colours.
# Why not every shape in every colour: telling a circle from a square by its outline is a global cue that a small
# convolutional encoder trained from scratch did not pick up in a CPU budget (measured: 16% of interior cost-volume
# cells got the right shape after 2000 steps, 90% the right colour), while colour and texture are local.
_THING_COLOURS: dict[str, tuple[str, ...]] = {
    "circle": ("red", "navy", "pink"),
    "square": ("blue", "orange", "black"),
    "triangle": ("yellow", "purple", "cyan"),
    "star": ("green", "magenta", "brown"),
    "ring": ("white", "teal", "olive"),
    "cross": ("maroon", "lavender", "mint"),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35), "navy": (20, 25, 110), "pink": (250, 160, 195),
    "blue": (35, 70, 215), "orange": (245, 135, 20), "black": (15, 15, 15),
    "yellow": (240, 205, 30), "purple": (125, 40, 175), "cyan": (40, 225, 230),
    "green": (30, 190, 60), "magenta": (225, 40, 195), "brown": (125, 70, 30),
    "white": (250, 250, 250), "teal": (0, 125, 125), "olive": (125, 125, 10),
    "maroon": (115, 15, 35), "lavender": (175, 145, 240), "mint": (150, 240, 190),
}
_SYNONYMS = {"red circle": "red circle, red disc", "blue square": "blue square, blue box",
             "white ring": "white ring, white donut", "maroon cross": "maroon cross, maroon plus sign"}
THINGS: tuple[str, ...] = tuple(
    _SYNONYMS.get(f"{c} {s}", f"{c} {s}") for s in SHAPE_KINDS for c in _THING_COLOURS[s]
)
SHAPES_CLASSES: tuple[str, ...] = STUFF + THINGS  # the built-in `shapes` vocabulary, in this order

# Photo-like sizes (h, w): landscape, portrait, square and small.
_SIZES = ((480, 640), (360, 640), (600, 800), (640, 480), (640, 360), (512, 512), (300, 400), (400, 300),
          (240, 320), (427, 640))
_SS = 4  # supersampling factor for anti-aliased shape edges


@dataclass(frozen=True)
class Scene:
    """One generated sample: `image` (H, W, 3) uint8 RGB and `label` (H, W) uint8 class indices / 255."""

    image: np.ndarray
    label: np.ndarray
    seed: int
    index: int


def parse_scene_spec(spec: str) -> int | None:
    """`shapes:200` -> 200; anything else -> None (not a generated dataset)."""
    name, _, count = spec.partition(":")
    if name != "shapes":
        return None
    if not count.isdigit() or int(count) < 1:
        from .errors import SedUserError

        raise SedUserError(f"generated dataset {spec!r}: give a positive image count, e.g. shapes:200")
    return int(count)


def generate_scene(seed: int, index: int) -> Scene:
    """Deterministic: the same (seed, index) gives the same bytes on any machine with the same numpy/Pillow."""
    rng = np.random.default_rng([int(seed), int(index)])
    h, w = _SIZES[rng.integers(len(_SIZES))]
    stuff_map = _stuff_layout(rng, h, w)
    image = np.zeros((h, w, 3), np.float32)
    for s in np.unique(stuff_map):
        np.copyto(image, _stuff_texture(rng, int(s), h, w), where=(stuff_map == s)[..., None])
    label = stuff_map.astype(np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        _draw_thing(rng, image, label)
    image += 3.0 * rng.standard_normal(image.shape, dtype=np.float32)  # sensor noise
    pixels = np.rint(np.clip(image, 0, 255, out=image), out=image)
    return Scene(image=pixels.astype(np.uint8), label=label, seed=int(seed), index=int(index))


def write_scene_folder(out: Path, seed: int, count: int) -> None:
    """A dataset folder as `sed-eval` reads it: images/<name>.png and labels/<name>.png, written all at once.

    Built in a temporary sibling folder and renamed, so `out` is either complete or absent.
    """
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for i in range(count):
            scene = generate_scene(seed, i)
            name = f"shapes-{seed}-{i:05d}.png"
            Image.fromarray(scene.image).save(tmp / "images" / name)
            Image.fromarray(scene.label).save(tmp / "labels" / name)
        tmp.chmod(0o755)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- stuff -----------------------------------------------------------------------------------------------


def _stuff_layout(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) stuff class indices: a horizon (sky or wall above a ground), two grounds, or one full frame."""
    kind = rng.choice(["horizon", "horizon", "split", "full"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grounds = [1, 2, 3, 5]  # grass, water, sand, road
    if kind == "full":
        return np.full((h, w), rng.integers(len(STUFF)), np.int64)
    if kind == "horizon":
        top = 0 if rng.random() < 0.7 else 4  # sky or wall
        bottom = int(rng.choice(grounds))
        y0 = h * rng.uniform(0.25, 0.65)
        amp, freq, phase = h * rng.uniform(0, 0.06), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * math.pi)
        edge = y0 + amp * np.sin(2 * math.pi * freq * xx / w + phase)
        return np.where(yy < edge, top, bottom).astype(np.int64)
    a, b = rng.choice([g for g in range(len(STUFF))], size=2, replace=False)
    angle = rng.uniform(0, math.pi)
    offset = rng.uniform(-0.25, 0.25) * min(h, w)
    side = (xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle) - offset
    return np.where(side < 0, a, b).astype(np.int64)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = max(2, h * cells // max(h, w)), max(2, w * cells // max(h, w))
    grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR))


def _rgb(values: list[int]) -> np.ndarray:
    return np.array(values, np.float32)


def _stuff_texture(rng: np.random.Generator, stuff: int, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float texture of one stuff class over the whole frame (the caller masks it)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    jitter = rng.uniform(-12, 12, 3).astype(np.float32)
    name = STUFF[stuff].split(",")[0]
    if name == "sky":  # vertical gradient, soft white clouds
        t = (yy / h)[..., None]
        img = (1 - t) * _rgb([90, 150, 235]) + t * _rgb([175, 210, 250])
        clouds = np.clip(_smooth_noise(rng, h, w, 6) * 1.6 - 0.5, 0, 1)[..., None]
        img = img * (1 - clouds) + np.float32(245) * clouds
    elif name == "grass":
        n = _smooth_noise(rng, h, w, 24)[..., None] + 0.5 * rng.uniform(-1, 1, (h, w, 1)).astype(np.float32)
        img = _rgb([70, 140, 50]) + n * _rgb([20, 35, 15])
    elif name == "water":
        waves = np.sin(yy / rng.uniform(4, 9) + 2.5 * _smooth_noise(rng, h, w, 8))[..., None]
        img = _rgb([25, 95, 130]) + waves * _rgb([10, 25, 30])
    elif name == "sand":
        n = _smooth_noise(rng, h, w, 10)[..., None] + 0.6 * rng.uniform(-1, 1, (h, w, 1)).astype(np.float32)
        img = _rgb([215, 190, 140]) + n * _rgb([15, 15, 12])
    elif name == "wall":  # grey blocks with darker mortar lines
        bh = rng.uniform(14, 30)
        bw = bh * rng.uniform(1.8, 2.6)
        row = np.floor(yy / bh)
        shift = (row % 2) * bw / 2
        mortar = ((yy % bh) < 2.5) | (((xx + shift) % bw) < 2.5)
        img = np.where(mortar[..., None], _rgb([105, 105, 110]), _rgb([165, 160, 155]))
        img = img + 8 * _smooth_noise(rng, h, w, 16)[..., None]
    else:  # road: dark asphalt with dashed white lane marks
        n = 0.7 * rng.uniform(-1, 1, (h, w, 1)).astype(np.float32) + _smooth_noise(rng, h, w, 12)[..., None]
        img = _rgb([70, 70, 75]) + n * _rgb([10, 10, 10])
        period, lane_y = rng.uniform(60, 120), rng.uniform(0.3, 0.8) * h
        marks = (np.abs(yy - lane_y) < 3) & ((xx % period) < period / 2)
        img = np.where(marks[..., None], _rgb([230, 230, 225]), img)
    return (img + jitter).astype(np.float32)


# --- things ----------------------------------------------------------------------------------------------


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[list[tuple[float, float]]]:
    """Outlines (outer first; a second one is a hole) of a shape of radius r centred at (cx, cy)."""

    def ring_pts(radii: list[float], start: float) -> list[tuple[float, float]]:
        n = len(radii)
        angles = [start + rot + 2 * math.pi * i / n for i in range(n)]
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii)]

    if kind == "circle":
        return [ring_pts([r] * 64, 0.0)]
    if kind == "ring":
        return [ring_pts([r] * 64, 0.0), ring_pts([r * 0.55] * 64, 0.0)]
    if kind == "square":
        return [ring_pts([r] * 4, math.pi / 4)]
    if kind == "triangle":
        return [ring_pts([r] * 3, -math.pi / 2)]
    if kind == "star":
        return [ring_pts([r, r * 0.42] * 5, -math.pi / 2)]
    # cross: a plus sign of arm half-width a
    a = r * 0.34
    pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
    c, s = math.cos(rot), math.sin(rot)
    return [[(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]]


def _draw_thing(rng: np.random.Generator, image: np.ndarray, label: np.ndarray) -> None:
    """Composite one random shape onto `image` (anti-aliased) and `label` (edge pixels -> ignore)."""
    h, w = label.shape
    cls = int(rng.integers(len(THINGS)))
    colour_name, kind = THINGS[cls].split(",")[0].split(" ")
    # Large enough to span a few cells of the cost volume (1/32 of the input): sed-shapes sees 12 x 12 of them.
    r = rng.uniform(0.14, 0.32) * min(h, w)
    # centres may lie a little outside the frame, so some shapes are cut by the border
    cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
    outlines = _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
    x0, y0 = max(0, int(cx - r) - 1), max(0, int(cy - r) - 1)
    x1, y1 = min(w, int(cx + r) + 2), min(h, int(cy + r) + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    mask = Image.new("L", ((x1 - x0) * _SS, (y1 - y0) * _SS), 0)
    draw = ImageDraw.Draw(mask)
    for i, outline in enumerate(outlines):
        pts = [((x - x0) * _SS, (y - y0) * _SS) for x, y in outline]
        draw.polygon(pts, fill=255 if i == 0 else 0)
    m = np.asarray(mask, np.float32).reshape(y1 - y0, _SS, x1 - x0, _SS).mean(axis=(1, 3)) / 255.0
    if not (m >= 1.0).any():
        return
    # colour: the named colour with a little brightness jitter and a soft lighting gradient
    base = np.array(COLOURS[colour_name], np.float32) * rng.uniform(0.85, 1.1)
    yy = np.linspace(-1, 1, y1 - y0, dtype=np.float32)[:, None, None]
    fill = np.clip(base + yy * rng.uniform(-18, 18), 0, 255)
    patch = image[y0:y1, x0:x1]
    alpha = m[..., None]
    image[y0:y1, x0:x1] = patch * (1 - alpha) + fill * alpha
    lab = label[y0:y1, x0:x1]
    lab[m >= 1.0] = len(STUFF) + cls
    lab[(m > 0.0) & (m < 1.0)] = IGNORE_INDEX
