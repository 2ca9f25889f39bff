"""Matryoshka projection: nesting, missing modalities, training, artefacts and versions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedder.errors import EmbedderError, ProjectionNotFittedError
from embedder.evaluate import knn_accuracy, stratified_split
from embedder.projection import (
    FeatureSpace,
    ProjectionArtifact,
    RawFeatures,
    TrainConfig,
    fit_projection,
    nested_views,
)


def synthetic_raw(n: int = 300, seed: int = 0, n_classes: int = 4) -> tuple[RawFeatures, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    img_c, txt_c = rng.normal(size=(n_classes, 1280)), rng.normal(size=(n_classes, 384))
    image = (img_c[y] + rng.normal(scale=2.0, size=(n, 1280))).astype(np.float32)
    text = (txt_c[y] + rng.normal(scale=2.0, size=(n, 384))).astype(np.float32)
    has_image = rng.random(n) > 0.2
    has_text = ~has_image | (rng.random(n) > 0.3)
    image[~has_image] = 0
    text[~has_text] = 0
    return RawFeatures(image, text, has_image, has_text), [f"c{v}" for v in y]


def untrained(space: FeatureSpace, seed: int = 0) -> ProjectionArtifact:
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=1 / np.sqrt(space.in_dim), size=(512, space.in_dim)).astype(np.float32)
    return ProjectionArtifact(space=space, weight=w, bias=np.zeros(512, np.float32))


def test_nested_views_are_renormalised_prefixes_of_one_vector():
    raw, _ = synthetic_raw(50)
    art = untrained(FeatureSpace.fit(raw))
    z = art.space.fuse(raw) @ art.weight.T + art.bias
    for m in (128, 256, 512):
        v = art.project(raw, m)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(v, z[:, :m] / np.linalg.norm(z[:, :m], axis=1, keepdims=True), atol=1e-5)
    full = art.project(raw, 512)
    # the 128 view is the normalised prefix of the (unnormalised) 512 output
    np.testing.assert_allclose(nested_views(full * 3.0, (128,))[128], art.project(raw, 128), atol=1e-5)
    with pytest.raises(EmbedderError, match="dims must be one of"):
        art.project(raw, 100)


def test_missing_modality_is_a_zero_slot_plus_flag():
    raw, _ = synthetic_raw(100)
    space = FeatureSpace.fit(raw)
    x = space.fuse(raw)
    assert x.shape == (100, 1280 + 384 + 2)
    img_only = ~raw.has_text
    assert np.all(x[img_only, 1280:1664] == 0) and np.all(x[img_only, -1] == 0) and np.all(x[img_only, -2] == 1)
    both = raw.has_image & raw.has_text
    # each present block has unit expected squared norm: neither modality dominates by size
    assert 0.5 < np.mean(np.sum(x[both, :1280] ** 2, axis=1)) < 2.0
    assert 0.5 < np.mean(np.sum(x[both, 1280:1664] ** 2, axis=1)) < 2.0
    art = untrained(space)
    v = art.project(raw)
    assert np.isfinite(v).all()


def test_training_is_seeded_and_reproducible():
    raw, labels = synthetic_raw(200)
    cfg = TrainConfig(epochs=8, seed=3)
    a = fit_projection(raw, labels, cfg, progress=False)
    b = fit_projection(raw, labels, cfg, progress=False)
    assert np.array_equal(a.weight, b.weight) and a.version == b.version
    c = fit_projection(raw, labels, TrainConfig(epochs=8, seed=4), progress=False)
    assert c.version != a.version
    assert a.training["n_labeled"] == 200 and a.training["classes"] == ["c0", "c1", "c2", "c3"]
    assert len(a.training["history"]) == a.training["epochs_run"] <= 8


def test_training_works_without_labels_and_refuses_tiny_data():
    raw, _ = synthetic_raw(120)
    art = fit_projection(raw, None, TrainConfig(epochs=3), progress=False)
    assert art.training["n_labeled"] == 0
    with pytest.raises(EmbedderError, match="at least 20"):
        fit_projection(raw.take(np.arange(10)), None, progress=False)
    with pytest.raises(ValueError, match="nested_dims"):
        TrainConfig(nested_dims=(256, 128, 512))


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    raw, labels = synthetic_raw(120)
    art = fit_projection(raw, labels, TrainConfig(epochs=3), encoders={"image": {"model": "m"}}, progress=False)
    art.save(tmp_path / "p")
    # readable by whoever may read the json beside it (safetensors wrote 0600: the container's uid could not)
    weights_mode = (tmp_path / "p" / "projection.safetensors").stat().st_mode & 0o777
    assert weights_mode == (tmp_path / "p" / "projection.json").stat().st_mode & 0o777 and weights_mode & 0o044
    meta = json.loads((tmp_path / "p" / "projection.json").read_text())
    assert meta["version"] == art.version and meta["nested_dims"] == [128, 256, 512]
    assert meta["training"]["data_sha256"] and meta["encoders"] == {"image": {"model": "m"}}
    loaded = ProjectionArtifact.load(tmp_path / "p")
    assert loaded.version == art.version
    np.testing.assert_array_equal(loaded.project(raw), art.project(raw))
    meta["version"] = "mrl-000000000000"
    (tmp_path / "p" / "projection.json").write_text(json.dumps(meta))
    with pytest.raises(EmbedderError, match="do not match the recorded version"):
        ProjectionArtifact.load(tmp_path / "p")
    with pytest.raises(ProjectionNotFittedError, match="fit-projection"):
        ProjectionArtifact.load(tmp_path / "nothing")
    # damaged files are named (a JSON error without the file, a 52-line safetensors traceback), and shapes the
    # version does not cover are checked (an edited 1024 in nested_dims returned 512 dims when asked for 1024)
    art.save(tmp_path / "q")
    good = (tmp_path / "q" / "projection.json").read_text()
    (tmp_path / "q" / "projection.json").write_text(good[:50])
    with pytest.raises(EmbedderError, match=r"projection at .*q is damaged: .*projection.json cannot be read"):
        ProjectionArtifact.load(tmp_path / "q")
    (tmp_path / "q" / "projection.json").write_text(good.replace("512\n  ],", "1024\n  ],", 1))
    with pytest.raises(EmbedderError, match=r"nested_dims \[128, 256, 1024\] do not end at the weights' 512"):
        ProjectionArtifact.load(tmp_path / "q")
    (tmp_path / "q" / "projection.json").write_text(good)
    weights = tmp_path / "q" / "projection.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(EmbedderError, match=r"is damaged: SafetensorError"):
        ProjectionArtifact.load(tmp_path / "q")


def test_features_from_other_encoders_are_refused():
    raw, _ = synthetic_raw(30)
    art = untrained(FeatureSpace.fit(raw))
    other = RawFeatures(raw.image, np.zeros((30, 768), np.float32), raw.has_image, raw.has_text)
    with pytest.raises(EmbedderError, match="encoders differ"):
        art.project(other)


def test_short_training_on_real_emoji_beats_the_untrained_projection(emoji_items, emoji_features):
    raw = RawFeatures(*(np.asarray(a) for a in (emoji_features.image, emoji_features.text,
                                                emoji_features.has_image, emoji_features.has_text)))  # fmt: skip
    labels = [it.label for it in emoji_items]
    train, test = stratified_split(labels, 0.25, seed=0)
    train_labels = [labels[i] if i in set(train.tolist()) else None for i in range(len(labels))]
    art = fit_projection(raw, train_labels, TrainConfig(epochs=25, seed=0), progress=False)
    base = untrained(art.space)
    ytr, yte = [labels[i] for i in train], [labels[i] for i in test]

    def acc(a: ProjectionArtifact, m: int) -> float:
        v = a.project(raw, m)
        return knn_accuracy(v[train], ytr, v[test], yte)

    trained128, untrained128 = acc(art, 128), acc(base, 128)
    assert trained128 > untrained128 + 0.05, (trained128, untrained128)
    assert trained128 >= 0.97 * acc(art, 512)


def test_modality_dropout_makes_lone_images_and_lone_texts_comparable(emoji_items, emoji_features):
    """Every emoji has an image and a text: without dropout the missing-modality flag columns never moved apart
    from the bias, and a text query found the image-only point of its own emoji in a mixed store ~1 time in 6."""
    raw = RawFeatures(*(np.asarray(a) for a in (emoji_features.image, emoji_features.text,
                                                emoji_features.has_image, emoji_features.has_text)))  # fmt: skip
    rng = np.random.default_rng(0)
    idx = rng.choice(len(raw), 300, replace=False)
    sub = raw.take(idx)
    image_only = RawFeatures(sub.image, np.zeros_like(sub.text), sub.has_image, np.zeros_like(sub.has_text))
    text_only = RawFeatures(np.zeros_like(sub.image), sub.text, np.zeros_like(sub.has_image), sub.has_text)

    def mixed_store_top10(art: ProjectionArtifact) -> float:
        # even items stored image-only, odd ones text-only; the text of each even item is the query
        img, txt = art.project(image_only), art.project(text_only)
        ev, od = np.arange(0, 300, 2), np.arange(1, 300, 2)
        s = txt[ev] @ np.concatenate([img[ev], txt[od]]).T
        own = s[np.arange(len(ev)), np.arange(len(ev))]
        return float(np.mean((s > own[:, None]).sum(axis=1) < 10))

    # 60 epochs (~10 s each): the gap grows with training (0.29 -> 0.35 at 15 epochs, 0.33 -> 0.52 at 60, 0.16-0.19 ->
    # 0.80-0.82 at 200 through fit-projection)
    off = fit_projection(raw, None, TrainConfig(epochs=60, seed=0, modality_dropout=0.0), progress=False)
    on = fit_projection(raw, None, TrainConfig(epochs=60, seed=0), progress=False)
    assert on.training["config"]["modality_dropout"] == 0.3
    assert np.allclose(off.weight[:, -2], off.weight[:, -1], atol=1e-5)  # the flags only ever moved together
    assert not np.allclose(on.weight[:, -2], on.weight[:, -1], atol=1e-3)
    with_dropout, without = mixed_store_top10(on), mixed_store_top10(off)
    assert with_dropout > without + 0.12, (with_dropout, without)
    with pytest.raises(ValueError, match="modality_dropout"):
        TrainConfig(modality_dropout=1.0)
