"""The Embedder facade: items with an image, a text or both; bad items; projection required."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embedder.errors import InvalidItemError, ProjectionNotFittedError
from embedder.model import Embedder, Item
from embedder.projection import TrainConfig, fit_projection


@pytest.fixture(scope="module")
def fitted(image_encoder, text_encoder, emoji_items, emoji_features):
    labels = [it.label for it in emoji_items]
    sig = Embedder(image_encoder, text_encoder).encoder_signatures()
    art = fit_projection(emoji_features, labels, TrainConfig(epochs=5), encoders=sig, progress=False)
    return Embedder(image_encoder, text_encoder, art)


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_modalities_each_give_a_sane_vector(fitted, emoji_items):
    face = next(it for it in emoji_items if it.text == "grinning face")
    items = [
        Item("both", image=face.image, text=face.text),
        Item("image", image=face.image),
        Item("text", text=face.text),
        Item("text-empty-image", image=face.image, text="   "),
    ]
    v = fitted.embed(items)
    assert v.shape == (4, 512) and np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v[1], v[3], atol=1e-6)  # blank text = no text
    # one modality alone still lands near the full item, not at a garbage point
    assert v[0] @ v[1] > 0.5 and v[0] @ v[2] > 0.5
    others = fitted.embed([Item("other", text="national park"), Item("flag", text="flag: Japan")])
    assert v[0] @ v[2] > max(v[0] @ others[0], v[0] @ others[1])


def test_nested_dims_and_determinism(fitted):
    items = [Item("a", text="red apple", image=png((200, 0, 0))), Item("b", text="blue car")]
    for dims in (128, 256, 512):
        out = fitted.embed(items, dims=dims)
        assert out.shape == (2, dims)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(fitted.embed(items), fitted.embed(items))
    full = fitted.embed(items, 512)
    prefix = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(prefix, fitted.embed(items, 128), atol=1e-5)


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        ([], "no items"),
        ([Item("ok", text="fine"), Item("empty")], "item 1, id 'empty': item has neither"),
        ([Item("ok", text="fine"), Item("blank", text="  ")], "item 1"),
        ([Item("bad", image=b"\x89PNG garbage")], "item 0, id 'bad'.*cannot be decoded"),
        ([Item("ok", text="x"), Item("zero", image=b"")], "item 1, id 'zero'.*empty"),
        ([Item("num", text=42)], "text must be a string"),  # type: ignore[arg-type]
        ([Item("ok", text="x"), Item("s", text="bad \ud800")], r"item 1, id 's': text is not valid Unicode"),
        ([Item("ok", text="x"), Item("e", text=" \U0001f436 ")], r"item 1, id 'e': text '\U0001f436' has no word"),
        ([Item("zw", text="\u200b")], "item 0, id .zw.*no word the text model knows"),
    ],
)
def test_bad_items_fail_the_batch_naming_the_item(fitted, items, needle):
    with pytest.raises(InvalidItemError, match=needle):
        fitted.embed(items)


def test_embedding_needs_a_projection(image_encoder, text_encoder):
    bare = Embedder(image_encoder, text_encoder)
    raw = bare.raw_features([Item("a", text="hello")])
    assert raw.text.shape == (1, 384) and not raw.has_image[0]
    with pytest.raises(ProjectionNotFittedError, match="fit-projection"):
        bare.embed([Item("a", text="hello")])
    with pytest.raises(ProjectionNotFittedError):
        _ = bare.version


def test_a_modality_the_projection_never_saw_is_refused_not_dropped(image_encoder, text_encoder, emoji_features):
    """A projection fitted on text alone learned nothing from the image block: an image would vanish silently."""
    from embedder.errors import ModalityNotFittedError
    from embedder.projection import RawFeatures

    raw = emoji_features
    n = len(raw.has_text)
    text_only = RawFeatures(np.zeros_like(raw.image), raw.text, np.zeros(n, bool), np.asarray(raw.has_text))
    sig = Embedder(image_encoder, text_encoder).encoder_signatures()
    art = fit_projection(text_only, None, TrainConfig(epochs=2), encoders=sig, progress=False)
    assert art.space.fitted_modalities == ("text",)
    emb = Embedder(image_encoder, text_encoder, art)
    assert emb.embed([Item("t", text="a red apple")]).shape == (1, 512)
    with pytest.raises(ModalityNotFittedError, match=r"item 1, id 'img'.*without any image"):
        emb.embed([Item("t", text="a red apple"), Item("img", image=png((200, 0, 0)), text="a red apple")])
    image_only = RawFeatures(raw.image, np.zeros_like(raw.text), np.asarray(raw.has_image), np.zeros(n, bool))
    art = fit_projection(image_only, None, TrainConfig(epochs=2), encoders=sig, progress=False)
    assert art.space.fitted_modalities == ("image",)
    with pytest.raises(ModalityNotFittedError, match="without any text"):
        Embedder(image_encoder, text_encoder, art).embed([Item("q", text="seven")])


def test_an_empty_projection_folder_counts_as_none(tmp_path):
    """Docker makes a missing bind-mount source an empty folder: `serve` then exited ("no projection at ...")
    where a missing path leaves it running with embedding NOT_SERVING, as the README says."""
    from embedder.model import projection_present

    assert not projection_present(tmp_path / "missing") and not projection_present(None)
    (tmp_path / "empty").mkdir()
    assert not projection_present(tmp_path / "empty")
    (tmp_path / "empty" / "projection.json").write_text("{}")
    assert projection_present(tmp_path / "empty")  # files there: loaded, and a broken one is an error
