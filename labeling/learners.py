"""Learners behind one small contract: ``fit(x, y, w)`` then ``predict_proba(x)``.

This is the loop's internal protocol, not scikit-learn's estimator API: ``y`` is a soft target matrix and
``w`` a weight per row, both required, and there is no ``get_params`` / ``clone``. What follows scikit-learn's
shape for users is the job's result (``JobResult.predict_proba`` on new vectors); a learner of one's own for
``run_job(learner_factory=...)`` implements this protocol. All three here check their input the same way:
2-D, finite features of the width they were trained on, and targets whose rows sum to 1.

Training targets are *soft*: an (n, C) matrix whose rows sum to 1 (one-hot for
ground truth and hard pseudo-labels, a convex mixture for Mixup rows), with a
weight per row. XGBoost learns binary soft labels natively (``binary:logistic``
takes labels in [0, 1]); for multiclass, and for the Random Forest, a soft row
becomes one weighted row per class it puts mass on - the same cross-entropy
gradient, in a form the learner accepts.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from labeling.config import ForestParams, LabelingConfig, XGBoostParams


class Learner(Protocol):
    name: str
    n_classes: int

    def fit(
        self, x: np.ndarray, y: np.ndarray, w: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None
    ) -> Learner: ...

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


def expand_soft(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft targets (n, C) -> hard rows: one row per (row, class with mass), weight ``w * mass``."""
    rows, cls = np.nonzero(y > 0)
    return x[rows], cls.astype(np.int32), (w[rows] * y[rows, cls]).astype(np.float32)


def check_targets(x: np.ndarray, y: np.ndarray, w: np.ndarray, n_classes: int) -> None:
    if x.ndim != 2 or y.shape != (x.shape[0], n_classes) or w.shape != (x.shape[0],):
        raise ValueError(f"fit needs x (n, d), y (n, {n_classes}), w (n,); got {x.shape}, {y.shape}, {w.shape}")
    if x.shape[0] == 0:
        raise ValueError("fit needs at least one training row")
    if not np.all(np.isfinite(x)) or np.any(w < 0) or np.any(y < 0):
        raise ValueError("training features must be finite, weights and targets non-negative")
    if not np.allclose(y.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("soft targets must be rows that sum to 1 (one-hot for hard labels)")


def check_features(x: Any, n_features: int | None, who: str) -> np.ndarray:
    """Rows to score: 2-D, finite, as wide as the training rows (the three learners differed here: one scored
    NaN rows with confident probabilities, one failed with an IndexError on a 1-D row)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{who}.predict_proba needs a 2-D array (n, d); got shape {x.shape}")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"the model was trained on {n_features} features, got {x.shape[1]}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{who}.predict_proba: features must be finite (NaN or infinity found)")
    return x


def _all_classes(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """A scikit-learn classifier's probabilities over all ``n_classes`` (a class absent from training: p = 0)."""
    out = np.zeros((x.shape[0], n_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


class XGBoostLearner:
    """XGBoost with the article's regime; early stopping on the evaluation slice when one is given."""

    name = "xgboost"

    def __init__(self, n_classes: int, params: XGBoostParams | None = None, *, seed: int = 0) -> None:
        if n_classes < 2:
            raise ValueError(f"need at least 2 classes, got {n_classes}")
        self.n_classes = n_classes
        self.params = params or XGBoostParams()
        self.seed = seed
        self.booster_ = None
        self.best_rounds_: int | None = None

    def _train_params(self, n_features: int) -> dict[str, object]:
        p = self.params
        binary = self.n_classes == 2
        params: dict[str, object] = {
            "eta": p.eta,
            "max_depth": p.max_depth,
            "lambda": p.reg_lambda,
            "alpha": p.reg_alpha,
            "subsample": p.subsample,
            "colsample_bytree": p.colsample_bytree,
            "min_child_weight": p.min_child_weight,
            "max_bin": p.max_bin,
            "tree_method": "hist",
            "nthread": p.n_jobs,
            "seed": self.seed,
            "objective": "binary:logistic" if binary else "multi:softprob",
            # log loss for binary too (the article used aucpr): on the tens of rows a small seed holds out,
            # aucpr reached 1.0 in the first round (or was undefined with one class), so early stopping kept
            # ~1-10 rounds and the blend gave the learner no weight
            "eval_metric": p.eval_metric or ("logloss" if binary else "mlogloss"),
        }
        if not binary:
            params["num_class"] = self.n_classes
        if p.monotone_constraints:
            bad = [i for i in p.monotone_constraints if not 0 <= i < n_features]
            if bad:
                raise ValueError(f"monotone_constraints name feature indexes {bad} outside 0..{n_features - 1}")
            cons = [0] * n_features
            for i, sign in p.monotone_constraints.items():
                cons[i] = sign
            params["monotone_constraints"] = "(" + ",".join(map(str, cons)) + ")"
        return params

    def fit(
        self, x: np.ndarray, y: np.ndarray, w: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None
    ) -> XGBoostLearner:
        import xgboost as xgb

        check_targets(x, y, w, self.n_classes)
        if self.n_classes == 2:
            dtrain = xgb.DMatrix(x, label=y[:, 1], weight=w)  # soft labels in [0, 1]
        else:
            xe, ye, we = expand_soft(x, y, w)
            dtrain = xgb.DMatrix(xe, label=ye, weight=we)
        evals = []
        if eval_set is not None and len(eval_set[1]):
            evals = [(xgb.DMatrix(eval_set[0], label=eval_set[1]), "eval")]
        booster = xgb.train(
            self._train_params(x.shape[1]),
            dtrain,
            num_boost_round=self.params.max_rounds,
            evals=evals,
            early_stopping_rounds=self.params.early_stopping_rounds if evals else None,
            verbose_eval=False,
        )
        self.booster_ = booster
        self.best_rounds_ = int(booster.best_iteration) + 1 if evals else self.params.max_rounds
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        if self.booster_ is None:
            raise RuntimeError("XGBoostLearner is not fitted")
        # the width check matters: xgboost would silently accept too few columns
        x = check_features(x, self.booster_.num_features(), "XGBoostLearner")
        p = self.booster_.predict(xgb.DMatrix(x), iteration_range=(0, self.best_rounds_ or 0))
        if self.n_classes == 2:
            p = np.column_stack([1.0 - p, p])
        return np.asarray(p, np.float64)


class DaskXGBoostLearner(XGBoostLearner):
    """The same XGBoost, trained across a Dask cluster by ``xgboost.dask`` when the training set outgrows
    one machine. Rows are split into ``partitions`` chunks spread over the workers; each worker builds
    histograms of its rows and they are all-reduced every round (XGBoost's Rabit), so the model matches the
    single-machine one up to the row subsampling's randomness. The booster comes back to the caller, so
    ``predict_proba`` is the single-machine one (scoring is cheap and streams in the job's pages).

    ``scheduler``: a Dask scheduler address (``tcp://host:8786``) or a ``distributed.Client``; ``None``
    starts a local cluster of worker *processes* on first use (one per core), shared by every learner of
    this process.
    """

    name = "xgboost_dask"
    _local_client = None

    def __init__(
        self,
        n_classes: int,
        params: XGBoostParams | None = None,
        *,
        seed: int = 0,
        scheduler: object = None,
        partitions: int | None = None,
    ) -> None:
        super().__init__(n_classes, params, seed=seed)
        self.scheduler = scheduler
        self.partitions = partitions

    def _client(self) -> object:
        from distributed import Client, LocalCluster

        if self.scheduler is None:
            cls = DaskXGBoostLearner
            if cls._local_client is None or cls._local_client.status != "running":
                cluster = LocalCluster(processes=True, threads_per_worker=1, dashboard_address=None)
                cls._local_client = Client(cluster)
            return cls._local_client
        if isinstance(self.scheduler, str):
            return Client(self.scheduler)
        return self.scheduler

    def fit(
        self, x: np.ndarray, y: np.ndarray, w: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None
    ) -> DaskXGBoostLearner:
        import dask.array as da
        from xgboost import dask as dxgb

        check_targets(x, y, w, self.n_classes)
        client = self._client()
        if self.n_classes == 2:
            xt, yt, wt = x, y[:, 1], w
        else:
            xt, yt, wt = expand_soft(x, y, w)
        n_workers = max(1, len(client.scheduler_info()["workers"]))  # type: ignore[attr-defined]
        chunk = max(1, -(-len(xt) // (self.partitions or n_workers)))
        dtrain = dxgb.DaskDMatrix(
            client,
            da.from_array(np.ascontiguousarray(xt, np.float32), chunks=(chunk, xt.shape[1])),
            da.from_array(np.asarray(yt, np.float32), chunks=chunk),
            weight=da.from_array(np.asarray(wt, np.float32), chunks=chunk),
        )
        evals = []
        if eval_set is not None and len(eval_set[1]):
            xe, ye = eval_set
            ce = max(1, -(-len(xe) // n_workers))
            deval = dxgb.DaskDMatrix(
                client,
                da.from_array(np.ascontiguousarray(xe, np.float32), chunks=(ce, xe.shape[1])),
                da.from_array(np.asarray(ye, np.float32), chunks=ce),
            )
            evals = [(deval, "eval")]
        params = self._train_params(x.shape[1])
        params["nthread"] = 1  # per worker process; parallelism comes from the workers
        out = dxgb.train(
            client,
            params,
            dtrain,
            num_boost_round=self.params.max_rounds,
            evals=evals,
            early_stopping_rounds=self.params.early_stopping_rounds if evals else None,
            verbose_eval=False,
        )
        booster = out["booster"]
        self.booster_ = booster
        self.best_rounds_ = int(booster.best_iteration) + 1 if evals else self.params.max_rounds
        return self


class RandomForestLearner:
    """scikit-learn's Random Forest (the article's comparison); ignores the evaluation slice."""

    name = "random_forest"

    def __init__(self, n_classes: int, params: ForestParams | None = None, *, seed: int = 0) -> None:
        if n_classes < 2:
            raise ValueError(f"need at least 2 classes, got {n_classes}")
        self.n_classes = n_classes
        self.params = params or ForestParams()
        self.seed = seed
        self.model_ = None

    def fit(
        self, x: np.ndarray, y: np.ndarray, w: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None
    ) -> RandomForestLearner:
        from sklearn.ensemble import RandomForestClassifier

        check_targets(x, y, w, self.n_classes)
        xe, ye, we = expand_soft(x, y, w)
        p = self.params
        self.model_ = RandomForestClassifier(
            n_estimators=p.n_estimators,
            max_depth=p.max_depth,
            min_samples_leaf=p.min_samples_leaf,
            max_features=p.max_features,
            n_jobs=p.n_jobs,
            random_state=self.seed,
        ).fit(xe, ye, sample_weight=we)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.model_ is None:
            raise RuntimeError("RandomForestLearner is not fitted")
        x = check_features(x, self.model_.n_features_in_, "RandomForestLearner")
        return _all_classes(self.model_, x, self.n_classes)


LINEAR_C_GRID = (0.1, 0.5, 2.5, 12.5)


class LinearLearner:
    """Multinomial logistic regression (scikit-learn, L-BFGS) on the embedding prefix: the blend partner of the
    tree learner. Embeddings are made for linear read-outs, and on small seeds a linear model on them beat
    XGBoost on the same rows by 5-13 macro-F1 points (BENCHMARKS.md, ``supervised_linear``); the loop blends
    the two (and label spreading) with weights chosen on held-out ground truth."""

    name = "linear"

    def __init__(
        self, n_classes: int, *, c: float = 1.0, max_iter: int = 300, warm_from: LinearLearner | None = None
    ) -> None:
        if n_classes < 2:
            raise ValueError(f"need at least 2 classes, got {n_classes}")
        if not c > 0:
            raise ValueError(f"the inverse regularisation strength C must be > 0, got {c}")
        self.n_classes = n_classes
        self.c = c
        self.max_iter = max_iter
        #: a fitted model of the same classes (the previous iteration's) whose weights L-BFGS starts from:
        #: each self-training round moves the solution a little, so this cuts the iterations it needs
        self.warm_from = warm_from
        self.model_: Any = None  # a LogisticRegression, or the one class index it was trained on
        self.n_features_: int | None = None

    def fit(
        self, x: np.ndarray, y: np.ndarray, w: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None
    ) -> LinearLearner:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        check_targets(x, y, w, self.n_classes)
        xe, ye, we = expand_soft(x, y, w)
        self.n_features_ = x.shape[1]
        if len(np.unique(ye)) == 1:  # L-BFGS refuses one class; the tree learners predict it with certainty
            self.model_ = int(ye[0])
            return self
        model = LogisticRegression(C=self.c, max_iter=self.max_iter)
        prev = self.warm_from.model_ if self.warm_from is not None else None
        if (
            prev is not None
            and not isinstance(prev, int)
            and np.array_equal(prev.classes_, np.unique(ye))
            and prev.coef_.shape[1] == x.shape[1]
        ):
            model.set_params(warm_start=True)
            model.coef_, model.intercept_ = prev.coef_.copy(), prev.intercept_.copy()
        with warnings.catch_warnings():  # a few hundred L-BFGS steps are plenty for a read-out; say nothing
            warnings.simplefilter("ignore", ConvergenceWarning)
            # many classes with a label or two each is a case this loop is built for, not a mistaken regression
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
            self.model_ = model.fit(xe, ye, sample_weight=we)
        self.warm_from = None  # do not keep a chain of old models alive
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.model_ is None:
            raise RuntimeError("LinearLearner is not fitted")
        x = check_features(x, self.n_features_, "LinearLearner")
        if isinstance(self.model_, int):  # trained on one class: it is certain of it, as the tree learners are
            out = np.zeros((x.shape[0], self.n_classes))
            out[:, self.model_] = 1.0
            return out
        return _all_classes(self.model_, x, self.n_classes)


def choose_linear_c(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    grid: tuple[float, ...] = LINEAR_C_GRID,
    max_rows: int = 4000,
    seed: int = 0,
) -> float:
    """The C of :class:`LinearLearner` with the lowest cross-validated log loss (at most 3 folds) on labelled
    rows ``x``, ``y`` (class indexes; class-balanced weights; at most ``max_rows``, a stratified sample).

    A class with a single example cannot be scored out of fold; its row stays in every training fold and the
    folds are made of the other classes. (Before, one such class made the function give up and return C = 1:
    measured on 31 emoji subcategories at a 5% seed, every chain of the loop - which sees 1 of a class's 2
    labels - got C = 1 while the whole seed chose 12.5.) Only when no class has two examples is the default
    ``1.0`` returned."""
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(seed)
    if len(y) > max_rows:
        keep = np.sort(rng.choice(len(y), max_rows, replace=False))
        x, y = x[keep], y[keep]
    counts = np.bincount(y, minlength=n_classes)
    scored = np.flatnonzero(counts[y] >= 2)  # rows that can be held out: their class has another example
    always = np.flatnonzero(counts[y] == 1)  # single examples: trained on in every fold, never scored
    if len(scored) == 0:
        return 1.0
    folds = int(min(3, counts[counts >= 2].min()))
    cw = np.divide(len(y), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)
    eye = np.eye(n_classes, dtype=np.float32)
    splits = [
        (np.concatenate([scored[tr], always]), scored[te])
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(scored, y[scored])
    ]
    losses = []
    for c in grid:
        loss = 0.0
        for tr, te in splits:
            m = LinearLearner(n_classes, c=c).fit(x[tr], eye[y[tr]], cw[y[tr]].astype(np.float32))
            p = np.clip(m.predict_proba(x[te])[np.arange(len(te)), y[te]], 1e-12, 1.0)
            loss += float(-(cw[y[te]] * np.log(p)).sum())
        losses.append(loss)
    return float(grid[int(np.argmin(losses))])


def make_learner(config: LabelingConfig, n_classes: int, seed: int) -> Learner:
    if config.learner == "xgboost":
        return XGBoostLearner(n_classes, config.xgboost, seed=seed)
    if config.learner == "xgboost_dask":
        return DaskXGBoostLearner(n_classes, config.xgboost, seed=seed, scheduler=config.dask_scheduler)
    return RandomForestLearner(n_classes, config.forest, seed=seed)
