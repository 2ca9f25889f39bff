"""Calibration of class probabilities on held-out (or out-of-fold) scores, and the metrics that judge it.

Methods (multiclass by one-vs-rest then renormalising rows, as scikit-learn does,
except temperature which is multiclass-native):

* ``platt`` - logistic regression on the logit of each class score (Platt 1999);
* ``beta`` - Beta calibration (Kull et al. 2017, the ``betacal`` package): logistic
  regression on ``[ln p, -ln(1 - p)]``; it contains the identity map, so it cannot
  un-calibrate an already calibrated model;
* ``isotonic`` - scikit-learn's isotonic regression (only offered to ``auto`` from
  1000 calibration samples up: it overfits below that);
* ``temperature`` - one scalar ``T``: ``softmax(log p / T)``, fitted by log loss;
* ``none`` - the identity.

The three one-vs-rest maps are offered to ``auto`` only when every class has at least
``min_per_class`` calibration rows (see :func:`calibrate`).

``auto`` chooses the method with the lowest *cross-validated* log loss on the
calibration scores: each candidate is fitted on k-1 folds and scored on the
k-th, so the choice (and the "after" ECE we report) is not judged on the data
it was fitted on. ECE is top-label with equal-width bins.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-6
METHODS = ("none", "temperature", "platt", "beta", "isotonic")
ISOTONIC_MIN_SAMPLES = 1000
ONE_VS_REST = ("platt", "beta", "isotonic")


# ------------------------------------------------------------------ metrics
def _check(probs: np.ndarray, y: np.ndarray) -> None:
    if probs.ndim != 2 or y.shape != (probs.shape[0],):
        raise ValueError(f"probs must be (n, C) and y (n,), got {probs.shape} and {y.shape}")


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Top-label expected calibration error with ``bins`` equal-width confidence bins."""
    _check(probs, y)
    if len(y) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / len(y))


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multiclass Brier score: mean over rows of sum_c (p_c - 1[y = c])^2 (twice the binary one)."""
    _check(probs, y)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def row_log_loss(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's log loss, -log p(true class) (p clipped at ``EPS``); ``log_loss`` is their mean."""
    _check(probs, y)
    return -np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0))


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(row_log_loss(probs, y).mean())


def macro_f1(pred: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over classes ``0..n_classes-1`` (a class with no true and no predicted row scores 0, as
    scikit-learn's ``zero_division=0``). Counted with bincount: the breaker's bootstrap calls it thousands of
    times, where scikit-learn's ``f1_score`` (~2 ms of input checking a call) took 10% of a small job."""
    pred = np.asarray(pred, np.int64)
    y = np.asarray(y, np.int64)
    tp = np.bincount(y[pred == y], minlength=n_classes)[:n_classes]
    support = np.bincount(y, minlength=n_classes)[:n_classes]
    predicted = np.bincount(pred[(pred >= 0) & (pred < n_classes)], minlength=n_classes)[:n_classes]
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    return float(f1.mean())


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's data: per confidence bin, mean confidence, accuracy and count."""

    edges: list[float]
    confidence: list[float | None]
    accuracy: list[float | None]
    count: list[int]

    @classmethod
    def of(cls, probs: np.ndarray, y: np.ndarray, bins: int = 10) -> Reliability:
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == y).astype(float)
        which = np.minimum((conf * bins).astype(int), bins - 1)
        c, a, n = [], [], []
        for b in range(bins):
            m = which == b
            n.append(int(m.sum()))
            c.append(float(conf[m].mean()) if m.any() else None)
            a.append(float(correct[m].mean()) if m.any() else None)
        return cls([b / bins for b in range(bins + 1)], c, a, n)


@dataclass(frozen=True)
class CalibrationMetrics:
    ece: float
    brier: float
    log_loss: float
    macro_f1: float
    n: int

    @classmethod
    def of(cls, probs: np.ndarray, y: np.ndarray, n_classes: int, bins: int = 10) -> CalibrationMetrics:
        return cls(
            ece=ece(probs, y, bins),
            brier=brier(probs, y),
            log_loss=log_loss(probs, y),
            macro_f1=macro_f1(probs.argmax(axis=1), y, n_classes),
            n=len(y),
        )


# -------------------------------------------------------------- calibrators
def _normalise(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.0, 1.0)
    s = p.sum(axis=1, keepdims=True)
    out = np.divide(p, s, out=np.full_like(p, 1.0 / p.shape[1]), where=s > 0)
    return out


class Calibrator:
    """Maps raw (n, C) class probabilities to calibrated ones. ``fit`` then ``transform``."""

    method = "none"

    def fit(self, probs: np.ndarray, y: np.ndarray) -> Calibrator:
        _check(probs, y)
        return self

    def transform(self, probs: np.ndarray) -> np.ndarray:
        return np.asarray(probs, np.float64)


class TemperatureCalibrator(Calibrator):
    method = "temperature"

    def __init__(self) -> None:
        self.temperature_ = 1.0

    def fit(self, probs: np.ndarray, y: np.ndarray) -> TemperatureCalibrator:
        from scipy.optimize import minimize_scalar

        _check(probs, y)
        logp = np.log(np.clip(probs, EPS, 1.0))

        def nll(log_t: float) -> float:
            z = logp / np.exp(log_t)
            z -= z.max(axis=1, keepdims=True)
            return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

        res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
        self.temperature_ = float(np.exp(res.x))
        return self

    def transform(self, probs: np.ndarray) -> np.ndarray:
        z = np.log(np.clip(probs, EPS, 1.0)) / self.temperature_
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


class OneVsRestCalibrator(Calibrator):
    """Platt, Beta or isotonic per class (one-vs-rest), rows renormalised; binary fits the positive class only."""

    def __init__(self, method: str) -> None:
        if method not in ("platt", "beta", "isotonic"):
            raise ValueError(f"unknown one-vs-rest calibration {method!r}")
        self.method = method
        self.maps_: list[object | None] = []

    def _fit_one(self, p: np.ndarray, t: np.ndarray) -> object | None:
        if t.min() == t.max():
            return None  # one outcome only: nothing to learn, keep the raw score
        if p.min() == p.max():
            # one score only (a learner that could not separate anything): the best map is the outcome rate.
            # betacal fitted on it kept a map its own predict cannot apply ("X has 1 features"), which ended
            # the job under the default calibration
            return _Constant(float(t.mean()))
        if self.method == "platt":
            return _platt(p, t)
        if self.method == "beta":
            from betacal import BetaCalibration

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                beta = BetaCalibration(parameters="abm").fit(np.clip(p, EPS, 1 - EPS), t)
                try:
                    beta.predict(np.clip(p[:2], EPS, 1 - EPS))
                except ValueError:  # the same betacal fault on nearly constant scores: Platt's map instead
                    return _platt(p, t)
            return beta
        from sklearn.isotonic import IsotonicRegression

        return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, t)

    def _apply_one(self, m: object | None, p: np.ndarray) -> np.ndarray:
        if m is None:
            return p
        if isinstance(m, _Constant):
            return np.full(len(p), m.value, np.float64)
        if hasattr(m, "coef_"):  # Platt's map (the method's own, or beta's fallback)
            return m.predict_proba(_logit(p)[:, None])[:, 1]  # type: ignore[attr-defined]
        if self.method == "beta":
            return np.asarray(m.predict(np.clip(p, EPS, 1 - EPS)), np.float64)  # type: ignore[attr-defined]
        return np.asarray(m.predict(p), np.float64)  # type: ignore[attr-defined]

    def fit(self, probs: np.ndarray, y: np.ndarray) -> OneVsRestCalibrator:
        _check(probs, y)
        c = probs.shape[1]
        cols = [1] if c == 2 else range(c)
        self.maps_ = [self._fit_one(probs[:, j], (y == j).astype(int)) for j in cols]
        return self

    def transform(self, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs, np.float64)
        if probs.shape[1] == 2:
            p1 = np.clip(self._apply_one(self.maps_[0], probs[:, 1]), 0.0, 1.0)
            return np.column_stack([1.0 - p1, p1])
        out = np.column_stack([self._apply_one(m, probs[:, j]) for j, m in enumerate(self.maps_)])
        return _normalise(out)


@dataclass(frozen=True)
class _Constant:
    """A calibration map that gives every score the same probability."""

    value: float


def _platt(p: np.ndarray, t: np.ndarray) -> object:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1e4).fit(_logit(p)[:, None], t)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def make_calibrator(method: str) -> Calibrator:
    if method == "none":
        return Calibrator()
    if method == "temperature":
        return TemperatureCalibrator()
    return OneVsRestCalibrator(method)


# ---------------------------------------------------------------- selection
@dataclass
class CalibrationResult:
    """The chosen calibrator (fitted on all calibration scores) and how it was judged."""

    method: str
    calibrator: Calibrator
    cv_log_loss: dict[str, float]
    before: CalibrationMetrics
    after: CalibrationMetrics
    reliability_before: Reliability
    reliability_after: Reliability
    oof_calibrated: np.ndarray = field(repr=False)


def _folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y)
    counts = counts[counts > 0]
    k = min(k, len(y))
    if counts.min() >= k:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y))))


def cross_calibrated(method: str, probs: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold calibrated probabilities: each row calibrated by a map fitted without it."""
    out = np.empty_like(probs, dtype=np.float64)
    for fit_idx, apply_idx in _folds(y, folds, seed):
        out[apply_idx] = make_calibrator(method).fit(probs[fit_idx], y[fit_idx]).transform(probs[apply_idx])
    return out


def calibrate(
    probs: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    method: str = "auto",
    *,
    bins: int = 10,
    folds: int = 5,
    seed: int = 0,
    min_per_class: int = 0,
) -> CalibrationResult:
    """Choose (``auto``) or use ``method``, fit it on all of ``probs``/``y``, and report before/after honestly.

    ``auto`` offers the one-vs-rest maps (Platt, Beta, isotonic) only when every one of the ``n_classes`` has at
    least ``min_per_class`` rows in ``y``: each class's map is fitted on that class's rows alone, and from a
    handful of them it learns noise - which also moves the argmax - while the cross-validated choice between
    methods, with a row or two of the class per fold, cannot tell. Temperature (one parameter for all classes)
    and the identity are always offered."""
    _check(probs, y)
    if len(y) < 4:
        raise ValueError(f"calibration needs at least 4 held-out scores, got {len(y)}")
    if method == "auto":
        thin = int(np.bincount(y, minlength=n_classes).min()) < min_per_class
        candidates = [
            m
            for m in METHODS
            if (m != "isotonic" or len(y) >= ISOTONIC_MIN_SAMPLES) and not (thin and m in ONE_VS_REST)
        ]
    elif method in METHODS:
        candidates = [method]
    else:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {('auto', *METHODS)}")
    oof = {m: cross_calibrated(m, probs, y, folds=folds, seed=seed) for m in candidates}
    losses = {m: log_loss(p, y) for m, p in oof.items()}
    chosen = min(candidates, key=lambda m: (losses[m], METHODS.index(m)))
    fitted = make_calibrator(chosen).fit(probs, y)
    raw = np.asarray(probs, np.float64)
    return CalibrationResult(
        method=chosen,
        calibrator=fitted,
        cv_log_loss=losses,
        before=CalibrationMetrics.of(raw, y, n_classes, bins),
        after=CalibrationMetrics.of(oof[chosen], y, n_classes, bins),
        reliability_before=Reliability.of(raw, y, bins),
        reliability_after=Reliability.of(oof[chosen], y, bins),
        oof_calibrated=oof[chosen],
    )
