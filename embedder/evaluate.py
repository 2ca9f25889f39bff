"""Quality measures of an embedding: kNN label accuracy and a linear probe, on a held-out split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_accuracy(
    train: np.ndarray, train_labels: Sequence[str], test: np.ndarray, test_labels: Sequence[str], k: int = 10
) -> float:
    """Accuracy of a cosine k-NN majority vote (ties to the nearer neighbour) of test items among train items."""
    a, b = _unit(train), _unit(test)
    train_labels = np.asarray(train_labels)
    correct = 0
    for start in range(0, len(b), 1024):
        sims = b[start : start + 1024] @ a.T
        top = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        for row, idx in enumerate(top):
            order = idx[np.argsort(-sims[row, idx])]
            votes: dict[str, float] = {}
            for rank, j in enumerate(order):
                votes[train_labels[j]] = votes.get(train_labels[j], 0.0) + 1.0 + 1e-3 / (rank + 1)
            if max(votes, key=votes.__getitem__) == test_labels[start + row]:
                correct += 1
    return correct / len(b)


def probe_accuracy(
    train: np.ndarray, train_labels: Sequence[str], test: np.ndarray, test_labels: Sequence[str], seed: int = 0
) -> float:
    """Accuracy of a logistic-regression probe whose preprocessing and regularisation are chosen on train.

    3-fold cross-validation on the training part picks per-dimension standardisation
    or not (raw encoder features need it; an embedding's low-variance trailing dims
    turn into amplified noise with it) and the inverse regularisation C, so each
    representation gets its best linear probe and none is favoured by one fixed recipe.
    """
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte = _unit(train) * np.sqrt(train.shape[1]), _unit(test) * np.sqrt(test.shape[1])
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=3000))])
    grid = {"scale": [StandardScaler(), "passthrough"], "clf__C": [0.01, 0.1, 1.0]}
    search = GridSearchCV(pipe, grid, cv=StratifiedKFold(3, shuffle=True, random_state=seed), n_jobs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(xtr, list(train_labels))
    return float(search.score(xte, list(test_labels)))


def stratified_split(labels: Sequence[str], test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with each class split in the same proportion (at least one train item per class)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray([str(v) for v in labels])
    train, test = [], []
    for c in sorted(set(labels)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * len(idx))
        n_test = min(n_test, len(idx) - 1)
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.asarray(train, dtype=int)), np.sort(np.asarray(test, dtype=int))
