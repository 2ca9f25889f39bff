"""Neighbourhood features from the k-nearest-neighbour graph of the store.

The graph (each point's ``k`` nearest neighbours and their similarities, the
point itself left out by id) is pulled once per job from the store's
shortlist/rerank path in batches; the label features are recomputed from it
every iteration as the accepted pseudo-labels change.

Per point and class ``c`` (``C`` classes), with ``s_j`` = max(similarity, 0) of neighbour ``j``
and ``v_jc`` its vote for ``c`` (1 for ground truth, ``pseudo_weight x confidence`` for an
accepted pseudo-label, 0 otherwise):

* ``share_c = sum_j s_j v_jc / sum_j s_j sum_c' v_jc'`` - the similarity-weighted class
  distribution of the labelled neighbours (0 when none is labelled);
* ``max_sim_c`` / ``mean_sim_c`` - the largest and mean similarity of neighbours whose
  label (ground truth or accepted) is ``c`` (0 when none);
* ``labelled_mass = sum_j s_j sum_c v_jc / sum_j s_j`` - how much of the neighbourhood is
  labelled at all, and ``mean_sim`` - how dense the neighbourhood is.

Leak-free by construction: a point is never its own neighbour, so its own label
never feeds its own features; and the job hides the labels a model is evaluated
on from that model's features (see :mod:`labeling.selftrain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class NeighbourGraph:
    """``index[i]`` holds the snapshot rows of point ``i``'s neighbours (``-1``: none), ``sims[i]`` their similarity."""

    index: np.ndarray  # (n, k) int32
    sims: np.ndarray  # (n, k) float32

    def __post_init__(self) -> None:
        if self.index.shape != self.sims.shape or self.index.ndim != 2:
            raise ValueError(f"graph index {self.index.shape} and sims {self.sims.shape} must be the same (n, k)")

    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    @property
    def k(self) -> int:
        return int(self.index.shape[1])

    @classmethod
    def exact(cls, x: np.ndarray, k: int, *, chunk: int = 2048) -> NeighbourGraph:
        """Exact cosine kNN in memory (for tests and small arrays; the job uses the store)."""
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        n = xn.shape[0]
        k = min(k, n - 1)
        index = np.empty((n, k), np.int32)
        sims = np.empty((n, k), np.float32)
        for start in range(0, n, chunk):
            s = xn[start : start + chunk] @ xn.T
            rows = np.arange(s.shape[0])
            s[rows, start + rows] = -np.inf  # never your own neighbour
            top = np.argpartition(-s, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            index[start : start + chunk] = top
            sims[start : start + chunk] = np.take_along_axis(s, top, axis=1)
        return cls(index, sims)


def votes(
    n_classes: int,
    gt: np.ndarray,
    pseudo: np.ndarray,
    pseudo_conf: np.ndarray,
    pseudo_weight: float,
) -> np.ndarray:
    """The (n, C) vote matrix: one-hot ground truth (``gt >= 0``), weighted accepted pseudo-labels (``pseudo >= 0``)."""
    n = gt.shape[0]
    v = np.zeros((n, n_classes), np.float32)
    g = gt >= 0
    v[np.flatnonzero(g), gt[g]] = 1.0
    p = (pseudo >= 0) & ~g
    v[np.flatnonzero(p), pseudo[p]] = pseudo_weight * pseudo_conf[p]
    return v


def feature_names(classes: list[str]) -> list[str]:
    return (
        [f"share[{c}]" for c in classes]
        + [f"max_sim[{c}]" for c in classes]
        + [f"mean_sim[{c}]" for c in classes]
        + ["labelled_mass", "mean_sim"]
    )


def propagation_names(classes: list[str]) -> list[str]:
    return [f"propagated[{c}]" for c in classes] + ["propagated_mass"]


def neighbourhood_features(graph: NeighbourGraph, v: np.ndarray, *, chunk: int = 65_536) -> np.ndarray:
    """(m, 3C + 2) features of the graph's m query points from their neighbours' votes ``v`` (rows of ``v``
    are the points the graph's indexes refer to; see the module docstring)."""
    c = v.shape[1]
    n = graph.n
    if graph.index.size and int(graph.index.max()) >= v.shape[0]:
        raise ValueError(f"the graph refers to row {int(graph.index.max())} but the vote matrix has {v.shape[0]} rows")
    out = np.zeros((n, 3 * c + 2), np.float32)
    vpad = np.vstack([v, np.zeros((1, c), np.float32)])  # row -1 -> a neighbour with no vote
    for start in range(0, n, chunk):
        idx = graph.index[start : start + chunk]
        s = np.where(idx >= 0, np.maximum(graph.sims[start : start + chunk], 0.0), 0.0).astype(np.float32)
        nv = vpad[idx]  # (m, k, C)
        weighted = (s[:, :, None] * nv).sum(axis=1)  # (m, C)
        labelled = weighted.sum(axis=1)
        share = np.divide(weighted, labelled[:, None], out=np.zeros_like(weighted), where=labelled[:, None] > 0)
        present = nv > 0
        sims_c = np.where(present, s[:, :, None], 0.0)
        count_c = present.sum(axis=1)
        max_c = sims_c.max(axis=1)
        mean_c = np.divide(sims_c.sum(axis=1), count_c, out=np.zeros_like(max_c), where=count_c > 0)
        total = s.sum(axis=1)
        mass = np.divide(labelled, total, out=np.zeros_like(total), where=total > 0)
        valid = (idx >= 0).sum(axis=1)
        mean_sim = np.divide(total, valid, out=np.zeros_like(total), where=valid > 0)
        out[start : start + chunk] = np.hstack([share, max_c, mean_c, mass[:, None], mean_sim[:, None]])
    return out


def neighbour_vote(graph: NeighbourGraph, v: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``rows``: the similarity-weighted vote distribution of their labelled neighbours, and how many are labelled.

    Returns ``(distribution (m, C), labelled_count (m,), majority_class (m,))``; rows without a labelled
    neighbour get a zero distribution and majority ``-1``.
    """
    c = v.shape[1]
    idx = graph.index[rows]
    s = np.where(idx >= 0, np.maximum(graph.sims[rows], 0.0), 0.0)
    vpad = np.vstack([v, np.zeros((1, c), np.float32)])
    nv = vpad[idx]
    w = (s[:, :, None] * (nv > 0)).sum(axis=1)  # presence-weighted: a labelled neighbour votes with its similarity
    total = w.sum(axis=1)
    dist = np.divide(w, total[:, None], out=np.zeros_like(w), where=total[:, None] > 0)
    count = (nv > 0).any(axis=2).sum(axis=1)
    majority = np.where(total > 0, dist.argmax(axis=1), -1)
    return dist, count, majority


class Propagation:
    """Leak-free multi-hop label propagation over the kNN graph: label spreading's reach, as features.

    With ``S`` the row-normalised similarity graph and ``v`` the vote matrix,
    ``F = sum_{t=1..hops} alpha^(t-1) (S^t v - diag(S^t) * v)``: the labels that reach a
    point along walks of 1..hops steps, minus its own label's echo (walks that leave the
    point and come back to it), so a labelled point's own label never feeds its own
    features, exactly. Features: F as a distribution over classes (C) and its total mass.
    ``diag(S^t)`` is computed once per graph, in row chunks (memory O(chunk x k^hops)).
    """

    def __init__(self, graph: NeighbourGraph, *, hops: int = 3, alpha: float = 0.8, chunk: int = 2048) -> None:
        import scipy.sparse as sp

        if hops < 1:
            raise ValueError(f"hops must be >= 1, got {hops}")
        self.hops, self.alpha = hops, alpha
        self.S = self._normalised(graph.index, graph.sims, graph.n)
        n = graph.n
        self.diags: list[np.ndarray] = [np.zeros(n)]  # diag(S^1) = 0: no self-loops
        for _ in range(2, hops + 1):
            self.diags.append(np.zeros(n))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            rows = np.arange(stop - start)
            p = self.S[start:stop]
            for t in range(2, hops + 1):
                p = p @ self.S
                self.diags[t - 1][start:stop] = np.asarray(p[rows, rows + start]).ravel()
        self._sp = sp

    @staticmethod
    def _normalised(index: np.ndarray, sims: np.ndarray, n_cols: int) -> Any:
        import scipy.sparse as sp

        s = _similarity_matrix(index, sims, n_cols)
        d = np.asarray(s.sum(axis=1)).ravel()
        return sp.diags(np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)) @ s

    def _out(self, f: np.ndarray) -> np.ndarray:
        f = np.maximum(f, 0.0)
        mass = f.sum(axis=1, keepdims=True)
        dist = np.divide(f, mass, out=np.zeros_like(f), where=mass > 0)
        return np.hstack([dist, mass]).astype(np.float32)

    def features(self, v: np.ndarray) -> np.ndarray:
        """(n, C + 1) for the graph's own points."""
        f = np.zeros(v.shape, np.float64)
        cur = v.astype(np.float64)
        for t in range(1, self.hops + 1):
            cur = self.S @ cur
            f += self.alpha ** (t - 1) * (cur - self.diags[t - 1][:, None] * v)
        return self._out(f)

    def features_new(self, index: np.ndarray, sims: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(m, C + 1) for new points (no label of their own: nothing to remove), given their neighbour rows."""
        q = self._normalised(np.asarray(index), np.asarray(sims), v.shape[0])
        f = np.zeros((q.shape[0], v.shape[1]), np.float64)
        cur = v.astype(np.float64)
        for t in range(1, self.hops + 1):
            f += self.alpha ** (t - 1) * (q @ cur)
            cur = self.S @ cur
        return self._out(f)


class Spreading:
    """Label spreading (Zhou et al. 2004) on the kNN graph, as a second opinion beside the learner.

    ``W`` = the kNN similarities (clipped at 0), symmetrised; ``S = D^-1/2 W D^-1/2``;
    ``F <- alpha S F + (1 - alpha) v`` iterated until ``alpha^t`` < ``tol`` (the closed
    form ``(1 - alpha)(I - alpha S)^-1 v``, without the inverse). Rows are returned as
    class distributions; a row no label reaches gets the uniform distribution.

    Leak-freedom is the caller's: a row's own vote in ``v`` feeds its own ``F`` (the
    ``(1 - alpha) v`` term), so the job spreads with the votes of the rows it scores
    removed (held-out ground truth is never in a chain's votes; the pool half a model
    scores has its pseudo-labels left out of the spread that scores it).
    """

    def __init__(self, graph: NeighbourGraph, *, alpha: float = 0.2, tol: float = 1e-4) -> None:
        import scipy.sparse as sp

        if not 0 < alpha < 1:
            raise ValueError(f"spreading alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self.steps = max(1, int(np.ceil(np.log(tol) / np.log(alpha))))
        w = _similarity_matrix(graph.index, graph.sims, graph.n)
        w = ((w + w.T) * 0.5).tocsr()
        d = np.asarray(w.sum(axis=1)).ravel()
        inv = np.divide(1.0, np.sqrt(d), out=np.zeros_like(d), where=d > 0)
        self.S = (sp.diags(inv) @ w @ sp.diags(inv)).tocsr()

    def spread(self, v: np.ndarray) -> np.ndarray:
        """(n, C) class distributions of the graph's points from the votes ``v`` (n, C)."""
        y0 = (1.0 - self.alpha) * np.asarray(v, np.float64)
        f = y0.copy()
        for _ in range(self.steps):
            f = self.alpha * (self.S @ f) + y0
        return _distribution(f)

    def of_labels(self, y: np.ndarray, n_classes: int) -> np.ndarray:
        """Spread ground-truth class indexes ``y`` (n,), -1 = unlabelled."""
        v = np.zeros((len(y), n_classes), np.float64)
        rows = np.flatnonzero(y >= 0)
        v[rows, y[rows]] = 1.0
        return self.spread(v)

    def cross_fitted(
        self,
        y: np.ndarray,
        n_classes: int,
        *,
        folds: int = 4,
        rng: np.random.Generator | None = None,
        full: np.ndarray | None = None,
    ) -> np.ndarray:
        """Spread distributions where each *labelled* row's value comes from a spread that hid its label
        (``folds`` random folds of the labelled rows): a leak-free feature for a learner that trains on
        those labels. Unlabelled rows get the spread of every label (``full``, computed when not given)."""
        rng = rng or np.random.default_rng(0)
        out = (self.of_labels(y, n_classes) if full is None else full).copy()
        labelled = np.flatnonzero(y >= 0)
        part = rng.permutation(len(labelled)) % folds
        for j in range(folds):
            hide = labelled[part == j]
            y_j = y.copy()
            y_j[hide] = -1
            out[hide] = self.of_labels(y_j, n_classes)[hide]
        return out

    @staticmethod
    def new(index: np.ndarray, sims: np.ndarray, f: np.ndarray) -> np.ndarray:
        """(m, C) distributions of new points: their neighbours' distributions ``f`` weighted by similarity."""
        index = np.asarray(index)
        s = np.where(index >= 0, np.maximum(np.asarray(sims, np.float64), 0.0), 0.0)
        fpad = np.vstack([f, np.full((1, f.shape[1]), 1.0 / f.shape[1])])
        return _distribution((s[:, :, None] * fpad[index]).sum(axis=1))


def _similarity_matrix(index: np.ndarray, sims: np.ndarray, n_cols: int) -> Any:
    """The kNN graph as a sparse (m, n_cols) matrix of similarities clipped at 0 (missing neighbours left out)."""
    import scipy.sparse as sp

    m, k = index.shape
    rows = np.repeat(np.arange(m), k)
    cols = np.asarray(index).ravel()
    vals = np.maximum(np.asarray(sims).ravel(), 0.0).astype(np.float64)
    keep = cols >= 0
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(m, n_cols))


def _distribution(f: np.ndarray) -> np.ndarray:
    f = np.maximum(f, 0.0)
    mass = f.sum(axis=1, keepdims=True)
    return np.where(mass > 0, f / np.where(mass > 0, mass, 1.0), 1.0 / f.shape[1])
