"""Mixup of accepted pseudo-labels (Zhang et al. 2018; as a confirmation-bias guard, Arazo et al. 2020).

Each synthetic row mixes an accepted pseudo-labelled row ``i`` with a random
training row ``j`` (ground truth or pseudo-label): ``x = l x_i + (1 - l) x_j``,
soft target ``y = l y_i + (1 - l) y_j``, weight ``l w_i + (1 - l) w_j``, with
``l ~ Beta(alpha, alpha)`` folded to ``max(l, 1 - l)`` so a row stays closest to
its pseudo-labelled parent. The learners take soft targets (see
:mod:`labeling.learners`): XGBoost natively for binary, weighted duplicated rows
for multiclass and for the Random Forest.
"""

from __future__ import annotations

import numpy as np


def mixup(
    x_pseudo: np.ndarray,
    y_pseudo: np.ndarray,
    w_pseudo: np.ndarray,
    x_all: np.ndarray,
    y_all: np.ndarray,
    w_all: np.ndarray,
    *,
    alpha: float,
    fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``round(fraction x n_pseudo)`` mixed rows (features, soft targets (n, C), weights)."""
    n_mix = round(fraction * len(x_pseudo))
    if n_mix == 0 or len(x_all) == 0:
        return x_pseudo[:0], y_pseudo[:0], w_pseudo[:0]
    i = rng.integers(len(x_pseudo), size=n_mix)
    j = rng.integers(len(x_all), size=n_mix)
    lam = rng.beta(alpha, alpha, size=n_mix)
    lam = np.maximum(lam, 1.0 - lam)
    lx = lam[:, None].astype(x_pseudo.dtype)
    x = lx * x_pseudo[i] + (1 - lx) * x_all[j]
    y = lam[:, None] * y_pseudo[i] + (1 - lam[:, None]) * y_all[j]
    w = lam * w_pseudo[i] + (1 - lam) * w_all[j]
    return x, y, w.astype(np.float32)
