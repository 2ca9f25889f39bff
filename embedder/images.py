"""Decoding item images into RGB pictures the encoders can take.

Accepts PNG, JPEG, WebP and GIF (first frame) as bytes or as a file path.
What a viewer shows is what gets embedded:

* the EXIF orientation is applied (a phone photo stored sideways with an
  orientation tag is embedded upright, as every viewer shows it);
* transparency is composited on white (emoji and icons are drawn on transparent
  backgrounds; black would change their meaning), whether it comes from an alpha
  channel, a palette entry or a PNG colour key (``tRNS`` on RGB or grayscale);
* 16-bit grayscale is scaled to 8 bits (not clipped, which would turn most of it
  white); palette and grayscale images become RGB;
* a side longer than any encoder input (``MAX_SIDE``) is shrunk right after
  decoding, by area averaging, so a batch holds small pictures whatever the
  upload: an 8000x8000 PNG of a few KB would otherwise hold ~200 MB until the
  encoder resized it. Each side is bounded on its own: the encoders squash every
  picture to a square anyway, so this is the first half of the same area average,
  and a 4000x100 strip keeps its 100 rows.

Anything unreadable is an :class:`InvalidItemError` naming the item.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embedder.errors import InvalidItemError

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image
# MPO: a JPEG with a second picture (a depth map, a preview) after the first, as many phone cameras write
# them; Pillow names the format MPO, and its first frame is the photo.
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF")
MAX_PIXELS = 64_000_000  # refuse decompression bombs with a clear error rather than PIL's warning
# Each side of a decoded picture is shrunk to at most this many pixels: the largest encoder input the
# settings allow (EMBEDSTORE_IMAGE_SIZE <= 1024; 224 by default). Pictures within it are untouched.
MAX_SIDE = 1024


def load_rgb(source: ImageSource, *, index: int | None = None, item_id: object = None) -> Image.Image:
    """The image as an RGB :class:`PIL.Image.Image` (alpha composited on white)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InvalidItemError("image bytes are empty", index=index, item_id=item_id)
        stream: io.BytesIO | Path = io.BytesIO(data)
        what = f"{len(data)} image bytes"
    elif isinstance(source, (str, os.PathLike)):
        stream = Path(source)
        what = f"image file {str(stream)!r}"
        if stream.is_dir():
            raise InvalidItemError(f"{what} is a directory, not an image file", index=index, item_id=item_id)
        if not stream.is_file():
            raise InvalidItemError(f"{what} does not exist", index=index, item_id=item_id)
        if stream.stat().st_size == 0:
            raise InvalidItemError(f"{what} is empty", index=index, item_id=item_id)
    else:
        raise InvalidItemError(
            f"image must be bytes, a path or a PIL image, got {type(source).__name__}", index=index, item_id=item_id
        )
    try:
        # the size check below refuses bombs with a clear error; PIL's own warning would only be noise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(stream)
        with opened as img:
            if img.format not in ACCEPTED_FORMATS:
                raise InvalidItemError(
                    f"{what}: format {img.format} is not one of {', '.join(ACCEPTED_FORMATS)}",
                    index=index,
                    item_id=item_id,
                )
            if img.width * img.height > MAX_PIXELS:
                raise InvalidItemError(
                    f"{what}: {img.width}x{img.height} is larger than {MAX_PIXELS} pixels", index=index, item_id=item_id
                )
            img.seek(0)  # GIF/animated WebP/MPO: the first frame
            if img.format in ("JPEG", "MPO") and max(img.size) > 2 * MAX_SIDE:
                img.draft(None, (MAX_SIDE, MAX_SIDE))  # decode at 1/2, 1/4 or 1/8 scale, never below MAX_SIDE
            img.load()
            return to_rgb(img)
    except InvalidItemError:
        raise
    except UnidentifiedImageError:
        # PIL's own message names a BytesIO object's address: say what was expected instead
        raise InvalidItemError(
            f"{what} cannot be decoded as an image (not a {', '.join(ACCEPTED_FORMATS)} file)",
            index=index,
            item_id=item_id,
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidItemError(f"{what} cannot be decoded as an image ({exc})", index=index, item_id=item_id) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img`` as a viewer shows it: EXIF orientation applied, any transparency composited on
    white, 16-bit grayscale scaled to 8 bits, sides over ``MAX_SIDE`` shrunk (see the module docstring)."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        if "transparency" not in img.info:  # a colour key must be matched on the full-size pixels
            img = _bounded(img)  # resized as 16-bit: the 8-bit scaling below then runs on the small picture
        img = _gray16_to_l(img)
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        # a palette entry or a PNG colour key (tRNS) marks a colour as see-through
        img = img.convert("RGBA")
    elif img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode == "1":
        img = img.convert("L")  # one byte a pixel, not three, while it is still full size
    elif img.mode not in ("RGB", "RGBA", "RGBa", "L"):
        img = img.convert("RGB")  # CMYK, YCbCr, F, ...
    img = _bounded(img)  # before the RGB copy and the composite: they then work on the small picture
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


_GRAY16_TO_8 = np.rint(np.arange(65536) / 257.0).astype(np.uint8)  # 0-65535 -> 0-255, rounded


def _gray16_to_l(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale -> 8-bit "L", scaled rather than clipped.

    PNG's 16-bit grayscale arrives as "I;16" or "I" depending on the Pillow version; both hold 0-65535, so
    both are divided by 257 (65535 -> 255). An "I" picture whose values all fit in 0-255 is taken as
    8-bit data in a wide mode and kept as it is; one with values beyond 16 bits is scaled by its maximum.
    """
    transparency = img.info.get("transparency")
    if img.mode.startswith("I;16"):
        # one uint8 lookup per pixel: int64 and float64 copies of a 64-megapixel picture took ~1.7 GB and ~6 s
        out = Image.fromarray(_GRAY16_TO_8[np.asarray(img)])
        if transparency is not None:
            out.info["transparency"] = int(_GRAY16_TO_8[int(transparency)])
        return out
    arr = np.asarray(img.convert("I"), np.int64)
    top = int(arr.max()) if arr.size else 0
    if top <= 255:
        scaled = arr
        key = transparency
    else:
        div = 257.0 if top <= 65535 else top / 255.0
        scaled = np.rint(arr / div)
        key = None if transparency is None else round(transparency / div)
    out = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))  # 2-D uint8: "L"
    if key is not None:
        out.info["transparency"] = key
    return out


def _bounded(img: Image.Image) -> Image.Image:
    """``img`` with each side shrunk (area averaging) to at most ``MAX_SIDE``; itself when both fit."""
    size = (min(img.width, MAX_SIDE), min(img.height, MAX_SIDE))
    if size == img.size:
        return img
    if img.mode == "RGBA":
        # averaging premultiplied colour, so a see-through pixel's hidden colour does not bleed into its
        # neighbours' edge (the composite on white follows)
        return img.convert("RGBa").resize(size, Image.Resampling.BOX).convert("RGBA")
    return img.resize(size, Image.Resampling.BOX)
