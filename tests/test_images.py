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


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\nnot really a png", "cannot be decoded"),
        (b"hello world", "cannot be decoded"),
        (encode(Image.new("RGB", (4, 4)), "BMP"), "not one of"),
        (12345, "must be bytes"),
    ],
)
def test_bad_images_name_the_item(source, needle):
    with pytest.raises(InvalidItemError, match=needle) as err:
        load_rgb(source, index=3, item_id="x-3")
    assert "item 3" in str(err.value) and "'x-3'" in str(err.value)


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
