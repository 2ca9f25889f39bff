"""Settings of a labeling job: every knob in one validated object.

Defaults follow the article's regime (XGBoost eta 0.05, max_depth 6, lambda 1.5,
alpha 0.5, subsample 0.8; a State Gate at calibrated P >= 0.8; at most 10
iterations) plus the guards that keep self-training from confirming its own
mistakes (held-out/out-of-fold calibration, a neighbourhood check in the gate,
per-class caps, cross-fitted re-scoring, a collapse breaker).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_ITERATIONS = 10  # the article's hard cap; a config asking for more is refused

CalibrationMethod = Literal["auto", "platt", "beta", "isotonic", "temperature", "none"]
LearnerName = Literal["xgboost", "xgboost_dask", "random_forest"]
EvalMode = Literal["auto", "holdout", "cv"]
UncertaintyScore = Literal["margin", "entropy"]


class XGBoostParams(BaseModel):
    """The article's XGBoost regime (all configurable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eta: float = Field(0.05, gt=0, le=1)
    max_depth: int = Field(6, ge=1, le=16)
    reg_lambda: float = Field(1.5, ge=0)
    reg_alpha: float = Field(0.5, ge=0)
    subsample: float = Field(0.8, gt=0, le=1)
    colsample_bytree: float = Field(0.8, gt=0, le=1)
    min_child_weight: float = Field(1.0, ge=0)
    max_rounds: int = Field(400, ge=1, le=10_000)
    early_stopping_rounds: int = Field(30, ge=1)
    max_bin: int = Field(64, ge=8, le=1024)  # histogram bins per feature: 64 fits ~25% faster than 128 here
    #: ``None``: logloss for binary, mlogloss for multiclass (the article's aucpr: ``"aucpr"``; see learners.py).
    eval_metric: str | None = None
    #: Optional monotone constraints by feature index: {index: +1 | -1}.
    monotone_constraints: dict[int, Literal[-1, 1]] | None = None
    n_jobs: int = Field(2, ge=1)


class ForestParams(BaseModel):
    """Random Forest, the article's comparison learner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_estimators: int = Field(300, ge=1, le=5000)
    max_depth: int | None = Field(None, ge=1)
    min_samples_leaf: int = Field(1, ge=1)
    max_features: Literal["sqrt", "log2"] | float = "sqrt"
    n_jobs: int = Field(2, ge=1)


class LabelingConfig(BaseModel):
    """One labeling job. Validated on construction; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- data
    label_field: str = "label"
    source_field: str = "label_source"
    #: A payload field with known truth, read only to *report* pseudo-label precision (never trained on).
    truth_field: str | None = None
    prefix_dims: Literal[128, 256, 512] = 128
    page_size: int = Field(1024, ge=16, le=100_000)
    #: Parallel scroll partitions for the read and kNN-graph passes (disjoint point-id ranges, one thread
    #: each); None = the store's default (1 on Edge, 4 on a Qdrant server).
    read_partitions: int | None = Field(None, ge=1, le=64)

    # ---- guards
    min_seed_fraction: float = Field(0.05, ge=0, le=1)
    min_class_examples: int = Field(5, ge=2)
    allow_sparse_seed: bool = False
    drift_auc_threshold: float = Field(0.70, gt=0.5, le=1.0)
    #: Gate threshold used instead of ``threshold`` when drift is detected (gates harder).
    drift_threshold: float = Field(0.90, gt=0, le=1)
    #: Per-class caps are multiplied by this when drift is detected.
    drift_cap_factor: float = Field(0.5, gt=0, le=1)
    drift_max_per_side: int = Field(2000, ge=50)

    # ---- evaluation split (no calibration/gate/breaker score from a model that saw that label)
    eval_mode: EvalMode = "auto"
    holdout_fraction: float = Field(0.2, gt=0, lt=0.9)
    cv_folds: int = Field(4, ge=2, le=20)
    #: cv mode: the K folds are drawn this many times with different shuffles, one chain per fold and draw
    #: (K x repeats chains). A ground-truth row is then held out once per draw, and its held-out score (what
    #: calibration, the blend, the gate's threshold check and the breaker read) is the mean of its draws;
    #: the pool's written probability averages every chain. Ignored in holdout mode (one chain).
    cv_repeats: int = Field(1, ge=1, le=10)
    #: Share of a *new* point's probability (``Predictor``, e.g. a test split) that comes from one more chain
    #: fitted after the loop on *all* the ground truth plus the written accepted labels; the rest averages the
    #: loop's chains, each of which saw (K-1)/K of the ground truth in cv mode (or 80% in holdout mode). It has
    #: no held-out rows of its own: it trains the written iteration's median XGBoost round count, its C is chosen
    #: on the whole seed, and the written calibration map is applied to its scores (scikit-learn's
    #: ``CalibratedClassifierCV(ensemble=False)`` pattern). 0 = off. The pool's written labels never use it.
    #: ``auto`` (the default) = 0.5 in cv mode and 0 in holdout mode. 0.5 in cv mode was measured side by side on
    #: all five datasets at 5% (BENCHMARKS.md, "final_refit, the default"): macro-F1 level within its standard
    #: error on six cells and +1.0 on the subcategories (the thinnest labels), test probabilities less
    #: under-confident on all seven; 0.2, 0.5 and 1.0 were level on Rotten Tomatoes at 2%. Off in holdout mode
    #: because nothing measured it there: that mode needs >= 250 labels a class and >= 2,500 in all, where the
    #: one model already sees 80% of them, and the refit costs about one more iteration's training (estimated
    #: from the per-iteration seconds of the 100k-point job, 40-61 s, on a job measured at 531 s against its
    #: 600 s target; not measured with the refit). Set a number to use it in both modes.
    final_refit: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = "auto"
    #: ``auto`` uses out-of-fold scores (cv) when the smallest class has fewer ground-truth examples than this:
    #: below 250, a 20% holdout slice holds < 50 rows of that class, too few to calibrate on or to validate the
    #: gate threshold with, and every model would train without a fifth of an already small seed (measured on
    #: Rotten Tomatoes at 5%: holdout scored below supervised XGBoost trained on the whole seed).
    cv_below_per_class: int = Field(250, ge=2)
    #: ``auto`` also uses cv when the holdout slice would hold fewer than this many rows in all, whatever the
    #: per-class counts: the gate reads only the scores above its threshold, and the slice must have enough
    #: rows up there to calibrate and to check them. Measured on Rotten Tomatoes at a 20% seed (390 labels per
    #: class, a 156-row slice): held out, the accepted labels were over-confident on 2 of 3 seeds, and already
    #: at iteration 1; the four chains on the same splits were not (BENCHMARKS.md). 500 is a round number
    #: between that slice and the 1,000-row slices of the 100k-point job, which were honest; it is not fitted.
    min_holdout_rows: int = Field(500, ge=0)

    # ---- neighbourhood features
    k: int = Field(15, ge=1, le=200)
    shortlist: int | None = Field(None, ge=1)
    pseudo_feature_weight: float = Field(0.5, ge=0, le=1)
    neighbourhood_features: bool = True
    #: Leak-free multi-hop label propagation features (0 = off); see labeling.neighbours.Propagation.
    propagation_hops: int = Field(3, ge=0, le=6)
    propagation_alpha: float = Field(0.8, gt=0, le=1)
    #: Blend the learner's scores with label spreading over the same graph (labeling.neighbours.Spreading);
    #: the weight is chosen each iteration by cross-validated log loss on the held-out ground truth, so a
    #: graph that does not carry the labels gets weight 0 and a graph that does is not thrown away.
    spreading: bool = True
    spreading_alpha: float = Field(0.2, gt=0, lt=1)
    #: Also give the learner the spread class distribution as features (cross-fitted on ground-truth rows).
    spreading_feature: bool = True
    #: Blend in a logistic regression on the embedding prefix, trained on the same rows as the learner (ground
    #: truth, pseudo-labels, Mixup). Its weight is chosen with the spreading's on held-out ground truth, so it
    #: only counts where it helps. Embeddings are made for linear read-outs: on 5% seeds a linear model alone
    #: beat XGBoost on the same seed by 5-13 macro-F1 points on emoji, MNIST and Rotten Tomatoes (BENCHMARKS.md).
    linear: bool = True
    #: Its inverse regularisation strength; None = chosen per chain by 3-fold CV log loss on its visible seed.
    linear_c: float | None = Field(None, gt=0)
    #: The blend's weights (learner, linear, spreading) are chosen on the held-out ground truth; > 0 bags that
    #: choice over this many bootstrap resamples of the rows (``labeling.selftrain.choose_blend``); 0 = one arg-min.
    blend_resamples: int = Field(0, ge=0, le=1000)

    # ---- learner
    learner: LearnerName = "xgboost"
    #: ``xgboost_dask``: a Dask scheduler address (tcp://host:8786); None = a local cluster of processes.
    dask_scheduler: str | None = None
    xgboost: XGBoostParams = XGBoostParams()
    forest: ForestParams = ForestParams()
    balance_classes: bool = True
    #: Each model trains on at most this many accepted pseudo-labels (a uniform sample when there are more):
    #: beyond a few tens of thousands they add little, and this bounds the fit time at millions of points.
    max_pseudo_train: int = Field(20_000, ge=1)

    # ---- calibration
    calibration: CalibrationMethod = "auto"
    calibration_bins: int = Field(10, ge=2, le=100)
    #: ``auto`` offers the one-vs-rest maps (Platt, Beta, isotonic: a map per class, fitted on that class's
    #: held-out rows) only when every class has at least this many held-out ground-truth rows; below, only
    #: temperature scaling (one parameter shared by all classes) or none. A Platt map has 2 parameters per class
    #: (Beta 3) and the 5-fold choice between methods sees ~1/5 of a class's rows per fold: 10 leaves 2.
    calibration_ovr_min_per_class: int = Field(10, ge=0)

    # ---- State Gate
    threshold: float = Field(0.8, gt=0, le=1)
    neighbourhood_veto: bool = True
    veto_min_labelled: int = Field(2, ge=1)
    #: Raise the threshold (never lower it) until held-out ground truth shows the scores above it are not
    #: over-confident (labeling.gate.validated_threshold); at least this many held-out rows must support it.
    validate_threshold: bool = True
    threshold_min_support: int = Field(10, ge=1)
    veto_majority: float = Field(0.5, ge=0, lt=1)
    #: A class may get at most ``cap_factor`` x (its ground-truth share) x (pool size) accepted labels.
    cap_factor: float = Field(1.0, gt=0)

    # ---- Mixup
    mixup: bool = True
    mixup_alpha: float = Field(0.4, gt=0)
    mixup_fraction: float = Field(0.5, ge=0, le=4)

    # ---- loop
    max_iterations: int = Field(MAX_ITERATIONS, ge=1)
    stop_change: float = Field(0.01, ge=0, le=1)
    breaker: bool = True
    breaker_tolerance: float = Field(0.01, ge=0, le=1)
    #: The breaker trips on a drop larger than max(tolerance, breaker_z x the paired-bootstrap standard error
    #: of the F1 difference), so the noise of a small held-out slice does not stop a healthy run.
    breaker_z: float = Field(1.5, ge=0)

    # ---- active learning
    review_count: int = Field(50, ge=0)
    uncertainty: UncertaintyScore = "margin"

    seed: int = 0

    @field_validator("max_iterations")
    @classmethod
    def _hard_cap(cls, value: int) -> int:
        if value > MAX_ITERATIONS:
            raise ValueError(f"max_iterations is capped at {MAX_ITERATIONS} (the article's rule), got {value}")
        return value

    @field_validator("label_field", "source_field")
    @classmethod
    def _field_name(cls, value: str) -> str:
        if not value or not isinstance(value, str):
            raise ValueError("payload field names must be non-empty strings")
        return value

    def describe(self) -> dict[str, object]:
        """The config as plain JSON (recorded in every run report)."""
        return self.model_dump(mode="json")
