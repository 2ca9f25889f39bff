"""The self-training loop, on arrays (no store): the engine behind ``embedstore label run``.

Per iteration (at most 10):

1. **Chains, and who may see which label.** The ground truth (GT) is split so that
   every score used for calibration, the gate or the breaker comes from a model that
   never saw that label - as a target *or* through a neighbourhood feature:

   * ``holdout`` (a large seed): one chain; a stratified slice ``E`` of the GT is held
     out, never visible to any model, and used only to early-stop, calibrate and
     measure (the breaker). A model early-stops on the held-out rows it does *not* score.
   * ``cv`` (a small seed: the default when the smallest class has < 250 GT examples, or the holdout
     slice would hold < 500 rows in all):
     K stratified folds (``cv_folds``, whatever the thinnest class) and one independent
     *chain* per fold. Chain ``k`` never sees fold ``k``'s labels, runs its own
     self-training (its own accepted set), and is judged on fold ``k``. Chains do not
     share pseudo-labels: a pseudo-label made by a model that saw fold ``k``'s labels
     would echo them back into fold ``k``'s features (measured: shared pseudo-labels
     inflated held-out F1 by ~0.06 and made accepted labels over-confident).
     With ``cv_repeats`` = R > 1 the folds are drawn R times (K x R chains); a GT row's
     held-out score is then the mean of its R out-of-fold scores, and the pool's written
     probability the mean over all K x R chains.

   Within a chain, two models split the pool: each trains on the pseudo-labels of
   one half and scores the other (and half of the chain's held-out rows). So every
   iteration *re-scores* every earlier pseudo-label with a model that did not learn
   it, and a wrong label can be revoked.

2. **Features**: the embedding prefix + neighbourhood features from the kNN graph
   (:mod:`labeling.neighbours`), built per chain from the labels it may see plus
   its accepted pseudo-labels (weighted less).
3. **Train** on GT (weight 1, class-balanced) + accepted pseudo-labels (weight =
   calibrated confidence) + Mixup rows: the learner (XGBoost) on all the features, and
   (``linear``) a logistic regression on the embedding prefix columns of the same rows.
4. **Blend and calibrate**: learner, linear model and label spreading of the chain's
   visible GT are blended with weights chosen on the held-out GT (:func:`choose_blend`);
   the blended out-of-fold / held-out GT scores are calibrated
   (:mod:`labeling.calibration`) and the map applied to the pool.
5. **Collapse breaker**: held-out macro-F1 of this iteration; if it falls below the
   best iteration's by more than max(``breaker_tolerance``, ``breaker_z`` x the
   paired-bootstrap standard error of the difference), roll back to the best
   iteration's labels and stop.
6. **State Gate** (:mod:`labeling.gate`): each chain gates its own calibrated pool
   scores (its next accepted set *replaces* the old one); the written decision gates
   the chains' mean calibrated probability against all the ground truth, and its
   revocations and relabellings are counted.
7. Stop early when the accepted set changes by less than ``stop_change``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labeling.calibration import (
    CalibrationMetrics,
    CalibrationResult,
    calibrate,
    cross_calibrated,
    macro_f1,
    row_log_loss,
)
from labeling.config import LabelingConfig
from labeling.errors import SeedError
from labeling.gate import ACCEPTED, STATUS_NAMES, GateDecision, StateGate, validated_threshold
from labeling.learners import Learner, LinearLearner, XGBoostLearner, choose_linear_c, make_learner
from labeling.mixup import mixup
from labeling.neighbours import (
    NeighbourGraph,
    Propagation,
    Spreading,
    neighbour_vote,
    neighbourhood_features,
    votes,
)

LearnerFactory = Callable[[int, int, int], Learner]  # (n_classes, seed, iteration) -> learner
Progress = Callable[[str, dict[str, object]], None]


@dataclass
class LabelingInput:
    """Everything the loop needs, in snapshot order."""

    x: np.ndarray  # (n, d) embedding prefix, float32
    y: np.ndarray  # (n,) class index of the ground truth, -1 = none
    classes: list[str]
    graph: NeighbourGraph | None = None
    truth: np.ndarray | None = None  # (n,) known truth for *evaluation only*: -1 unknown, -2 a class not in the seed

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.y.shape != (n,):
            raise ValueError(f"y must have shape ({n},), got {self.y.shape}")
        if self.graph is not None and self.graph.n != n:
            raise ValueError(f"graph has {self.graph.n} points, x has {n}")
        if self.truth is not None and self.truth.shape != (n,):
            raise ValueError(f"truth must have shape ({n},), got {self.truth.shape}")


@dataclass
class IterationStats:
    iteration: int
    heldout_before: CalibrationMetrics
    heldout_after: CalibrationMetrics
    calibration_method: str
    calibration_cv_log_loss: dict[str, float]
    train_rows: int
    train_pseudo: int
    mixup_rows: int
    counts: dict[str, int]
    quarantine_reasons: dict[str, int]
    accepted_by_class: dict[str, int]
    newly_accepted: int
    revoked: int
    relabelled: int
    change: float
    mean_accepted_confidence: float | None
    pseudo_precision: float | None
    best_rounds: list[int]
    seconds: dict[str, float]
    #: Weight of the learner in the blend with the linear model and label spreading (1.0: learner only;
    #: None: no blend), and every part's weight.
    blend_weight: float | None = None
    blend_weights: dict[str, float] | None = None
    #: The threshold the gate used this iteration (raised above the configured one when held-out ground truth
    #: showed over-confidence there), and that evidence.
    gate_threshold: float | None = None
    threshold_evidence: dict[str, Any] | None = None
    #: True for the iteration the collapse breaker stopped at: it was scored, never gated, and its (empty)
    #: counts are not a collapse of the accepted set (the written labels are the best iteration's).
    breaker: bool = False

    @property
    def f1(self) -> float:
        return self.heldout_after.macro_f1


@dataclass
class Predictor:
    """The written iteration's models, to label *new* points (not in the snapshot) inductively.

    A new point's neighbourhood features come from its neighbours among the snapshot's
    points, with each chain's labels as that chain saw them; each chain averages its two
    models, the shared calibrator maps the scores, and the chains are averaged - the same
    path that produced the written pool labels. When the final refit ran
    (``LabelingOutcome.final_refit`` > 0), the last chain is one fitted after the loop on all
    the ground truth (``chain_weights`` gives it that share), which the pool's written labels
    never used.
    """

    models: list[list[Learner]]  # per chain: its two models
    votes: list[np.ndarray]  # per chain: the (n, C) vote matrix its models' features were built from
    calibrator: Any
    use_graph: bool
    n_classes: int
    propagation: Propagation | None = None
    #: the blend's weights, in the order (learner, linear, spreading) of the parts present (None: learner only)
    blend: tuple[float, ...] | None = None
    #: per chain: its two linear models on the prefix (None: no linear part)
    linear_models: list[list[Learner]] | None = None
    #: per chain: label spreading of the ground truth it may see, the (n, C) distributions of the snapshot's
    #: points; a new point's blend partner (and feature, when ``spread_feature``) is spread from them
    chain_spread: list[np.ndarray] | None = None
    spread_feature: bool = False
    #: per chain: its share of the output (None: equal shares)
    chain_weights: list[float] | None = None

    def predict_proba(
        self, x: np.ndarray, neighbour_index: np.ndarray | None = None, neighbour_sims: np.ndarray | None = None
    ) -> np.ndarray:
        """Calibrated (m, C) probabilities of new points ``x`` (the same prefix as the job's), given their
        neighbours among the snapshot (rows, -1 = none) and similarities when the job used the graph."""
        x = np.asarray(x, np.float32)
        if self.use_graph and (neighbour_index is None or neighbour_sims is None):
            raise ValueError("this job used neighbourhood features: give the new points' neighbours")
        out = np.zeros((len(x), self.n_classes))
        graph = None
        if self.use_graph:
            graph = NeighbourGraph(np.asarray(neighbour_index, np.int32), np.asarray(neighbour_sims, np.float32))
        for ci, (models, v) in enumerate(zip(self.models, self.votes, strict=True)):
            spread = None
            if graph is not None and self.chain_spread is not None:
                spread = Spreading.new(graph.index, graph.sims, self.chain_spread[ci])
            if graph is not None:
                parts = [x, neighbourhood_features(graph, v)]
                if self.propagation is not None:
                    parts.append(self.propagation.features_new(graph.index, graph.sims, v))
                if self.spread_feature and spread is not None:
                    parts.append(spread)
                feats = np.hstack(parts).astype(np.float32)
            else:
                feats = x
            parts = [np.mean([m.predict_proba(feats) for m in models], axis=0)]
            if self.linear_models is not None:
                parts.append(np.mean([m.predict_proba(x) for m in self.linear_models[ci]], axis=0))
            if spread is not None:
                parts.append(spread)
            raw = blended(parts, self.blend) if self.blend is not None else parts[0]
            share = 1.0 if self.chain_weights is None else self.chain_weights[ci]
            out += share * self.calibrator.transform(raw)
        return out / len(self.models) if self.chain_weights is None else out


@dataclass
class LabelingOutcome:
    pool: np.ndarray  # snapshot rows of the pool points
    decision: GateDecision  # for those rows
    probs: np.ndarray  # calibrated (pool, C)
    since: np.ndarray  # iteration since which the point's current accepted label has held (0 if not accepted)
    iterations: list[IterationStats]
    chosen_iteration: int
    stop_reason: str
    breaker_tripped: bool
    eval_mode: str
    n_models: int
    gate_threshold: float
    calibration: CalibrationResult = field(repr=False)
    first_calibration: CalibrationResult = field(repr=False)
    #: the final refit chain's share of a new point's probability as run (``config.final_refit`` resolved)
    final_refit: float = 0.0
    predictor: Predictor | None = field(default=None, repr=False)
    #: the ground-truth rows (snapshot rows) ``calibration.oof_calibrated`` scores, in its order: each by models
    #: that never saw its label
    eval_rows: np.ndarray | None = field(default=None, repr=False)

    def top_classes(self, row: int, classes: list[str], n: int = 3) -> list[tuple[str, float]]:
        p = self.probs[row]
        order = np.argsort(-p)[:n]
        return [(classes[i], float(p[i])) for i in order]


# ------------------------------------------------------------------- guards
def check_seed(y: np.ndarray, classes: list[str], config: LabelingConfig) -> list[str]:
    """Raise :class:`SeedError` when the seed is too small or thin; returns warnings when overridden."""
    n, n_gt = len(y), int((y >= 0).sum())
    warnings: list[str] = []
    if len(classes) < 2:
        raise SeedError(f"the ground truth has {len(classes)} class(es) {classes}; a labeling job needs at least 2")
    counts = np.bincount(y[y >= 0], minlength=len(classes))
    frac = n_gt / max(n, 1)
    problems = []
    if frac < config.min_seed_fraction:
        problems.append(
            f"ground truth is {n_gt} of {n} points ({frac:.1%}), below the {config.min_seed_fraction:.0%} minimum"
        )
    thin = {classes[i]: int(c) for i, c in enumerate(counts) if c < config.min_class_examples}
    if thin:
        problems.append(f"classes with fewer than {config.min_class_examples} ground-truth examples: {thin}")
    if counts.min() < 2:  # first: no override helps here, so the override is not what to suggest
        unusable = [classes[i] for i in np.flatnonzero(counts < 2)]
        raise SeedError(
            f"classes {unusable} have fewer than 2 ground-truth examples: they cannot be learned or calibrated, "
            "even with --allow-sparse-seed; label at least 2 of each, or take back a label that started a class "
            "by mistake (`embedstore label clear ID`)"
        )
    if problems and not config.allow_sparse_seed:
        raise SeedError(
            "; ".join(problems) + ". Pseudo-labels from so thin a seed are unreliable; label more points, "
            "or pass --allow-sparse-seed to run anyway (the override is recorded in the run)"
        )
    warnings.extend(f"overridden (--allow-sparse-seed): {p}" for p in problems)
    if thin:
        # The out-of-fold scores the calibration map is fitted on come from a chain that lacked that row's fold:
        # with 2 labels in a class it saw one of them, while the written probability averages chains that saw
        # both. So the map learns scores weaker than the written ones (BENCHMARKS.md, "Calibration against the
        # number of labels a class": 31 emoji subcategories, 27 with 2 labels, read 10.7 points under their
        # accuracy on the pool and 20.4 on unseen items; emoji, 4-16 labels a class, about 5; 20 or more, 1-3).
        warnings.append(
            f"{len(thin)} of {len(classes)} classes have fewer than {config.min_class_examples} ground-truth "
            "examples: the calibration is fitted on out-of-fold scores of models that saw even fewer of them, so "
            "the calibrated probabilities read low (measured with 2 labels a class: 10-20 points under their "
            "accuracy) and the gate accepts conservatively; a few more labels a class make them mean what they say"
        )
    return warnings


#: The loop's results version: bumped by a change that alters what the loop computes for the same input (not
#: by refactors, speed-ups or messages). Benchmarks record it per row and compare two runs of the loop (an
#: ablation against the full pipeline) only within one version. 2: models early-stop on the held-out rows the
#: other model scores, and binary XGBoost on log loss (f1c0599).
LOOP_VERSION = 2


# -------------------------------------------------------------- evaluation plan
@dataclass
class _Chain:
    """One self-training chain: the ground truth it may see, the ground truth it is judged on, its accepted set."""

    visible: np.ndarray  # bool (n,): GT rows whose labels this chain may use (targets and features)
    eval_rows: np.ndarray  # GT rows it scores (never visible to it)
    eval_half: np.ndarray  # (len(eval_rows),) which of the chain's two models scores each eval row
    pool_half: np.ndarray  # (n_pool,) which of the chain's two models scores each pool point
    acc_label: np.ndarray  # (n,) its accepted pseudo-labels, -1 = none
    acc_conf: np.ndarray  # (n,) their calibrated confidence
    draw: int = 0  # which drawing of the folds it belongs to (cv_repeats): each draw's chains partition the GT


def resolved_final_refit(config: LabelingConfig, eval_mode: str) -> float:
    """The final refit chain's share for a job in ``eval_mode`` (``cv`` or ``holdout``): ``auto`` is 0.5 in cv
    mode, where it was measured, and 0 in holdout mode (see ``LabelingConfig.final_refit``)."""
    if config.final_refit == "auto":
        return 0.5 if eval_mode == "cv" else 0.0
    return float(config.final_refit)


def _chains(
    y: np.ndarray, pool: np.ndarray, config: LabelingConfig, rng: np.random.Generator
) -> tuple[str, list[_Chain]]:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    gt = np.flatnonzero(y >= 0)
    counts = np.bincount(y[gt])
    counts = counts[counts > 0]
    mode = config.eval_mode
    n_eval = max(round(config.holdout_fraction * len(gt)), len(counts))
    if mode == "auto":
        small = counts.min() < config.cv_below_per_class or n_eval < config.min_holdout_rows
        mode = "cv" if small else "holdout"
    seed = int(rng.integers(2**31))
    if mode == "holdout":
        _, held = train_test_split(gt, test_size=n_eval, stratify=y[gt], random_state=seed)
        splits = [(0, np.sort(held))]
    else:
        # The number of folds is *not* capped by the thinnest class: a class with 2 labels and 4 folds has
        # them in two folds (every chain still sees at least one, as check_seed requires >= 2), while the cap
        # made every chain train on half the seed whenever one class had 2-3 labels. Measured (31 emoji
        # subcategories, 3 seeds, exact graph): test macro-F1 5% 0.574 -> 0.592, 10% 0.631 -> 0.653.
        k = min(config.cv_folds, int(counts.max()))
        draws = [seed] + [int(rng.integers(2**31)) for _ in range(config.cv_repeats - 1)]
        splits = []
        for d, draw in enumerate(draws):  # cv_repeats > 1: each draw partitions the ground truth again
            with warnings.catch_warnings():  # fewer members than folds in the thinnest class: intended, see above
                warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
                folds = list(StratifiedKFold(k, shuffle=True, random_state=draw).split(gt, y[gt]))
            splits += [(d, np.sort(gt[test])) for _, test in folds]
    chains = []
    for d, rows in splits:
        visible = y >= 0
        visible[rows] = False
        chains.append(
            _Chain(
                visible=visible,
                eval_rows=rows,
                eval_half=rng.permutation(np.arange(len(rows)) % 2),
                pool_half=rng.permutation(np.arange(len(pool)) % 2),
                acc_label=np.full(len(y), -1, np.int64),
                acc_conf=np.zeros(len(y), np.float32),
                draw=d,
            )
        )
    return mode, chains


# -------------------------------------------------------------------- engine
@dataclass
class _Snapshot:
    f1: float
    iteration: int
    decision: GateDecision
    probs: np.ndarray
    since: np.ndarray
    calibration: CalibrationResult
    eval_pred: np.ndarray
    models: list[list[Learner]] = field(default_factory=list)
    votes: list[np.ndarray] = field(default_factory=list)
    blend: tuple[float, ...] | None = None
    linear_models: list[list[Learner]] | None = None


BLEND_STEP = 0.1


def _simplex(k: int, steps: int) -> Iterator[tuple[int, ...]]:
    """Every way to split ``steps`` into ``k`` non-negative integers (the earlier parts largest first)."""
    if k == 1:
        yield (steps,)
        return
    for i in range(steps, -1, -1):
        for rest in _simplex(k - 1, steps - i):
            yield (i, *rest)


def blended(parts: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    out = np.zeros_like(parts[0], dtype=np.float64)
    for w, p in zip(weights, parts, strict=True):
        out += w * p
    return out


def choose_blend(parts: Sequence[np.ndarray], y: np.ndarray, *, seed: int = 0, resamples: int = 0) -> tuple[float, ...]:
    """Weights of ``parts`` (probability matrices for the same held-out rows, e.g. learner, linear model, label
    spreading) in their convex blend: the grid point (step 0.1) whose blend has the lowest cross-validated log
    loss after temperature scaling on held-out ground truth ``y``. Ties go to the earlier parts.

    ``resamples`` > 0 bags the choice: the grid point is chosen again on that many bootstrap resamples of the
    rows (the per-row losses are computed once) and the chosen weights are averaged. On a few dozen held-out
    rows the single arg-min jumps between corners of the simplex from one draw of the rows to the next."""
    steps = round(1 / BLEND_STEP)
    grid = [tuple(i / steps for i in ws) for ws in _simplex(len(parts), steps)]
    per_row = np.array(
        [row_log_loss(cross_calibrated("temperature", blended(parts, ws), y, seed=seed), y) for ws in grid]
    )

    def lowest(losses: Sequence[float]) -> tuple[float, ...]:  # ties go to the earlier parts
        best = min(losses)
        return max(ws for ws, loss in zip(grid, losses, strict=True) if loss <= best + 1e-9)

    if resamples <= 0:
        return lowest([float(r.mean()) for r in per_row])  # each exactly log_loss of its blend
    rng = np.random.default_rng(seed)
    total = np.zeros(len(parts))
    for _ in range(resamples):
        total += lowest(per_row[:, rng.integers(len(y), size=len(y))].mean(axis=1))
    return tuple(float(w) for w in total / resamples)


def paired_f1_se(
    a: np.ndarray, b: np.ndarray, y: np.ndarray, n_classes: int, *, n_boot: int = 200, seed: int = 0
) -> float:
    """Bootstrap standard error of macro-F1(a) - macro-F1(b) on the same held-out rows (paired resamples)."""
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(len(y), size=len(y))
        diffs[i] = macro_f1(a[idx], y[idx], n_classes) - macro_f1(b[idx], y[idx], n_classes)
    return float(diffs.std())


class SelfTrainer:
    """``SelfTrainer(config).run(data)``: the loop described in the module docstring."""

    def __init__(
        self,
        config: LabelingConfig | None = None,
        *,
        learner_factory: LearnerFactory | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config or LabelingConfig()
        self._factory = learner_factory
        self._progress = progress or (lambda event, data: None)

    def _learner(self, n_classes: int, seed: int, iteration: int) -> Learner:
        if self._factory is not None:
            return self._factory(n_classes, seed, iteration)
        return make_learner(self.config, n_classes, seed)

    def _features(
        self, data: LabelingInput, v: np.ndarray, prop: Propagation | None, spread_feature: np.ndarray | None
    ) -> np.ndarray:
        if self.config.neighbourhood_features and data.graph is not None:
            parts = [data.x, neighbourhood_features(data.graph, v)]
            if prop is not None:
                parts.append(prop.features(v))
            if spread_feature is not None:
                parts.append(spread_feature)
            return np.hstack(parts).astype(np.float32)
        return np.asarray(data.x, np.float32)

    def run(
        self, data: LabelingInput, *, gate_threshold: float | None = None, cap_factor: float = 1.0
    ) -> LabelingOutcome:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        c = len(data.classes)
        y = data.y
        gt = np.flatnonzero(y >= 0)
        pool = np.flatnonzero(y < 0)
        if len(pool) == 0:
            raise SeedError("every point already has ground truth: there is nothing to pseudo-label")
        mode, chains = _chains(y, pool, cfg, rng)
        priors = np.bincount(y[gt], minlength=c) / len(gt)
        threshold = cfg.threshold if gate_threshold is None else gate_threshold
        gate = StateGate(
            threshold=threshold,
            veto=cfg.neighbourhood_veto and data.graph is not None,
            veto_min_labelled=cfg.veto_min_labelled,
            veto_majority=cfg.veto_majority,
            cap_factor=cfg.cap_factor * cap_factor,
            review_count=cfg.review_count,
            uncertainty=cfg.uncertainty,
        )
        chain_gate = StateGate(
            threshold=gate.threshold,
            veto=gate.veto,
            veto_min_labelled=gate.veto_min_labelled,
            veto_majority=gate.veto_majority,
            cap_factor=gate.cap_factor,
        )
        truth_pool = None if data.truth is None else data.truth[pool]
        prop = None
        if cfg.neighbourhood_features and data.graph is not None and cfg.propagation_hops > 0:
            prop = Propagation(data.graph, hops=cfg.propagation_hops, alpha=cfg.propagation_alpha)
        spreading = None
        chain_gt_spread: list[np.ndarray] = []
        chain_spread_feature: list[np.ndarray] = []
        if cfg.neighbourhood_features and data.graph is not None and cfg.spreading:
            # ground truth only: spreading accepted pseudo-labels too was measured worse (emoji, 5%, 3 seeds:
            # test macro-F1 -2 to -6 points) - the gate accepts the easy points of the easy classes first,
            # and spreading is sensitive to that imbalance. Fixed for the job, so computed once.
            spreading = Spreading(data.graph, alpha=cfg.spreading_alpha)
            chain_gt_spread = [spreading.of_labels(np.where(ch.visible, y, -1), c) for ch in chains]
            if cfg.spreading_feature:
                # as a learner feature, cross-fitted: a ground-truth row's value comes from a spread that hid
                # its label (the (1 - alpha) y term would otherwise hand the learner the answer on its own rows)
                chain_spread_feature = [
                    spreading.cross_fitted(np.where(ch.visible, y, -1), c, folds=cfg.cv_folds, rng=rng, full=f)
                    for ch, f in zip(chains, chain_gt_spread, strict=True)
                ]
        # every ground-truth row scored out of sample, once: with cv_repeats > 1 the first draw's chains already
        # partition the ground truth, and a row's score is the mean over the draws (each from a chain that never
        # saw the row's label)
        n_draws = 1 + max(ch.draw for ch in chains)
        eval_all = np.concatenate([ch.eval_rows for ch in chains if ch.draw == 0])
        chain_c: list[float] = []
        if cfg.linear:
            # each chain picks its linear model's C on the ground truth it may see (never on its judged rows)
            chain_c = [
                cfg.linear_c or choose_linear_c(data.x[ch.visible], y[ch.visible], c, seed=cfg.seed) for ch in chains
            ]
        d_prefix = data.x.shape[1]
        prev_lin: dict[tuple[int, int], LinearLearner] = {}
        # the written decision's veto looks at the ground truth only: the same every iteration
        gt_dist = gt_count = None
        if gate.veto:
            gt_votes = votes(c, y, np.full(len(y), -1), np.zeros(len(y), np.float32), 0.0)
            gt_dist, gt_count, _ = neighbour_vote(data.graph, gt_votes, pool)  # type: ignore[arg-type]

        final_label = np.full(len(pool), -1, np.int64)  # the written (ensemble) accepted labels
        since = np.zeros(len(pool), np.int64)
        history: list[IterationStats] = []
        best: _Snapshot | None = None
        last: _Snapshot | None = None
        first_cal: CalibrationResult | None = None
        stop_reason = f"reached the cap of {cfg.max_iterations} iterations"
        tripped = False

        for it in range(1, cfg.max_iterations + 1):
            t_start = time.perf_counter()
            secs = {"features": 0.0, "fit": 0.0, "predict": 0.0}
            eval_raw = np.zeros((len(y), c))
            eval_spread = np.zeros((len(y), c))
            eval_lin = np.zeros((len(y), c))
            chain_pool_raw: list[np.ndarray] = []
            chain_pool_spread: list[np.ndarray] = []
            chain_pool_lin: list[np.ndarray] = []
            chain_lin: list[list[Learner]] = []
            chain_votes: list[np.ndarray] = []
            chain_models: list[list[Learner]] = []
            rounds: list[int] = []
            n_rows = n_pseudo_rows = n_mix_rows = 0
            for ci, ch in enumerate(chains):
                t0 = time.perf_counter()
                y_vis = np.where(ch.visible, y, -1)
                v = votes(c, y_vis, ch.acc_label, ch.acc_conf, cfg.pseudo_feature_weight)
                chain_votes.append(v)
                feats = self._features(data, v, prop, chain_spread_feature[ci] if chain_spread_feature else None)
                secs["features"] += time.perf_counter() - t0
                pool_raw = np.zeros((len(pool), c))
                pool_spread = np.zeros((len(pool), c))
                pool_lin = np.zeros((len(pool), c))
                chain_models.append([])
                chain_lin.append([])
                for half in (0, 1):
                    t0 = time.perf_counter()
                    ev = ch.eval_rows[ch.eval_half == half]
                    # Early stopping watches the held-out rows the *other* model scores: a model stopped on the
                    # rows it then scores chose its round count on their labels (on pure-noise labels its
                    # held-out log loss beat chance, ln 3, in 10 of 10 seeds), and those scores feed the
                    # calibration, the gate and the breaker.
                    stop = ch.eval_rows[ch.eval_half != half]
                    learner, lin, n_tr, n_pseudo, n_mix = self._fit_half(
                        feats,
                        y_vis,
                        ch,
                        pool,
                        half,
                        c,
                        rng,
                        learner=self._learner(c, cfg.seed * 100_003 + it * 101 + ci * 2 + half, it),
                        eval_set=(feats[stop], y[stop]),
                        d_prefix=d_prefix,
                        linear_c=chain_c[ci] if chain_c else None,
                        warm_from=prev_lin.get((ci, half)),
                    )
                    chain_models[-1].append(learner)
                    rounds.append(int(getattr(learner, "best_rounds_", 0) or 0))
                    if lin is not None:
                        prev_lin[ci, half] = lin
                        chain_lin[-1].append(lin)
                    secs["fit"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    eval_raw[ev] += learner.predict_proba(feats[ev]) / n_draws
                    mine = ch.pool_half == half
                    pool_raw[mine] = learner.predict_proba(feats[pool[mine]])
                    if chain_c:
                        eval_lin[ev] += lin.predict_proba(data.x[ev]) / n_draws
                        pool_lin[mine] = lin.predict_proba(data.x[pool[mine]])
                    if chain_gt_spread:
                        eval_spread[ev] += chain_gt_spread[ci][ev] / n_draws
                        pool_spread[mine] = chain_gt_spread[ci][pool[mine]]
                    secs["predict"] += time.perf_counter() - t0
                    n_rows += n_tr
                    n_pseudo_rows += n_pseudo
                    n_mix_rows += n_mix
                    self._progress("model", {"iteration": it, "model": 2 * ci + half + 1, "models": 2 * len(chains)})
                chain_pool_raw.append(pool_raw)
                chain_pool_spread.append(pool_spread)
                chain_pool_lin.append(pool_lin)

            t0 = time.perf_counter()
            blend: tuple[float, ...] | None = None
            names = ["learner"]
            eval_parts, pool_parts = [eval_raw], [chain_pool_raw]
            if chain_c:
                names.append("linear")
                eval_parts.append(eval_lin)
                pool_parts.append(chain_pool_lin)
            if spreading is not None:
                names.append("spreading")
                eval_parts.append(eval_spread)
                pool_parts.append(chain_pool_spread)
            if len(eval_parts) > 1:
                blend = choose_blend(
                    [e[eval_all] for e in eval_parts], y[eval_all], seed=cfg.seed + it, resamples=cfg.blend_resamples
                )
                eval_raw = blended(eval_parts, blend)
                # each chain blends its own parts (its spread is of the ground truth *it* may see), on the pool
                # exactly as on its held-out rows: the calibrator is fitted on the very kind of score it maps
                chain_pool_raw = [blended([part[ci] for part in pool_parts], blend) for ci in range(len(chains))]
            blend_w = None if blend is None else blend[0]
            blend_named = None if blend is None else dict(zip(names, blend, strict=True))
            cal = calibrate(
                eval_raw[eval_all],
                y[eval_all],
                c,
                cfg.calibration,
                bins=cfg.calibration_bins,
                seed=cfg.seed + it,
                min_per_class=cfg.calibration_ovr_min_per_class,
            )
            first_cal = first_cal or cal
            chain_pool_cal = [cal.calibrator.transform(p) for p in chain_pool_raw]
            # the written probability: the chains' calibrated scores averaged (in cv mode every ground-truth
            # label reaches it through the chains that saw it)
            pool_cal = np.mean(chain_pool_cal, axis=0)
            secs["calibrate"] = time.perf_counter() - t0
            f1 = cal.after.macro_f1

            eval_pred = cal.oof_calibrated.argmax(axis=1)
            margin = cfg.breaker_tolerance
            if best is not None and cfg.breaker_z > 0:
                se = paired_f1_se(best.eval_pred, eval_pred, y[eval_all], c, seed=cfg.seed + it)
                margin = max(margin, cfg.breaker_z * se)
            if cfg.breaker and best is not None and f1 < best.f1 - margin:
                tripped = True
                stop_reason = (
                    f"collapse breaker: held-out macro-F1 fell to {f1:.3f} at iteration {it}, more than "
                    f"{margin:.3f} below the best ({best.f1:.3f} at iteration {best.iteration}); "
                    f"rolled back to iteration {best.iteration}"
                )
                secs["total"] = time.perf_counter() - t_start
                stats = self._stats(it, cal, None, None, data, truth_pool, rounds, secs, (0, 0, 0))
                stats.blend_weight, stats.blend_weights = blend_w, blend_named
                stats.breaker = True
                history.append(stats)
                self._progress("iteration", {"stats": stats, "breaker": True})
                break

            t0 = time.perf_counter()
            it_gate, it_chain_gate, evidence = gate, chain_gate, None
            if cfg.validate_threshold:
                t_used, evidence = validated_threshold(
                    cal.oof_calibrated, y[eval_all], gate.threshold, min_support=cfg.threshold_min_support
                )
                shut = bool(evidence.get("closed"))
                it_gate = dataclasses.replace(gate, threshold=t_used, closed=shut)
                it_chain_gate = dataclasses.replace(chain_gate, threshold=t_used, closed=shut)
            # each chain moves on with its own accepted set (no chain ever learns from labels it is judged on)
            for ch, v, p in zip(chains, chain_votes, chain_pool_cal, strict=True):
                d, cnt, _ = neighbour_vote(data.graph, v, pool) if gate.veto else (None, None, None)  # type: ignore[arg-type]
                cd = it_chain_gate.decide(p, priors, d, cnt)
                ok = cd.status == ACCEPTED
                ch.acc_label[pool] = np.where(ok, cd.label, -1)
                ch.acc_conf[pool] = np.where(ok, cd.confidence, 0.0)
            # the written decision: the chains' mean calibrated probability, gated against all the ground truth
            dec = it_gate.decide(pool_cal, priors, gt_dist, gt_count)
            secs["gate"] = time.perf_counter() - t0
            old = final_label
            new = np.where(dec.status == ACCEPTED, dec.label, -1)
            moves = (
                int(((old >= 0) & (new < 0)).sum()),  # revoked
                int(((old >= 0) & (new >= 0) & (old != new)).sum()),  # relabelled
                int(((old < 0) & (new >= 0)).sum()),  # newly accepted
            )
            changed = int((old != new).sum())
            since = np.where(new >= 0, np.where(old == new, since, it), 0)
            final_label = new
            secs["total"] = time.perf_counter() - t_start
            stats = self._stats(it, cal, dec, new, data, truth_pool, rounds, secs, moves)
            stats.train_rows, stats.train_pseudo, stats.mixup_rows = n_rows, n_pseudo_rows, n_mix_rows
            stats.blend_weight, stats.blend_weights = blend_w, blend_named
            stats.gate_threshold = it_gate.threshold
            stats.threshold_evidence = evidence
            stats.change = changed / max(1, int((new >= 0).sum()), int((old >= 0).sum()))
            history.append(stats)
            self._progress("iteration", {"stats": stats, "breaker": False})
            last = _Snapshot(
                f1,
                it,
                dec,
                pool_cal,
                since.copy(),
                cal,
                eval_pred,
                chain_models,
                chain_votes,
                blend,
                chain_lin if chain_c else None,
            )
            if best is None or f1 > best.f1:
                best = last
            if it > 1 and stats.change <= cfg.stop_change:
                stop_reason = f"converged: the accepted set changed by {stats.change:.2%} (<= {cfg.stop_change:.2%})"
                break

        assert best is not None and last is not None and first_cal is not None
        out = best if tripped else last
        predictor = Predictor(  # lists of its own: a refit chain is appended to them, not to the snapshot's
            list(out.models),
            list(out.votes),
            out.calibration.calibrator,
            self.config.neighbourhood_features and data.graph is not None,
            c,
            prop,
            chain_spread=list(chain_gt_spread) or None,
            spread_feature=bool(chain_spread_feature),
            blend=out.blend,
            linear_models=None if out.linear_models is None else list(out.linear_models),
        )
        refit = resolved_final_refit(cfg, mode)
        if refit > 0:
            self._refit_all(predictor, data, pool, out, history[out.iteration - 1].best_rounds, spreading, prop, refit)
        return LabelingOutcome(
            pool=pool,
            decision=out.decision,
            probs=out.probs,
            since=out.since,
            iterations=history,
            chosen_iteration=out.iteration,
            stop_reason=stop_reason,
            breaker_tripped=tripped,
            eval_mode=mode,
            n_models=2 * len(chains),
            final_refit=refit,
            gate_threshold=threshold,
            calibration=out.calibration,
            first_calibration=first_cal,
            eval_rows=eval_all,
            predictor=predictor,
        )

    def _refit_all(
        self,
        predictor: Predictor,
        data: LabelingInput,
        pool: np.ndarray,
        out: _Snapshot,
        rounds: list[int],
        spreading: Spreading | None,
        prop: Propagation | None,
        share: float,
    ) -> None:
        """Add to ``predictor`` one chain that sees all the ground truth and the written accepted labels
        (``share`` of a new point's probability). Its two models split the pool in halves like every chain's."""
        cfg = self.config
        c, y = len(data.classes), data.y
        rng = np.random.default_rng(cfg.seed + 7919)  # its own stream: the loop's draws stay as they were
        ok = out.decision.status == ACCEPTED
        chain = _Chain(
            visible=y >= 0,
            eval_rows=np.zeros(0, np.int64),
            eval_half=np.zeros(0, np.int64),
            pool_half=rng.permutation(np.arange(len(pool)) % 2),
            acc_label=np.full(len(y), -1, np.int64),
            acc_conf=np.zeros(len(y), np.float32),
        )
        chain.acc_label[pool] = np.where(ok, out.decision.label, -1)
        chain.acc_conf[pool] = np.where(ok, out.decision.confidence, 0.0)
        spread = spread_feature = None
        if spreading is not None:
            spread = spreading.of_labels(y, c)
            if cfg.spreading_feature:
                spread_feature = spreading.cross_fitted(y, c, folds=cfg.cv_folds, rng=rng, full=spread)
        v = votes(c, y, chain.acc_label, chain.acc_conf, cfg.pseudo_feature_weight)
        feats = self._features(data, v, prop, spread_feature)
        linear_c = None
        if predictor.linear_models is not None:
            linear_c = cfg.linear_c or choose_linear_c(data.x[y >= 0], y[y >= 0], c, seed=cfg.seed)
        models, lins = [], []
        for half in (0, 1):
            learner = self._learner(c, cfg.seed * 100_003 + 99_991 + half, cfg.max_iterations + 1)
            if isinstance(learner, XGBoostLearner) and rounds:
                # no held-out rows to stop on: the written iteration's median round count
                learner.params = learner.params.model_copy(update={"max_rounds": max(1, int(np.median(rounds)))})
            learner, lin, *_ = self._fit_half(
                feats,
                y,
                chain,
                pool,
                half,
                c,
                rng,
                learner=learner,
                eval_set=None,
                d_prefix=data.x.shape[1],
                linear_c=linear_c,
            )
            models.append(learner)
            if lin is not None:
                lins.append(lin)
        k = len(predictor.models)
        predictor.models.append(models)
        predictor.votes.append(v)
        if predictor.linear_models is not None:
            predictor.linear_models.append(lins)
        if predictor.chain_spread is not None and spread is not None:
            predictor.chain_spread.append(spread)
        predictor.chain_weights = [(1 - share) / k] * k + [share]

    def _fit_half(
        self,
        feats: np.ndarray,
        y_vis: np.ndarray,
        chain: _Chain,
        pool: np.ndarray,
        half: int,
        c: int,
        rng: np.random.Generator,
        *,
        learner: Learner,
        eval_set: tuple[np.ndarray, np.ndarray] | None,
        d_prefix: int,
        linear_c: float | None,
        warm_from: LinearLearner | None = None,
    ) -> tuple[Learner, LinearLearner | None, int, int, int]:
        """Fit one of a chain's two models (and its linear partner): the ground truth the chain may see, the
        pseudo-labels of the *other* pool half, Mixup rows. Returns (learner, linear, rows, pseudo rows, Mixup rows)."""
        cfg = self.config
        # this model never trains on the pseudo-labels of the pool half it scores
        xs, ys, ws = self._training_set(feats, y_vis, chain, pool, chain.pool_half != half, c, rng)
        x_tr, y_tr, w_tr = np.vstack(xs), np.vstack(ys), np.concatenate(ws)
        n_pseudo = len(xs[1])
        n_mix = 0
        if cfg.mixup and n_pseudo > 0:
            mx, my, mw = mixup(
                xs[1], ys[1], ws[1], x_tr, y_tr, w_tr, alpha=cfg.mixup_alpha, fraction=cfg.mixup_fraction, rng=rng
            )
            n_mix = len(mx)
            x_tr, y_tr, w_tr = np.vstack([x_tr, mx]), np.vstack([y_tr, my]), np.concatenate([w_tr, mw])
        learner.fit(x_tr, y_tr, w_tr, eval_set=eval_set)
        lin = None
        if linear_c is not None:
            # the same rows, weights and Mixup rows, on the prefix columns only (feats starts with x)
            lin = LinearLearner(c, c=linear_c, warm_from=warm_from)
            lin.fit(x_tr[:, :d_prefix], y_tr, w_tr)
        return learner, lin, len(x_tr), n_pseudo, n_mix

    def _training_set(
        self,
        feats: np.ndarray,
        y_vis: np.ndarray,
        chain: _Chain,
        pool: np.ndarray,
        pool_mask: np.ndarray,
        c: int,
        rng: np.random.Generator,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """[GT rows, pseudo rows]: features, one-hot targets, weights (class-balanced when configured)."""
        gt_rows = np.flatnonzero(y_vis >= 0)
        ps_rows = pool[pool_mask]
        ps_rows = ps_rows[chain.acc_label[ps_rows] >= 0]
        if len(ps_rows) > self.config.max_pseudo_train:
            ps_rows = np.sort(rng.choice(ps_rows, self.config.max_pseudo_train, replace=False))
        eye = np.eye(c, dtype=np.float32)
        y_gt = eye[y_vis[gt_rows]]
        y_ps = eye[chain.acc_label[ps_rows]]
        w_gt = np.ones(len(gt_rows), np.float32)
        w_ps = chain.acc_conf[ps_rows].astype(np.float32)
        if self.config.balance_classes:
            mass = y_gt.sum(axis=0) + (y_ps * w_ps[:, None]).sum(axis=0)
            cw = np.divide(mass.sum(), c * mass, out=np.ones_like(mass), where=mass > 0)
            w_gt = w_gt * cw[y_vis[gt_rows]]
            w_ps = w_ps * cw[chain.acc_label[ps_rows]]
        return [feats[gt_rows], feats[ps_rows]], [y_gt, y_ps], [w_gt, w_ps]

    def _stats(
        self,
        it: int,
        cal: CalibrationResult,
        dec: GateDecision | None,
        new: np.ndarray | None,
        data: LabelingInput,
        truth_pool: np.ndarray | None,
        rounds: list[int],
        secs: dict[str, float],
        moves: tuple[int, int, int],
    ) -> IterationStats:
        precision = mean_conf = None
        by_class: dict[str, int] = {}
        counts: dict[str, int] = dict.fromkeys(STATUS_NAMES, 0)
        reasons: dict[str, int] = {}
        if dec is not None and new is not None:
            acc = new >= 0
            counts = dec.counts()
            reasons = dec.reasons()
            by_class = {data.classes[k]: int((new == k).sum()) for k in range(len(data.classes))}
            if acc.any():
                mean_conf = float(dec.confidence[acc].mean())
                if truth_pool is not None:
                    known = acc & (truth_pool != -1)
                    if known.any():
                        precision = float((new[known] == truth_pool[known]).mean())
        return IterationStats(
            iteration=it,
            heldout_before=cal.before,
            heldout_after=cal.after,
            calibration_method=cal.method,
            calibration_cv_log_loss=cal.cv_log_loss,
            train_rows=0,
            train_pseudo=0,
            mixup_rows=0,
            counts=counts,
            quarantine_reasons=reasons,
            accepted_by_class=by_class,
            newly_accepted=moves[2],
            revoked=moves[0],
            relabelled=moves[1],
            change=0.0,
            mean_accepted_confidence=mean_conf,
            pseudo_precision=precision,
            best_rounds=rounds,
            seconds={k: round(v, 3) for k, v in secs.items()},
        )
