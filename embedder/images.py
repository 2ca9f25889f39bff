"""Decoding item images into RGB pictures the encoders can take.

Accepts PNG, JPEG, WebP and GIF (first frame) as bytes or as a file path.
Transparency is composited on white (emoji and icons are drawn on transparent
backgrounds; black would change their meaning), palette and grayscale images
become RGB. Anything unreadable is an :class:`InvalidItemError` naming the item.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from embedder.errors import InvalidItemError

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_PIXELS = 64_000_000  # refuse decompression bombs with a clear error rather than PIL's warning


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
        if not stream.is_file():
            raise InvalidItemError(f"{what} does not exist", index=index, item_id=item_id)
        if stream.stat().st_size == 0:
            raise InvalidItemError(f"{what} is empty", index=index, item_id=item_id)
    else:
        raise InvalidItemError(
            f"image must be bytes, a path or a PIL image, got {type(source).__name__}", index=index, item_id=item_id
        )
    try:
        with Image.open(stream) as img:
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
            img.seek(0)  # GIF/animated WebP: the first frame
            img.load()
            return to_rgb(img)
    except InvalidItemError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidItemError(f"{what} cannot be decoded as an image ({exc})", index=index, item_id=item_id) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``; any transparency is composited on white."""
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img.copy()
