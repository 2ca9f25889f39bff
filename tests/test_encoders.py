"""Encoders: documented shapes, finite values, determinism, backends agreeing, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from embedder.encoders import EfficientNetEncoder
from embedder.errors import ModelUnavailableError
from embedder.images import load_rgb


@pytest.fixture(scope="module")
def pictures(emoji_items):
    return [load_rgb(it.image) for it in emoji_items[:12]]


def test_lite0_features_shape_finite_and_deterministic(image_encoder, pictures):
    a = image_encoder.encode(pictures)
    assert a.shape == (12, 1280) and a.dtype == np.float32
    assert np.isfinite(a).all() and (a.std(axis=0) > 0).any()
    b = image_encoder.encode(pictures)
    assert np.array_equal(a, b), "same input, same batches -> bit-identical output"
    # in another batch composition the same image gives the same features up to float rounding
    c = image_encoder.encode(pictures[5:7])
    np.testing.assert_allclose(c, a[5:7], atol=1e-4)


def test_onnx_and_torch_backends_agree(image_encoder, pictures):
    torch_enc = EfficientNetEncoder(backend="torch", threads=2)
    np.testing.assert_allclose(torch_enc.encode(pictures[:4]), image_encoder.encode(pictures[:4]), atol=1e-3)
    assert torch_enc.signature() == image_encoder.signature()  # same weights, same vectors


def test_lite0_sees_what_is_in_the_picture(image_encoder, emoji_items):
    """Real pretrained weights: two flags are closer to each other than a flag is to a face."""
    by_label: dict[str, list] = {}
    for it in emoji_items:
        by_label.setdefault(it.label, []).append(it)
    flags = [load_rgb(it.image) for it in by_label["Flags"][:2]]
    face = [load_rgb(by_label["Smileys & Emotion"][0].image)]
    f = image_encoder.encode(flags + face)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    assert f[0] @ f[1] > f[0] @ f[2]


def test_other_input_sizes(pictures):
    enc = EfficientNetEncoder(size=160, backend="torch", threads=2)
    assert enc.encode(pictures[:2]).shape == (2, 1280)
    with pytest.raises(ValueError, match="multiple of 32"):
        EfficientNetEncoder(size=150)


def test_b0_shapes_with_random_weights(pictures):
    enc = EfficientNetEncoder("efficientnet-b0", pretrained=False, backend="torch", threads=2)
    out = enc.encode(pictures[:3])
    assert out.shape == (3, 1280) and np.isfinite(out).all()
    assert enc.signature()["weights_sha256"] == "random-init"
    assert enc.mean != (0.5, 0.5, 0.5)  # ImageNet normalisation, unlike Lite0


def test_b0_without_cached_weights_is_a_clear_error(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **kw: object) -> None:
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelUnavailableError, match=r"not cached at .*EMBEDSTORE_IMAGE_WEIGHTS"):
        EfficientNetEncoder("efficientnet-b0", backend="torch")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        EfficientNetEncoder("efficientnet-b0", weights=tmp_path / "missing.pth", backend="torch")


def test_b0_loads_a_local_weights_file(tmp_path, pictures):
    import torch
    import torchvision

    net = torchvision.models.efficientnet_b0(weights=None)
    path = tmp_path / "b0.pth"
    torch.save(net.state_dict(), path)
    enc = EfficientNetEncoder("efficientnet-b0", weights=path, backend="torch", threads=2)
    assert enc.encode(pictures[:1]).shape == (1, 1280)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailableError, match="cannot load"):
        EfficientNetEncoder("efficientnet-b0", weights=bad, backend="torch")


def test_text_encoder_shapes_norms_and_determinism(text_encoder):
    texts = ["grinning face", "flag: Japan", "ein Hund im Park 🐶", "x " * 2000]
    a = text_encoder.encode(texts)
    assert a.shape == (4, 384) and np.isfinite(a).all()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, text_encoder.encode(texts))
    sims = a @ a.T
    assert sims[0, 1] < 0.9  # different texts, different vectors


def test_text_model_path_must_exist(tmp_path):
    from embedder.encoders import SentenceTransformerEncoder

    with pytest.raises(ModelUnavailableError, match="does not exist"):
        SentenceTransformerEncoder(tmp_path / "no-model")


def test_preprocess_refuses_non_rgb(image_encoder):
    from embedder.errors import InvalidItemError

    with pytest.raises(InvalidItemError, match="RGB"):
        image_encoder.preprocess([Image.new("L", (4, 4))])
