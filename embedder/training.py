"""Fitting a projection on items end to end: encode (cached), split, train, evaluate on the held-out part."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.evaluate import knn_accuracy, probe_accuracy, stratified_split
from embedder.features import FeatureCache
from embedder.model import Embedder, Item
from embedder.projection import NESTED_DIMS, ProjectionArtifact, RawFeatures, TrainConfig, fit_projection


def features_for(
    items: Sequence[Item],
    embedder: Embedder,
    *,
    cache_name: str | None = None,
    cache: FeatureCache | None = None,
    progress: bool = True,
) -> RawFeatures:
    """Raw encoder features of ``items``, from the feature cache when ``cache_name`` is given."""

    def compute() -> RawFeatures:
        return embedder.raw_features_many(items, progress=progress)

    if cache_name is None:
        return compute()
    return (cache or FeatureCache()).get_or_compute(
        cache_name, embedder.encoder_signatures(), [it.id for it in items], compute
    )


@dataclass
class FitReport:
    version: str
    n_items: int
    n_train: int
    n_test: int
    n_labels_used: int = 0  # labels the projection's classifier heads saw (0: label-free)
    knn: dict[str, float] = field(default_factory=dict)  # dims ("128", "256", "512", "raw") -> held-out kNN accuracy
    epochs_run: int = 0

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def fit_on_items(
    items: Sequence[Item],
    embedder: Embedder,
    *,
    config: TrainConfig | None = None,
    holdout: float = 0.2,
    label_fraction: float = 1.0,
    use_labels: bool = True,
    cache_name: str | None = None,
    progress: bool = True,
) -> tuple[ProjectionArtifact, FitReport]:
    """Train a projection on ``items`` and measure it on a held-out stratified split.

    The held-out items are used unlabeled in training (the unsupervised term
    sees every item) but their labels never are, so the report's kNN accuracy
    is an honest estimate. ``label_fraction`` < 1 keeps only that share of the
    training labels (stratified), to check the few-labels regime.
    ``use_labels=False`` fits a label-free projection (the neighbourhood term
    alone); the labels, when there are any, still measure it on the same split.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    config = config or TrainConfig()
    raw = features_for(items, embedder, cache_name=cache_name, progress=progress)
    raw = RawFeatures(np.asarray(raw.image), np.asarray(raw.text), np.asarray(raw.has_image), np.asarray(raw.has_text))
    labels = [it.label for it in items]
    labeled = np.array([v is not None for v in labels])
    train_idx = np.flatnonzero(labeled)
    test_idx = np.array([], dtype=int)
    if holdout > 0 and labeled.sum() >= 10:
        tr, te = stratified_split([labels[i] for i in train_idx], holdout, seed=config.seed)
        train_idx, test_idx = train_idx[tr], train_idx[te]
    keep = set(train_idx.tolist())
    if label_fraction < 1.0:
        sub, _ = stratified_split([labels[i] for i in train_idx], 1.0 - label_fraction, seed=config.seed + 1)
        keep = set(train_idx[sub].tolist())
    if not use_labels:
        keep = set()
    train_labels = [labels[i] if i in keep else None for i in range(len(items))]
    artifact = fit_projection(raw, train_labels, config, encoders=embedder.encoder_signatures(), progress=progress)

    report = FitReport(
        version=artifact.version,
        n_items=len(items),
        n_train=len(train_idx),
        n_test=len(test_idx),
        n_labels_used=len(keep),
        epochs_run=int(artifact.training.get("epochs_run", 0)),
    )
    if len(test_idx):
        ytr = [labels[i] for i in train_idx]
        yte = [labels[i] for i in test_idx]
        for m in NESTED_DIMS:
            z = artifact.project(raw, m)
            report.knn[str(m)] = knn_accuracy(z[train_idx], ytr, z[test_idx], yte)
        concat = raw.raw_concat()
        report.knn["raw"] = knn_accuracy(concat[train_idx], ytr, concat[test_idx], yte)
        artifact.training["holdout"] = {"fraction": holdout, "knn_accuracy": report.knn}
    return artifact, report


__all__ = ["FitReport", "features_for", "fit_on_items", "probe_accuracy"]
