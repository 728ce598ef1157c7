"""The torch-free preprocessing equals the official detectron2 + SED path (written out here in torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import need
from PIL import Image

from sed_runtime.errors import SedUserError
from sed_runtime.preprocess import (
    bilinear_resize_chw,
    linear_taps,
    load_image,
    preprocess,
    resize_shortest_edge,
    shortest_edge_size,
)

MEAN = (122.7709383, 116.7460125, 104.09373615)  # the CLIP statistics of the SED configs
STD = (68.5005327, 66.6321579, 70.323163)


# --- the official path, written out independently of sed_runtime -------------------------------------------

def _d2_output_shape(oldh: int, oldw: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge.get_output_shape."""
    h, w = oldh, oldw
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
    neww = int(neww + 0.5)
    newh = int(newh + 0.5)
    return (newh, neww)


_D2_EXIF = {  # detectron2.data.detection_utils._apply_exif_orientation
    2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
    6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90,
}


def _d2_read_image(path: Path) -> np.ndarray:
    """detectron2 read_image(format="RGB")."""
    with open(path, "rb") as f:
        image = Image.open(f)
        orientation = image.getexif().get(0x0112)
        if orientation in _D2_EXIF:
            image = image.transpose(_D2_EXIF[orientation])
        return np.asarray(image.convert("RGB"))


def _official_tensor(img: np.ndarray, size: int = 768):
    torch = need("torch")
    import torch.nn.functional as F

    newh, neww = _d2_output_shape(img.shape[0], img.shape[1], 640, 2560)
    resized = np.asarray(Image.fromarray(img).resize((neww, newh), Image.BILINEAR))
    x = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))  # uint8 CHW, as the mapper gives
    x = (x - torch.Tensor(MEAN).view(-1, 1, 1)) / torch.Tensor(STD).view(-1, 1, 1)
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False).numpy()


# --- images with awkward sizes and modes ------------------------------------------------------------------

def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 256)], -1)
    noise = rng.integers(0, 40, (h, w, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _write(tmp: Path, name: str) -> Path:
    rng = np.random.default_rng(1)
    p = tmp / f"{name}.png"
    if name == "gray_L":
        Image.fromarray(_rgb(210, 330)[..., 0], "L").save(p)
    elif name == "rgba":
        Image.fromarray(np.dstack([_rgb(250, 170), rng.integers(0, 256, (250, 170), dtype=np.uint8)]), "RGBA").save(p)
    elif name == "palette_P":
        Image.fromarray(_rgb(190, 260)).quantize(colors=32).save(p)
    elif name == "exif_rotated":
        p = tmp / "exif_rotated.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        Image.fromarray(_rgb(200, 360)).save(p, quality=92, exif=exif)
    else:
        shape = {"portrait": (1200, 300), "landscape": (480, 640), "tiny": (3, 5), "very_long": (100, 4000)}[name]
        Image.fromarray(_rgb(*shape)).save(p)
    return p


CASES = ["portrait", "landscape", "tiny", "very_long", "gray_L", "rgba", "palette_P", "exif_rotated"]


@pytest.mark.parametrize("name", CASES)
def test_official_768_tensor(tmp_path, name):
    path = _write(tmp_path, name)
    img = load_image(path)
    np.testing.assert_array_equal(img, _d2_read_image(path))
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous
    pre = preprocess(img, pixel_mean=MEAN, pixel_std=STD)
    assert pre.tensor.shape == (1, 3, 768, 768) and pre.tensor.dtype == np.float32
    assert pre.orig_hw == img.shape[:2]
    assert pre.resized_hw == _d2_output_shape(*img.shape[:2], 640, 2560)
    ref = _official_tensor(img)
    assert np.abs(pre.tensor - ref).max() <= 1e-4


def test_mode_conversions_match_detectron2(tmp_path):
    rgba = np.asarray(Image.open(_write(tmp_path, "rgba")))
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba[..., :3])  # alpha dropped, not composited
    gray = load_image(_write(tmp_path, "gray_L"))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    path = _write(tmp_path, "exif_rotated")
    raw = np.asarray(Image.open(path).convert("RGB"))  # decoded pixels as stored, 200 x 360
    rotated = load_image(path)
    assert rotated.shape == (360, 200, 3)
    np.testing.assert_array_equal(rotated, np.rot90(raw, k=-1))  # shown turned 90 degrees clockwise


def test_shortest_edge_sizes():
    assert shortest_edge_size(480, 640) == (640, 853)
    assert shortest_edge_size(1200, 300) == (2560, 640)  # exactly at max_size: not scaled down
    assert shortest_edge_size(3, 5) == (640, 1067)
    assert shortest_edge_size(100, 4000) == (64, 2560)  # max_size kicks in
    assert shortest_edge_size(640, 640) == (640, 640)
    for h, w in [(1, 1), (7, 3), (333, 517), (2000, 1999), (5000, 100)]:
        assert shortest_edge_size(h, w) == _d2_output_shape(h, w, 640, 2560)
        assert shortest_edge_size(h, w, 320, 1000) == _d2_output_shape(h, w, 320, 1000)


def test_resize_shortest_edge_is_pil_bilinear():
    img = _rgb(50, 80)
    out = resize_shortest_edge(img, 640, 2560)
    assert out.shape == (640, 1024, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((1024, 640), Image.BILINEAR)))


@pytest.mark.parametrize(
    "shape,out",
    [((3, 50, 70), (768, 768)), ((3, 640, 2560), (768, 768)), ((2, 192, 192), (333, 517)),
     ((1, 2000, 300), (97, 768)), ((3, 7, 9), (5, 31)), ((4, 1, 1), (3, 8)), ((3, 16, 16), (16, 16))],
)
def test_bilinear_resize_matches_torch(shape, out):
    torch = need("torch")
    import torch.nn.functional as F

    x = np.random.default_rng(2).uniform(-3, 3, shape).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None], size=out, mode="bilinear", align_corners=False)[0].numpy()
    got = bilinear_resize_chw(x, *out)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-5


def test_linear_taps_rule():
    i0, i1, w0, w1 = linear_taps(4, 4)
    assert np.array_equal(i0, np.arange(4)) and np.array_equal(i1, i0) and np.all(w0 == 1) and np.all(w1 == 0)
    i0, i1, w0, w1 = linear_taps(2, 4)  # src = (dst + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25
    assert i0.tolist() == [0, 0, 0, 1] and i1.tolist() == [1, 1, 1, 1]
    assert w1.tolist() == [0.0, 0.25, 0.75, 0.25] and w0.dtype == np.float32


def test_preprocess_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32), pixel_mean=MEAN, pixel_std=STD)
    with pytest.raises(ValueError, match="HxWx3"):
        preprocess(np.zeros((10, 10), np.uint8), pixel_mean=MEAN, pixel_std=STD)


def _one_line_error(path: Path) -> str:
    with pytest.raises(SedUserError) as e:
        load_image(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_load_image_errors(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "nope.jpg")
    good = tmp_path / "good.jpg"
    Image.fromarray(_rgb(200, 300)).save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "cannot decode" in _one_line_error(truncated)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    assert "cannot decode" in _one_line_error(text)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    _one_line_error(empty)
    assert "folder" in _one_line_error(tmp_path)


def test_runtime_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import sed_runtime.preprocess, sed_runtime.postprocess, sed_runtime.overlay, sed_runtime.errors\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _mode_cases(tmp: Path) -> list[tuple[str, Path, np.ndarray]]:
    """(name, file, expected HxWx3 uint8) for the image modes cameras, scanners and datasets produce."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (20, 30)).astype(np.uint16)
    cases = []

    def add(name: str, image: Image.Image, expected: np.ndarray, suffix: str = ".png", **save: object) -> None:
        path = tmp / f"{name}{suffix}"
        image.save(path, **save)
        cases.append((name, path, expected))

    exp16 = np.repeat(np.rint(grey16 / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    add("grey16", Image.fromarray(grey16), exp16)
    f = (grey16 / 65535.0).astype(np.float32)
    add("float01", Image.fromarray(f), np.repeat(np.rint(f.astype(np.float64) * 255).astype(np.uint8)[..., None], 3, 2),
        suffix=".tif")
    add("rgba", Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), rgb)
    la = Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA")
    add("la", la, np.repeat(rgb[..., :1], 3, axis=2))
    one = Image.fromarray(rgb[..., 0] > 127)
    add("bilevel", one, np.repeat(np.where(rgb[..., :1] > 127, 255, 0).astype(np.uint8), 3, axis=2))
    pal = Image.fromarray(rgb).quantize(16)
    pal.info["transparency"] = 0
    add("palette_transparent", pal, np.asarray(pal.convert("RGB")), transparency=0)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    add("cmyk", cmyk, np.asarray(cmyk.convert("RGB")), suffix=".tif")
    frames = [Image.fromarray(rgb).quantize(64), Image.fromarray(rgb[::-1].copy()).quantize(64)]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:])
    cases.append(("multiframe", tmp / "anim.gif", np.asarray(Image.open(tmp / "anim.gif").convert("RGB"))))
    return cases


def test_every_common_image_mode_decodes_to_the_right_8bit_rgb(tmp_path):
    for name, path, expected in _mode_cases(tmp_path):
        got = load_image(path)
        assert got.dtype == np.uint8 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_images_that_cannot_be_read_faithfully_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(SedUserError, match="float image with values in"):
        load_image(tmp_path / "hdr.tif")


def test_large_images_do_not_print_pillow_warnings(tmp_path, recwarn):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 10)).save(path)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 150  # 200 pixels: above the warning threshold, below the error (2x)
    try:
        load_image(path)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
