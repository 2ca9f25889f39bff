"""Image decoding: every accepted format, transparency, grayscale, and clear errors for bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embedder.errors import InvalidItemError
from embedder.images import load_rgb


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def half_transparent_red() -> Image.Image:
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    for x in range(4):
        for y in range(8):
            img.putpixel((x, y), (0, 0, 0, 0))  # fully transparent black
    return img


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_transparency_is_composited_on_white(fmt):
    data = encode(half_transparent_red(), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    rgb = load_rgb(data)
    assert rgb.mode == "RGB"
    px = np.asarray(rgb)
    assert (px[:, :4] >= 250).all(), "transparent pixels must become white, not black"
    assert px[:, 4:, 0].min() >= 240 and px[:, 4:, 1].max() <= 15


def test_jpeg_and_grayscale_and_paths(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    rgb = load_rgb(encode(gray, "PNG"))
    assert rgb.mode == "RGB" and np.asarray(rgb)[3, 5].tolist() == [29, 29, 29]
    path = tmp_path / "x.jpg"
    Image.new("RGB", (10, 6), (0, 128, 255)).save(path, quality=95)
    assert load_rgb(path).size == (10, 6)
    assert load_rgb(str(path)).mode == "RGB"


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(load_rgb(buf.getvalue()))[0, 0, 0] > 200


def test_a_phone_jpeg_with_a_second_picture_embeds_its_first():
    """Pillow reads a JPEG carrying a depth map or preview (MP format) as "MPO": it was refused as not a JPEG."""
    photo, depth = Image.new("RGB", (3000, 2000), (250, 20, 20)), Image.new("RGB", (3000, 2000), (0, 0, 255))
    buf = io.BytesIO()
    photo.save(buf, format="MPO", save_all=True, append_images=[depth])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    rgb = load_rgb(buf.getvalue())
    assert max(rgb.size) <= 2048 and np.asarray(rgb)[5, 5].tolist()[0] > 200  # the photo, shrunk while decoding


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\nnot really a png", "cannot be decoded"),
        (b"hello world", r"cannot be decoded as an image \(not a PNG, JPEG, MPO, WEBP, GIF file\)$"),
        (encode(Image.new("RGB", (4, 4)), "BMP"), "not one of"),
        (12345, "must be bytes"),
    ],
)
def test_bad_images_name_the_item(source, needle):
    with pytest.raises(InvalidItemError, match=needle) as err:
        load_rgb(source, index=3, item_id="x-3")
    assert "item 3" in str(err.value) and "'x-3'" in str(err.value)
    assert "object at 0x" not in str(err.value)  # no BytesIO repr from PIL


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidItemError, match="does not exist"):
        load_rgb(tmp_path / "nope.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InvalidItemError, match="is empty"):
        load_rgb(empty)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:60])
    with pytest.raises(InvalidItemError, match="cannot be decoded"):
        load_rgb(truncated)


def test_exif_orientation_is_applied_on_every_path(tmp_path):
    """A photo stored sideways with an orientation tag is embedded as viewers show it (upright)."""
    upright = Image.new("RGB", (40, 80), (255, 255, 255))
    upright.paste((255, 0, 0), (0, 0, 40, 20))  # a red band at the top of the upright picture
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 80x40, as a camera would write it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "photo.jpg").write_bytes(data)
    for source in (data, tmp_path / "photo.jpg", Image.open(io.BytesIO(data))):
        rgb = load_rgb(source)
        assert rgb.size == (40, 80), source
        px = np.asarray(rgb).astype(int)
        assert px[:15, :, 0].mean() > 200 and px[:15, :, 1].mean() < 60, "the red band must be on top"
        assert px[-15:].mean() > 240


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grayscale_is_scaled_not_clipped(mode):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    img = Image.fromarray(ramp) if mode == "I;16" else Image.fromarray(ramp.astype(np.int32), mode="I")
    rgb = load_rgb(encode(img, "PNG")) if mode == "I;16" else load_rgb(img)
    got = np.asarray(rgb)[..., 0].astype(float)
    assert np.abs(got - ramp / 257.0).max() <= 0.5 + 1e-9
    assert (got == 255).mean() < 0.01  # clipping made 99% of it white


def test_a_16_bit_decompression_bomb_is_scaled_without_wide_copies():
    """A 141 KB 16-bit PNG of 8000x7999 pixels passed the pixel cap and took ~1.7 GB (int64 and float64 copies
    of every pixel) and ~6 s per decode: six in one Embed held every other client's call for 25 s."""
    import tracemalloc

    from embedder.images import MAX_SIDE

    arr = np.zeros((7999, 8000), dtype=np.uint16)
    arr[:, 4000:] = 65535  # right half white
    data = encode(Image.fromarray(arr), "PNG")
    del arr
    tracemalloc.start()
    try:
        rgb = load_rgb(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6, f"{peak / 1e6:.0f} MB of numpy copies"  # was ~1,000 MB (int64 + float64 of 64M pixels)
    assert rgb.size == (MAX_SIDE, MAX_SIDE)
    px = np.asarray(rgb)[..., 0]
    assert px[:, :400].max() == 0 and px[:, -400:].min() == 255  # still scaled, not clipped or lost


@pytest.mark.parametrize(("mode", "key", "ink"), [("RGB", (0, 0, 0), (200, 30, 30)), ("L", 0, 200)])
def test_png_colour_key_transparency_is_composited_on_white(mode, key, ink):
    img = Image.new(mode, (10, 10), key)
    img.paste(ink, (3, 3, 7, 7))
    rgb = np.asarray(load_rgb(encode(img, "PNG", transparency=key)))
    assert (rgb[0, 0] == 255).all(), "the keyed colour is see-through: white, not black"
    assert tuple(rgb[5, 5]) == ((200, 30, 30) if mode == "RGB" else (200, 200, 200))


def test_huge_pictures_are_shrunk_per_side_right_after_decoding():
    from embedder.images import MAX_SIDE

    big = Image.new("1", (8000, 6000), 1)
    rgb = load_rgb(encode(big, "PNG"))
    assert rgb.size == (MAX_SIDE, MAX_SIDE) and rgb.mode == "RGB"
    strip = load_rgb(Image.new("RGB", (4000, 100), (10, 20, 30)))
    assert strip.size == (MAX_SIDE, 100)  # each side on its own: the short side keeps its rows
    assert tuple(np.asarray(strip)[50, 500]) == (10, 20, 30)
    # transparency survives the shrink and is still composited on white, without colour bleeding in
    rgba = Image.new("RGBA", (3000, 1500), (0, 255, 0, 0))
    rgba.paste((255, 0, 0, 255), (1500, 0, 3000, 1500))
    px = np.asarray(load_rgb(rgba)).astype(int)
    assert (px[:, :400] == 255).all() and px[:, 600:, 1].max() == 0
    small = Image.new("RGB", (MAX_SIDE, 37), (1, 2, 3))
    assert np.array_equal(np.asarray(load_rgb(small)), np.asarray(small))  # within the bound: untouched


def test_a_directory_is_not_reported_as_missing(tmp_path):
    with pytest.raises(InvalidItemError, match="is a directory"):
        load_rgb(tmp_path)


def test_a_decompression_bomb_is_refused_without_pils_warning(recwarn):
    bomb = encode(Image.new("1", (9000, 9000), 0), "PNG")
    with pytest.raises(InvalidItemError, match="larger than"):
        load_rgb(bomb)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_strip_is_area_averaged_on_its_long_side():
    from embedder.encoders import preprocess

    stripes = np.tile((np.arange(1000) % 2 * 255).astype(np.uint8), (200, 1))  # 1-px stripes, 1000x200
    out = preprocess([Image.fromarray(stripes).convert("RGB")], 224)[0].astype(float)
    assert abs(out.mean() - 127.5) < 1 and out.std() < 20  # averaged grey, not moire
