"""Synthetic clustered vectors shaped like a Matryoshka embedding, for tests and benchmarks.

Per-dimension scale ``1/sqrt(d)`` (d = 1..512) puts ~80% of the variance in the
first 128 dims, as a trained Matryoshka (or PCA-ordered) projection does. This
is *not* evidence about real data: benchmarks say which they used.
"""

from __future__ import annotations

import numpy as np

from retrieval.schema import FULL_DIM


def clustered_vectors(
    n: int,
    *,
    n_clusters: int = 20,
    seed: int = 0,
    spread: float = 0.35,
    dim: int = FULL_DIM,
    centres_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 vectors around ``n_clusters`` centres, and each one's cluster.

    ``centres_seed`` fixes the centres independently of ``seed`` so that queries
    can be drawn around the same centres as the indexed points.
    """
    rng = np.random.default_rng(seed)
    crng = np.random.default_rng(seed if centres_seed is None else centres_seed)
    scale = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    centres = crng.normal(size=(n_clusters, dim)).astype(np.float32) * scale
    labels = rng.integers(0, n_clusters, size=n)
    out = np.empty((n, dim), dtype=np.float32)
    step = 65_536  # bounded temporaries for large n
    for start in range(0, n, step):
        stop = min(n, start + step)
        noise = rng.standard_normal(size=(stop - start, dim), dtype=np.float32) * (spread * scale)
        out[start:stop] = centres[labels[start:stop]] + noise
    return out, labels
