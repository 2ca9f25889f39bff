"""How far has the unlabeled pool drifted from the ground-truth seed? A classifier two-sample test.

A logistic regression learns to tell seed embeddings from pool embeddings; its
cross-validated ROC AUC is the drift score (0.5: indistinguishable, as for a
random seed; 1.0: disjoint). ``z`` is (AUC - 0.5) over the AUC's standard error
under the null (Hanley-McNeil's ``sqrt((n1 + n0 + 1) / (12 n1 n0))``), so a small
seed's noisy AUC is not mistaken for drift. Drift is declared when the AUC is
above the threshold *and* z > 3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DriftReport:
    auc: float
    z: float
    threshold: float
    drifted: bool
    n_seed: int
    n_pool: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def c2st(
    x_seed: np.ndarray,
    x_pool: np.ndarray,
    *,
    threshold: float = 0.7,
    max_per_side: int = 2000,
    folds: int = 5,
    seed: int = 0,
) -> DriftReport:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    if len(x_seed) < folds or len(x_pool) < folds:
        return DriftReport(float("nan"), float("nan"), threshold, False, len(x_seed), len(x_pool))
    a = x_seed[rng.permutation(len(x_seed))[:max_per_side]]
    b = x_pool[rng.permutation(len(x_pool))[:max_per_side]]
    x = np.vstack([a, b]).astype(np.float64)
    y = np.r_[np.ones(len(a)), np.zeros(len(b))]
    score = cross_val_predict(
        LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"),
        x,
        y,
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        method="decision_function",
    )
    auc = float(roc_auc_score(y, score))
    n1, n0 = len(a), len(b)
    se = math.sqrt((n1 + n0 + 1) / (12.0 * n1 * n0))
    z = (auc - 0.5) / se
    return DriftReport(auc, z, threshold, bool(auc > threshold and z > 3), n1, n0)
