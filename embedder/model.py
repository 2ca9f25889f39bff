"""The embedder: items in, Matryoshka vectors out.

An :class:`Item` has an image, a text, or both. :class:`Embedder` decodes and
encodes them (image -> 1280D, text -> text dim), fuses the features and
projects them with a fitted :class:`~embedder.projection.ProjectionArtifact`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from embedder.encoders import EfficientNetEncoder, ImageEncoder, SentenceTransformerEncoder, TextEncoder
from embedder.errors import EmbedderError, InvalidItemError, ModalityNotFittedError, ProjectionNotFittedError
from embedder.images import ImageSource, load_rgb
from embedder.projection import ProjectionArtifact, RawFeatures

MAX_TEXT_CHARS = 20_000


@dataclass
class Item:
    """One thing to embed. ``image`` is bytes, a path or a PIL image; ``text`` a string."""

    id: str
    image: ImageSource | None = None
    text: str | None = None
    label: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None and not (isinstance(self.image, (bytes, bytearray)) and len(self.image) == 0)

    @property
    def has_text(self) -> bool:
        return isinstance(self.text, str) and bool(self.text.strip())


def check_modalities(items: Sequence[Item], projection: ProjectionArtifact) -> None:
    """Refuse (naming the item) an item with an image or text the projection never saw in training: its
    weights on that block were never fitted, so the part would be dropped or turned into noise, silently."""
    fitted = projection.space.fitted_modalities
    for i, item in enumerate(items):
        for modality, has in (("image", item.has_image), ("text", item.has_text)):
            if has and modality not in fitted:
                raise ModalityNotFittedError(
                    f"projection {projection.version} was fitted on items without any {modality}, so it cannot "
                    f"embed this item's {modality}: send the item without it, or fit a projection on items "
                    f"that have {modality}s",
                    index=i,
                    item_id=item.id,
                )


def check_items(items: Sequence[Item]) -> None:
    """Refuse (naming the item) an empty batch, an item with neither image nor text, a non-string text."""
    if not items:
        raise InvalidItemError("no items given")
    for i, item in enumerate(items):
        if not isinstance(item, Item):
            raise InvalidItemError(f"expected an Item, got {type(item).__name__}", index=i)
        if item.text is not None and not isinstance(item.text, str):
            raise InvalidItemError(f"text must be a string, got {type(item.text).__name__}", index=i, item_id=item.id)
        if item.text is not None and len(item.text) > MAX_TEXT_CHARS:
            raise InvalidItemError(f"text is longer than {MAX_TEXT_CHARS} characters", index=i, item_id=item.id)
        if item.text is not None:
            try:
                item.text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidItemError(
                    f"text is not valid Unicode ({exc.reason} at character {exc.start})", index=i, item_id=item.id
                ) from None
        if isinstance(item.image, (bytes, bytearray)) and len(item.image) == 0:
            raise InvalidItemError("image bytes are empty", index=i, item_id=item.id)
        if not item.has_image and not item.has_text:
            raise InvalidItemError(
                "item has neither an image nor a non-empty text (an empty image field counts as none)",
                index=i,
                item_id=item.id,
            )


def projection_present(path: str | Path | None) -> bool:
    """Whether ``path`` holds a projection to load: missing, and an empty folder (what Docker makes of a bind
    mount whose host folder does not exist yet), both mean none (the service then runs with embedding
    NOT_SERVING); a folder with files in it is loaded, and a broken one is an error."""
    if not path:
        return False
    p = Path(path)
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


class Embedder:
    """Encoders + fusion + Matryoshka projection.

    ``projection`` may be None for feature extraction (``raw_features``), e.g.
    to train one; :meth:`embed` then raises ProjectionNotFittedError.
    """

    def __init__(
        self,
        image_encoder: ImageEncoder | None = None,
        text_encoder: TextEncoder | None = None,
        projection: ProjectionArtifact | None = None,
        *,
        decode_workers: int = 2,
    ) -> None:
        self.image_encoder = image_encoder or EfficientNetEncoder()
        self.text_encoder = text_encoder or SentenceTransformerEncoder()
        self.projection = projection
        self.decode_workers = decode_workers
        if projection is not None:
            self._check_projection(projection)

    @classmethod
    def from_settings(cls, settings: Any | None = None) -> Embedder:
        from embedder.config import EmbedderSettings

        s = settings or EmbedderSettings()
        image = EfficientNetEncoder(
            s.image_model, size=s.image_size, backend=s.image_backend, weights=s.image_weights, threads=s.threads
        )
        text = SentenceTransformerEncoder(s.text_model, threads=s.threads)
        projection = ProjectionArtifact.load(s.projection) if projection_present(s.projection) else None
        return cls(image, text, projection)

    @property
    def version(self) -> str:
        if self.projection is None:
            raise ProjectionNotFittedError(
                "no Matryoshka projection loaded; train one with `embedstore fit-projection`"
            )
        return self.projection.version

    def encoder_signatures(self) -> dict[str, Any]:
        return {"image": self.image_encoder.signature(), "text": self.text_encoder.signature()}

    def _check_projection(self, projection: ProjectionArtifact) -> None:
        want = projection.encoders
        have = self.encoder_signatures()
        if want and want != have:
            raise EmbedderError(
                f"projection {projection.version} was fitted on encoders {want}, but this embedder has {have}; "
                "fit a projection for these encoders"
            )

    # ------------------------------------------------------------------ stages
    def decode(self, items: Sequence[Item]) -> list[Image.Image | None]:
        """Decode every item's image (in threads); errors name the item."""

        def one(i: int) -> Image.Image | None:
            item = items[i]
            return load_rgb(item.image, index=i, item_id=item.id) if item.has_image else None

        if self.decode_workers <= 1 or len(items) < 8:
            return [one(i) for i in range(len(items))]
        with ThreadPoolExecutor(max_workers=self.decode_workers) as pool:
            return list(pool.map(one, range(len(items))))

    def raw_features(self, items: Sequence[Item]) -> RawFeatures:
        """Encoder outputs for ``items`` (validated and decoded first: a bad item fails the batch)."""
        check_items(items)
        return self.encode_decoded(items, self.decode(items))

    def check_texts(self, items: Sequence[Item]) -> None:
        """Refuse (naming the item) a text in which the text model knows no token (an emoji alone, a
        zero-width space): it would read as [UNK] only and embed exactly like every other such text."""
        unreadable = getattr(self.text_encoder, "unreadable", None)
        idx = [i for i, it in enumerate(items) if it.has_text]
        if unreadable is None or not idx:
            return
        bad = unreadable([items[i].text.strip() for i in idx])  # type: ignore[union-attr]
        if bad:
            i = idx[bad[0]]
            text = items[i].text.strip()  # type: ignore[union-attr]
            raise InvalidItemError(
                f"text {text[:40]!r} has no word the text model knows (it reads as [UNK] only, so it would embed "
                "like every other such text); add words, e.g. an emoji's name",
                index=i,
                item_id=items[i].id,
            )

    def encode_decoded(self, items: Sequence[Item], pictures: Sequence[Image.Image | None]) -> RawFeatures:
        """Encoder outputs for checked ``items`` whose images :meth:`decode` already produced."""
        self.check_texts(items)
        n = len(items)
        has_image = np.array([p is not None for p in pictures], dtype=bool)
        has_text = np.array([it.has_text for it in items], dtype=bool)
        image = np.zeros((n, self.image_encoder.dim), dtype=np.float32)
        text = np.zeros((n, self.text_encoder.dim), dtype=np.float32)
        if has_image.any():
            idx = np.flatnonzero(has_image)
            image[idx] = self.image_encoder.encode([pictures[i] for i in idx])
        if has_text.any():
            idx = np.flatnonzero(has_text)
            text[idx] = self.text_encoder.encode([items[i].text.strip() for i in idx])  # type: ignore[union-attr]
        for name, block in (("image", image), ("text", text)):
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InvalidItemError(f"the {name} encoder produced non-finite values", index=i, item_id=items[i].id)
        return RawFeatures(image, text, has_image, has_text)

    def raw_features_many(self, items: Sequence[Item], *, batch_size: int = 256, progress: bool = False) -> RawFeatures:
        """:meth:`raw_features` over many items in chunks, with an optional progress bar."""
        check_items(items)
        chunks = []
        starts = range(0, len(items), batch_size)
        if progress:
            from rich.progress import track

            starts = track(starts, description=f"encoding {len(items)} items")
        for start in starts:
            chunks.append(self.raw_features(items[start : start + batch_size]))
        return RawFeatures.concat(chunks)

    def embed(self, items: Sequence[Item], dims: int = 512) -> np.ndarray:
        """(n, dims) unit-norm Matryoshka vectors; ``dims`` in {128, 256, 512}."""
        if self.projection is None:
            raise ProjectionNotFittedError(
                "no Matryoshka projection loaded; train one with `embedstore fit-projection`"
            )
        check_items(items)
        check_modalities(items, self.projection)
        return self.projection.project(self.raw_features(items), dims)


def default_projection_path() -> Path:
    return Path(os.environ.get("EMBEDSTORE_PROJECTION", "./data/projection"))
