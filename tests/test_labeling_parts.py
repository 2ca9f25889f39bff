"""The labeling job's parts on arrays: calibration, gate, features, Mixup, learners, guards, drift, loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydantic import ValidationError

from labeling.calibration import OneVsRestCalibrator, TemperatureCalibrator, brier, calibrate, ece, macro_f1
from labeling.config import ForestParams, LabelingConfig, XGBoostParams
from labeling.drift import c2st
from labeling.errors import SeedError
from labeling.gate import ACCEPTED, QUARANTINED, REVIEW, StateGate
from labeling.learners import LinearLearner, RandomForestLearner, XGBoostLearner, expand_soft
from labeling.mixup import mixup
from labeling.neighbours import NeighbourGraph, Spreading, neighbour_vote, neighbourhood_features, votes
from labeling.selftrain import LabelingInput, SelfTrainer, check_seed, choose_blend
from retrieval.synthetic import clustered_vectors


def _overconfident(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True class probabilities p, reported as softmax(3 log p): sharply overconfident scores."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 1.2
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in p])
    sharp = np.exp(3 * np.log(p))
    return sharp / sharp.sum(axis=1, keepdims=True), y


# ------------------------------------------------------------- calibration
def test_ece_is_zero_for_calibrated_scores_and_large_for_overconfident_ones():
    rng = np.random.default_rng(0)
    p1 = rng.uniform(size=20_000)
    y = (rng.uniform(size=p1.size) < p1).astype(int)
    probs = np.column_stack([1 - p1, p1])
    assert ece(probs, y) < 0.02
    sharp, y2 = _overconfident(3000, 4)
    assert ece(sharp, y2) > 0.1
    assert brier(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2])) == 0.0


@pytest.mark.parametrize("method", ["auto", "temperature", "platt", "beta", "isotonic"])
def test_calibration_lowers_held_out_ece_of_overconfident_scores(method):
    probs, y = _overconfident(2000, 4, seed=1)
    res = calibrate(probs, y, 4, method)
    assert res.method == (res.method if method == "auto" else method)
    assert res.after.ece < res.before.ece / 2  # 'after' is out-of-fold: judged on rows the map never saw
    assert res.after.log_loss < res.before.log_loss
    assert sum(res.reliability_after.count) == 2000


@pytest.mark.parametrize("method", ["auto", "platt", "beta", "isotonic"])
@pytest.mark.parametrize("c", [2, 3])
def test_constant_scores_calibrate_to_the_outcome_rate(method, c):
    """A learner that separated nothing gives one score to every row: betacal fitted on it kept a map its own
    predict could not apply, and the job died under the default calibration ("X has 1 features")."""
    y = np.arange(120) % c
    y[:10] = 0  # class 0 a little more frequent
    probs = np.tile([0.3, 0.7] if c == 2 else [0.2, 0.1, 0.7], (120, 1))  # 1/c each did not trip betacal
    res = calibrate(probs, y, c, method)
    out = res.calibrator.transform(probs)
    assert np.allclose(out.sum(axis=1), 1.0) and np.all(np.isfinite(out))
    assert np.allclose(out, out[0])  # one score in, one probability out
    # the case that broke betacal: one score, the two outcomes equally often (its map came out [0, 0, m])
    half = np.column_stack([np.full(50, 0.3), np.full(50, 0.7)])
    fitted = OneVsRestCalibrator("beta").fit(half, np.r_[np.zeros(25, int), np.ones(25, int)])
    assert np.allclose(fitted.transform(half)[:, 1], 0.5)


def test_temperature_recovers_the_sharpening_and_auto_never_beats_cv_loss():
    probs, y = _overconfident(4000, 5, seed=2)
    t = TemperatureCalibrator().fit(probs, y).temperature_
    assert 2.3 < t < 3.7  # the scores were softmax(3 log p)
    res = calibrate(probs, y, 5, "auto")
    assert res.cv_log_loss[res.method] == min(res.cv_log_loss.values())
    with pytest.raises(ValueError, match="unknown calibration"):
        calibrate(probs, y, 5, "magic")


def test_auto_offers_one_vs_rest_maps_only_when_every_class_has_enough_rows():
    probs, y = _overconfident(2000, 4, seed=3)
    assert {"platt", "beta", "isotonic"} <= set(calibrate(probs, y, 4, "auto", min_per_class=10).cv_log_loss)
    # 31 classes with 3 held-out rows each: a per-class map would be fitted on 3 positives
    few, yf = _overconfident(93, 31, seed=4)
    res = calibrate(few, yf, 31, "auto", min_per_class=10)
    assert set(res.cv_log_loss) == {"none", "temperature"} and res.method in ("none", "temperature")
    # a class with no held-out rows at all counts as thin
    res = calibrate(probs, y, 5, "auto", min_per_class=1)
    assert set(res.cv_log_loss) == {"none", "temperature"}
    # asked for by name, a one-vs-rest map is still used
    assert calibrate(few, yf, 31, "platt", min_per_class=10).method == "platt"


# -------------------------------------------------------------------- gate
def test_gate_accepts_only_at_or_above_threshold_vetoes_contradicted_and_caps_classes():
    probs = np.array(
        [
            [0.95, 0.05],  # accepted
            [0.79, 0.21],  # below threshold
            [0.90, 0.10],  # contradicted by its neighbours
            [0.85, 0.15],  # over class 0's cap
            [0.10, 0.90],  # accepted
            [0.50, 0.50],  # most uncertain -> review
        ]
    )
    dist = np.array([[1, 0], [0, 0], [0.2, 0.8], [1, 0], [0, 1], [0, 0]], float)
    count = np.array([3, 0, 4, 2, 2, 0])
    gate = StateGate(threshold=0.8, cap_factor=1.0, review_count=1)
    dec = gate.decide(probs, np.array([0.3, 0.7]), dist, count)  # class 0 cap = ceil(0.3 * 6) = 2
    assert list(dec.status) == [ACCEPTED, QUARANTINED, QUARANTINED, ACCEPTED, ACCEPTED, REVIEW]
    dec = StateGate(threshold=0.8, cap_factor=0.5).decide(probs, np.array([0.3, 0.7]), dist, count)  # cap 1
    assert list(dec.status[[0, 3]]) == [ACCEPTED, QUARANTINED]  # the more confident one wins the cap
    assert dec.reasons() == {"below_threshold": 2, "neighbourhood_veto": 1, "class_cap": 1}
    assert (dec.confidence[dec.status == ACCEPTED] >= 0.8).all()


# ------------------------------------------------------ neighbourhood features
def test_a_points_own_label_never_feeds_its_own_features():
    x, _ = clustered_vectors(300, n_clusters=3, seed=0)
    g = NeighbourGraph.exact(x, 8)
    assert not (g.index == np.arange(300)[:, None]).any()
    y = np.full(300, -1)
    y[::5] = np.arange(60) % 3
    base = neighbourhood_features(g, votes(3, y, np.full(300, -1), np.zeros(300, np.float32), 0.5))
    flipped = y.copy()
    flipped[0] = (y[0] + 1) % 3
    after = neighbourhood_features(g, votes(3, flipped, np.full(300, -1), np.zeros(300, np.float32), 0.5))
    assert np.array_equal(base[0], after[0])  # its own features did not move
    users = np.flatnonzero((g.index == 0).any(axis=1))
    assert len(users) and not np.array_equal(base[users], after[users])  # its neighbours' did


def test_pseudo_labels_vote_with_less_weight_than_ground_truth():
    g = NeighbourGraph(np.array([[1, 2], [0, 2], [0, 1]], np.int32), np.ones((3, 2), np.float32))
    v = votes(2, np.array([-1, 0, -1]), np.array([-1, -1, 1]), np.array([0, 0, 0.9], np.float32), 0.5)
    f = neighbourhood_features(g, v)
    share = f[0, :2]
    assert share[0] == pytest.approx(1 / 1.45) and share[1] == pytest.approx(0.45 / 1.45)
    _dist, count, majority = neighbour_vote(g, v, np.array([0]))
    assert count[0] == 2 and majority[0] in (0, 1)


# ------------------------------------------------------------------- Mixup
def test_mixup_rows_are_convex_and_stay_closest_to_their_pseudo_parent():
    rng = np.random.default_rng(0)
    xp, yp, wp = rng.normal(size=(50, 4)).astype(np.float32), np.eye(3)[rng.integers(3, size=50)], np.ones(50)
    xa, ya, wa = rng.normal(size=(80, 4)).astype(np.float32), np.eye(3)[rng.integers(3, size=80)], np.ones(80)
    x, y, w = mixup(xp, yp, wp, xa, ya, wa, alpha=0.4, fraction=1.0, rng=rng)
    assert x.shape == (50, 4) and np.allclose(y.sum(axis=1), 1.0) and (y >= 0).all()
    assert (y.max(axis=1) >= 0.5 - 1e-9).all()
    xe, _ye, we = expand_soft(x, y, w)  # multiclass form: weighted duplicated rows
    assert len(xe) >= 50 and np.isclose(we.sum(), w.sum())


# ----------------------------------------------------------------- learners
def test_xgboost_learns_binary_soft_labels_and_checks_monotone_constraints():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    p = 1 / (1 + np.exp(-3 * x[:, 0]))
    y = np.column_stack([1 - p, p])  # soft targets only
    m = XGBoostLearner(2, XGBoostParams(max_rounds=60), seed=0).fit(x, y, np.ones(400))
    pred = m.predict_proba(x)[:, 1]
    assert np.corrcoef(pred, p)[0, 1] > 0.9
    mono = XGBoostLearner(2, XGBoostParams(max_rounds=30, monotone_constraints={0: 1}), seed=0).fit(x, y, np.ones(400))
    grid = np.column_stack([np.linspace(-3, 3, 50), np.zeros(50), np.zeros(50)]).astype(np.float32)
    assert (np.diff(mono.predict_proba(grid)[:, 1]) >= -1e-7).all()
    with pytest.raises(ValueError, match="outside"):
        XGBoostLearner(2, XGBoostParams(monotone_constraints={7: 1})).fit(x, y, np.ones(400))


def test_random_forest_keeps_every_class_column():
    x = np.arange(20, dtype=np.float32)[:, None]
    y = np.eye(3)[np.r_[np.zeros(10, int), np.ones(10, int)]]  # class 2 never seen
    p = RandomForestLearner(3).fit(x, y, np.ones(20)).predict_proba(x)
    assert p.shape == (20, 3) and (p[:, 2] == 0).all()


# ------------------------------------------------------------------ guards
def test_config_caps_iterations_at_ten_and_refuses_unknown_keys():
    with pytest.raises(ValidationError, match="capped at 10"):
        LabelingConfig(max_iterations=11)
    with pytest.raises(ValidationError):
        LabelingConfig(treshold=0.8)  # typo: refused, not ignored


def test_seed_guard_refuses_a_three_percent_seed_and_the_override_is_recorded():
    y = np.full(1000, -1)
    y[:30] = np.arange(30) % 2
    with pytest.raises(SeedError, match=r"30 of 1000 points \(3.0%\), below the 5% minimum"):
        check_seed(y, ["a", "b"], LabelingConfig())
    warnings = check_seed(y, ["a", "b"], LabelingConfig(allow_sparse_seed=True))
    assert warnings and "overridden" in warnings[0]
    assert not any("read low" in w for w in warnings)  # every class has 15 labels: no thin-class warning
    y[:30] = -1
    y[:4], y[4:14] = 0, 1  # 4 of "a", 10 of "b": "a" is thin, and its probabilities read low
    warnings = check_seed(y, ["a", "b"], LabelingConfig(allow_sparse_seed=True))
    assert any("1 of 2 classes have fewer than 5" in w and "read low" in w for w in warnings), warnings
    y[:30] = 0
    y[0] = 1
    with pytest.raises(SeedError, match="fewer than 2"):
        check_seed(y, ["a", "b"], LabelingConfig(allow_sparse_seed=True))
    with pytest.raises(SeedError, match="fewer than 2") as err:  # without the override: not suggested, as
        check_seed(y, ["a", "b"], LabelingConfig())  # it would not help
    assert "even with --allow-sparse-seed" in str(err.value) and "or pass --allow-sparse-seed" not in str(err.value)


def test_drift_test_sees_a_shifted_seed_and_not_a_random_one():
    x, cl = clustered_vectors(3000, n_clusters=6, seed=1)
    rng = np.random.default_rng(0)
    random_seed = rng.permutation(3000)[:300]
    mask = np.zeros(3000, bool)
    mask[random_seed] = True
    calm = c2st(x[mask], x[~mask])
    assert not calm.drifted and abs(calm.auc - 0.5) < 0.08
    biased = np.flatnonzero(cl < 2)[:300]  # the seed covers 2 of 6 regions
    mask = np.zeros(3000, bool)
    mask[biased] = True
    shifted = c2st(x[mask], x[~mask])
    assert shifted.drifted and shifted.auc > 0.8


# -------------------------------------------------------------------- loop
def _toy(n: int = 900, seed: int = 0, frac: float = 0.1):
    x, cl = clustered_vectors(n, n_clusters=3, seed=seed, spread=0.9)
    y = np.full(n, -1)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)[: int(frac * n)]
    y[idx] = cl[idx]
    xp = x[:, :64] / np.linalg.norm(x[:, :64], axis=1, keepdims=True)
    return LabelingInput(xp.astype(np.float32), y, ["a", "b", "c"], NeighbourGraph.exact(x, 10), cl)


@pytest.mark.parametrize("linear", [True, False])
def test_new_points_are_scored_by_the_same_blend_with_or_without_the_linear_part(linear):
    data = _toy(600, seed=3)
    cfg = LabelingConfig(max_iterations=2, review_count=0, linear=linear, xgboost={"max_rounds": 40})
    out = SelfTrainer(cfg).run(data)
    weights = out.iterations[-1].blend_weights
    assert weights is not None and ("linear" in weights) == linear and abs(sum(weights.values()) - 1) < 1e-9
    assert (out.predictor.linear_models is not None) == linear
    # the pool's own points, as if new: neighbours among the snapshot (itself dropped), the written path
    rows = out.pool[:50]
    index, sims = data.graph.index[rows], data.graph.sims[rows]
    p = out.predictor.predict_proba(data.x[rows], index, sims)
    assert np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1.0)
    truth = data.truth[rows]
    assert (p.argmax(axis=1) == truth).mean() > 0.8


def test_a_final_refit_adds_one_chain_on_all_the_ground_truth_and_leaves_the_pool_alone():
    data = _toy(600, seed=3)
    base = {"max_iterations": 2, "review_count": 0, "xgboost": {"max_rounds": 40}}
    plain = SelfTrainer(LabelingConfig(**base, final_refit=0.0)).run(data)
    out = SelfTrainer(LabelingConfig(**base, final_refit=0.5)).run(data)
    assert out.final_refit == 0.5 and plain.final_refit == 0.0
    # the written pool labels and probabilities do not use it
    np.testing.assert_array_equal(out.probs, plain.probs)
    np.testing.assert_array_equal(out.decision.status, plain.decision.status)
    k = len(plain.predictor.models)
    assert len(out.predictor.models) == k + 1 and len(out.predictor.linear_models) == k + 1
    assert out.predictor.chain_weights == pytest.approx([0.5 / k] * k + [0.5])
    gt = np.flatnonzero(data.y >= 0)
    v = out.predictor.votes[-1]
    np.testing.assert_array_equal(v[gt].argmax(axis=1), data.y[gt])  # every ground-truth label, as a vote
    assert np.allclose(v[gt].max(axis=1), 1.0)
    rounds = out.iterations[out.chosen_iteration - 1].best_rounds
    assert [m.best_rounds_ for m in out.predictor.models[-1]] == [int(np.median(rounds))] * 2
    rows = out.pool[:60]
    index, sims = data.graph.index[rows], data.graph.sims[rows]
    p = out.predictor.predict_proba(data.x[rows], index, sims)
    p_chains = plain.predictor.predict_proba(data.x[rows], index, sims)
    out.predictor.chain_weights = [0.0] * k + [1.0]
    p_refit = out.predictor.predict_proba(data.x[rows], index, sims)
    np.testing.assert_allclose(p, 0.5 * p_chains + 0.5 * p_refit, atol=1e-12)
    assert np.allclose(p_refit.sum(axis=1), 1.0) and not np.array_equal(p_refit, p_chains)
    assert (p_refit.argmax(axis=1) == data.truth[rows]).mean() > 0.8


def test_the_final_refit_defaults_to_half_in_cv_mode_and_off_in_holdout_mode():
    data = _toy(600, seed=3)
    base = {"max_iterations": 1, "review_count": 0, "xgboost": {"max_rounds": 20}, "holdout_fraction": 0.3}
    assert LabelingConfig().final_refit == "auto"
    cv = SelfTrainer(LabelingConfig(**base, eval_mode="cv")).run(data)
    held = SelfTrainer(LabelingConfig(**base, eval_mode="holdout")).run(data)
    assert (cv.final_refit, held.final_refit) == (0.5, 0.0)
    k = len(cv.predictor.models) - 1  # the loop's chains, then the refit's
    assert k == LabelingConfig().cv_folds and cv.predictor.chain_weights == pytest.approx([0.5 / k] * k + [0.5])
    assert len(held.predictor.models) == 1 and held.predictor.chain_weights is None
    # a number applies in either mode
    forced = SelfTrainer(LabelingConfig(**base, eval_mode="holdout", final_refit=0.3)).run(data)
    assert forced.final_refit == 0.3 and forced.predictor.chain_weights == pytest.approx([0.7, 0.3])
    np.testing.assert_array_equal(forced.probs, held.probs)  # the pool's written probabilities never use it
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(ValidationError, match="final_refit"):
            LabelingConfig(final_refit=bad)


def test_the_loop_never_runs_more_than_ten_iterations():
    cfg = LabelingConfig(learner="random_forest", forest={"n_estimators": 15}, stop_change=0.0, breaker=False)
    out = SelfTrainer(cfg).run(_toy())
    assert 1 <= len(out.iterations) <= 10
    assert len(out.iterations) == 10 or out.stop_reason.startswith("converged")


class _Degrading:
    """A real XGBoost learner that, from iteration ``bad_from`` on, is fitted on shuffled targets."""

    name = "degrading"

    def __init__(self, n_classes: int, seed: int, iteration: int, bad_from: int) -> None:
        self.inner = XGBoostLearner(n_classes, XGBoostParams(max_rounds=40), seed=seed)
        self.bad = iteration >= bad_from
        self.rng = np.random.default_rng(seed)
        self.n_classes = n_classes

    def fit(self, x, y, w, eval_set=None):
        if self.bad:
            y = y[self.rng.permutation(len(y))]
        self.inner.fit(x, y, w, eval_set)
        return self

    def predict_proba(self, x):
        return self.inner.predict_proba(x)


class _Spy:
    """A real XGBoost learner that records the rows it early-stopped on and the rows it scored."""

    name = "spy"

    def __init__(self, n_classes: int, seed: int, seen: list) -> None:
        self.inner = XGBoostLearner(n_classes, XGBoostParams(max_rounds=30), seed=seed)
        self.n_classes = n_classes
        self.record = {"stopped_on": set(), "scored": set()}
        seen.append(self.record)

    def fit(self, x, y, w, eval_set=None):
        assert eval_set is None or len(eval_set[1]) > 0
        self.record["stopped_on"] = set() if eval_set is None else {r.tobytes() for r in eval_set[0]}
        self.inner.fit(x, y, w, eval_set)
        return self

    def predict_proba(self, x):
        self.record["scored"] |= {r.tobytes() for r in x}
        return self.inner.predict_proba(x)


@pytest.mark.parametrize("eval_mode", ["cv", "holdout"])
def test_no_model_scores_a_row_it_early_stopped_on(eval_mode):
    """Every held-out score feeds the calibration, the gate and the breaker: the model giving it must not have
    chosen its round count on that row's label (it did: each model early-stopped on the rows it then scored)."""
    seen: list[dict] = []
    cfg = LabelingConfig(max_iterations=2, review_count=0, eval_mode=eval_mode, holdout_fraction=0.3)
    SelfTrainer(cfg, learner_factory=lambda c, s, it: _Spy(c, s, seen)).run(_toy())
    looped = [rec for rec in seen if rec["stopped_on"]]
    refit = 2 if eval_mode == "cv" else 0  # the final refit (auto: cv mode only) has two models that stop on nothing
    assert len(looped) >= 4 and len(seen) - len(looped) == refit
    for rec in looped:
        assert rec["scored"] and not rec["stopped_on"] & rec["scored"]


def test_breaker_rolls_back_to_the_best_iteration_on_a_forced_degradation(tmp_path):
    # without the spreading and linear blend, which would (rightly) move its weight off a degrading learner
    # and hide it
    cfg = LabelingConfig(max_iterations=6, stop_change=0.0, review_count=0, spreading=False, linear=False)
    out = SelfTrainer(cfg, learner_factory=lambda c, s, it: _Degrading(c, s, it, bad_from=3)).run(_toy())
    assert out.breaker_tripped and "rolled back" in out.stop_reason
    assert out.chosen_iteration < 3 and len(out.iterations) == 3
    best_f1 = max(s.f1 for s in out.iterations[:2])
    assert out.iterations[-1].f1 < best_f1
    chosen = out.iterations[out.chosen_iteration - 1]
    assert out.decision.counts()["accepted"] == chosen.counts["accepted"]  # the written labels are the best's
    # the breaker's iteration is marked as such, not shown as an accepted set collapsing to zero
    assert out.iterations[-1].breaker and not any(s.breaker for s in out.iterations[:-1])
    from rich.console import Console

    from labeling.present import iteration_table

    rows = [dataclasses.asdict(s) for s in out.iterations]
    console = Console(width=200, record=True)
    console.print(
        iteration_table(
            {
                "run_id": "r",
                "eval_mode": "cv",
                "models_per_iteration": 2,
                "iterations": rows,
                "chosen_iteration": out.chosen_iteration,
            }
        )
    )
    last_line = next(ln for ln in console.export_text().splitlines() if ln.strip().startswith("│ 3"))
    assert "breaker" in last_line
    from labeling.plots import iteration_curves

    png = iteration_curves(rows, tmp_path / "it.png", threshold=0.8, chosen=out.chosen_iteration)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_written_gate_is_reported_raised_or_closed():
    """A gate closed by the held-out evidence (threshold 1.0) accepted nothing while the report's top-level
    threshold still read 0.8: the reason has to be said where the user looks."""
    from types import SimpleNamespace

    from labeling.job import _written_gate

    def outcome(used, evidence=None):
        it = SimpleNamespace(iteration=2, gate_threshold=used, threshold_evidence=evidence)
        return SimpleNamespace(
            iterations=[SimpleNamespace(iteration=1, gate_threshold=0.8), it], chosen_iteration=2, gate_threshold=0.8
        )

    same = _written_gate(outcome(0.8), 0.8, 10)
    assert same == {"threshold": 0.8, "closed": False, "message": None}
    raised = _written_gate(outcome(0.95, {"support": 40, "accuracy": 0.975, "mean_confidence": 0.97}), 0.8, 10)
    assert not raised["closed"] and "raised from 0.80 to 0.95 at the written iteration 2" in raised["message"]
    assert "40 held-out rows, 97.5% correct" in raised["message"]
    closed = _written_gate(outcome(1.0, {"support": 0, "closed": True}), 0.8, 10)
    assert closed["closed"] and closed["message"].startswith("GATE CLOSED at the written iteration 2")
    # 1.0 supported by the held-out rows: open at 1.0 (it accepts scores of exactly 1.0), not "closed"
    at_one = _written_gate(
        outcome(1.0, {"support": 30, "accuracy": 1.0, "mean_confidence": 1.0, "closed": False}), 0.8, 10
    )
    assert not at_one["closed"] and "raised from 0.80 to 1.00" in at_one["message"]


def test_classes_that_got_no_accepted_label_are_named():
    """5 of 10 classes (43% of the pool) got no accepted label and the summary only said "coverage 16.5%"."""
    from types import SimpleNamespace

    from labeling.gate import ACCEPTED, QUARANTINED
    from labeling.job import _unserved_classes

    label = np.array([0, 0, 1, 1, 2, 2, 2])
    status = np.array([ACCEPTED, ACCEPTED, ACCEPTED, QUARANTINED, QUARANTINED, QUARANTINED, QUARANTINED])
    out = SimpleNamespace(decision=SimpleNamespace(label=label, status=status))
    msg = _unserved_classes(out, ["a", "b", "c", "d"])
    assert msg.startswith("1 of 4 classes got no accepted pseudo-label: 'c' (3 predicted)") and "43% of the pool" in msg
    out.decision.status = np.full(7, ACCEPTED)
    assert _unserved_classes(out, ["a", "b", "c", "d"]) is None  # 'd' is never predicted: nothing to say
    out.decision.status = np.full(7, QUARANTINED)
    assert _unserved_classes(out, ["a", "b", "c", "d"]) is None  # none accepted at all: the gate's message


def test_propagated_features_never_echo_a_points_own_label():
    from labeling.neighbours import Propagation

    x, cl = clustered_vectors(400, n_clusters=4, seed=2, spread=0.8)
    g = NeighbourGraph.exact(x, 10)
    prop = Propagation(g, hops=3)
    y = np.full(400, -1)
    y[::8] = cl[::8]
    none = np.full(400, -1)
    base = prop.features(votes(4, y, none, np.zeros(400, np.float32), 0.5))
    for i in (0, 8, 16):  # labelled points: flipping their own label leaves their own features exactly as they were
        flipped = y.copy()
        flipped[i] = (y[i] + 1) % 4
        after = prop.features(votes(4, flipped, none, np.zeros(400, np.float32), 0.5))
        np.testing.assert_allclose(after[i], base[i], atol=1e-6)
        assert not np.allclose(after, base)  # ... while other points' do change
    # it carries signal: the propagated distribution's argmax recovers most unlabelled points' clusters
    unl = y < 0
    assert (base[unl, :4].argmax(axis=1) == cl[unl]).mean() > 0.8
    # a new point sees the same snapshot labels through its neighbours
    new = prop.features_new(g.index[:5], g.sims[:5], votes(4, y, none, np.zeros(400, np.float32), 0.5))
    assert new.shape == (5, 5) and np.allclose(new[:, :4].sum(axis=1), 1.0, atol=1e-5)


def test_xgboost_refuses_a_feature_count_it_was_not_trained_on():
    x = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    y = np.eye(2)[(x[:, 0] > 0).astype(int)]
    m = XGBoostLearner(2, XGBoostParams(max_rounds=5)).fit(x, y, np.ones(60))
    with pytest.raises(ValueError, match="trained on 5 features, got 4"):
        m.predict_proba(x[:, :4])


def _two_chains(n: int = 40) -> NeighbourGraph:
    """Two disjoint paths 0..n/2-1 and n/2..n-1: each point's neighbours are its path neighbours."""
    half = n // 2
    index = np.full((n, 2), -1, np.int32)
    for i in range(n):
        lo, hi = (0, half) if i < half else (half, n)
        index[i] = [i - 1 if i - 1 >= lo else -1, i + 1 if i + 1 < hi else -1]
    return NeighbourGraph(index, np.where(index >= 0, 0.9, 0.0).astype(np.float32))


def test_spreading_reaches_along_the_graph_only_and_labels_new_points_by_their_neighbours():
    g = _two_chains()
    y = np.full(40, -1)
    y[0], y[19] = 0, 0  # the first path is class 0 at both ends
    y[25] = 1
    f = Spreading(g, alpha=0.5).of_labels(y, 3)
    np.testing.assert_allclose(f.sum(axis=1), 1.0)
    assert (f[:20].argmax(axis=1) == 0).all() and (f[20:].argmax(axis=1) == 1).all()  # never across paths
    np.testing.assert_allclose(f[:, 2], 0.0)  # no label of class 2 anywhere: it gets nothing
    y_none = np.full(40, -1)
    y_none[:20] = 0
    g2 = Spreading(g, alpha=0.5).of_labels(y_none, 2)
    np.testing.assert_allclose(g2[20:], 0.5)  # a path no label reaches: uniform, not a guess
    new = Spreading.new(np.array([[3, 30], [-1, -1]]), np.array([[0.9, 0.1], [0.0, 0.0]]), f)
    assert new[0].argmax() == 0 and np.allclose(new[1], 1 / 3)
    with pytest.raises(ValueError, match="alpha"):
        Spreading(g, alpha=1.0)


def test_cross_fitted_spreading_never_hands_a_labelled_row_its_own_label():
    g = NeighbourGraph.exact(clustered_vectors(300, n_clusters=3, seed=2)[0], 8)
    y = np.where(np.random.default_rng(0).random(300) < 0.3, np.arange(300) % 3, -1)
    sp = Spreading(g)
    a = sp.cross_fitted(y, 3, rng=np.random.default_rng(5))
    for row in np.flatnonzero(y >= 0)[:10]:
        flipped = y.copy()
        flipped[row] = (y[row] + 1) % 3
        b = sp.cross_fitted(flipped, 3, rng=np.random.default_rng(5))
        np.testing.assert_allclose(a[row], b[row])  # its own label (true or flipped) never reaches it
    assert not np.allclose(sp.of_labels(y, 3), sp.of_labels(flipped, 3))  # ...while the plain spread does


def test_blend_weight_follows_whichever_opinion_is_right_on_held_out_truth():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    hit = np.where(rng.random(300) < 0.85, y, rng.integers(0, 3, 300))  # right 85-90% of the time
    right = np.full((300, 3), 0.1)
    right[np.arange(300), hit] = 0.8
    noise = rng.dirichlet(np.ones(3), 300)
    assert choose_blend([right, noise], y) == (1.0, 0.0)  # the learner is right: it keeps all the weight
    assert choose_blend([noise, right], y)[0] <= 0.1  # the graph is right: the learner's weight goes to ~0
    mixed = choose_blend([0.5 * right + 0.5 * noise, 0.5 * right + 0.5 * rng.dirichlet(np.ones(3), 300)], y)
    assert 0.2 <= mixed[0] <= 0.8  # two equally good, independent opinions: both kept
    # three parts (learner, linear model, spreading): the weights sum to 1 and go to the one that is right
    three = choose_blend([noise, right, rng.dirichlet(np.ones(3), 300)], y)
    assert len(three) == 3 and abs(sum(three) - 1) < 1e-9 and three[1] >= 0.9


def test_a_bagged_blend_choice_keeps_the_right_part_and_moves_less_between_draws_of_few_rows():
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.integers(0, 2, n)

    def opinion() -> np.ndarray:  # right ~70% of the time, independently of the other opinion
        hit = np.where(rng.random(n) < 0.7, y, 1 - y)
        p = np.full((n, 2), 0.35)
        p[np.arange(n), hit] = 0.65
        return p

    a, b = opinion(), opinion()
    noise = rng.dirichlet(np.ones(2), n)
    bagged = choose_blend([a[:300], noise[:300]], y[:300], resamples=50)
    assert len(bagged) == 2 and abs(sum(bagged) - 1) < 1e-9 and bagged[0] >= 0.9
    assert choose_blend([a[:300], noise[:300]], y[:300], resamples=50) == bagged  # seeded: the same answer
    plain, bag = [], []
    for start in range(0, 20 * 60, 60):  # 20 disjoint draws of 60 held-out rows: two equally good opinions
        rows = slice(start, start + 60)
        plain.append(choose_blend([a[rows], b[rows]], y[rows])[0])
        bag.append(choose_blend([a[rows], b[rows]], y[rows], resamples=50)[0])
    assert np.std(bag) < np.std(plain), (plain, bag)
    assert 0.3 <= np.mean(bag) <= 0.7


def test_macro_f1_matches_scikit_learn_including_absent_classes():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    for _ in range(100):
        c = int(rng.integers(2, 8))
        n = int(rng.integers(1, 40))
        y, pred = rng.integers(0, c, n), rng.integers(0, c, n)
        want = f1_score(y, pred, labels=list(range(c)), average="macro", zero_division=0)
        assert macro_f1(pred, y, c) == pytest.approx(want, abs=1e-12)


def test_linear_learner_fits_soft_targets_warm_starts_to_the_same_answer_and_refuses_bad_input():
    x, cl = clustered_vectors(600, n_clusters=3, seed=4, spread=0.8)
    x = x[:, :32]
    eye = np.eye(3, dtype=np.float32)
    w = np.ones(600, np.float32)
    cold = LinearLearner(3, c=1.0).fit(x, eye[cl], w)
    p = cold.predict_proba(x)
    assert p.shape == (600, 3) and np.allclose(p.sum(axis=1), 1) and (p.argmax(1) == cl).mean() > 0.9
    warm = LinearLearner(3, c=1.0, warm_from=cold).fit(x, eye[cl], w)
    np.testing.assert_allclose(warm.predict_proba(x), p, atol=2e-3)  # the same optimum, from a head start
    assert warm.warm_from is None  # the old model is not kept alive
    # a soft row counts as the weighted mixture of its classes: half-and-half targets give a 50/50 split
    soft = np.tile(np.array([[0.5, 0.5, 0.0]], np.float32), (600, 1))
    q = LinearLearner(3, c=1.0).fit(x, soft, w).predict_proba(x)
    assert np.allclose(q[:, 0], q[:, 1], atol=0.05) and q[:, 2].max() < 0.05
    with pytest.raises(ValueError, match="C must be > 0"):
        LinearLearner(3, c=0.0)
    with pytest.raises(ValueError, match="finite"):
        LinearLearner(3).fit(np.full((4, 2), np.nan, np.float32), eye[[0, 1, 2, 0]], np.ones(4, np.float32))


def test_linear_c_is_chosen_by_cross_validation_strong_for_clean_labels_weak_for_noise():
    from labeling.learners import LINEAR_C_GRID, choose_linear_c

    x, cl = clustered_vectors(600, n_clusters=3, seed=5, spread=0.5)
    assert choose_linear_c(x, cl, 3) >= LINEAR_C_GRID[2]  # separable: little regularisation
    noise = np.random.default_rng(0).integers(0, 3, 600)
    assert choose_linear_c(x, noise, 3) == LINEAR_C_GRID[0]  # labels carry nothing: as flat as the grid allows


def test_linear_c_is_still_chosen_when_a_class_has_a_single_example():
    # a chain of the loop sees 1 of a class's 2 seed labels; that class cannot be scored out of fold, but the
    # others still can - the choice must not fall back to a default outside the grid
    from labeling.learners import LINEAR_C_GRID, choose_linear_c

    x, cl = clustered_vectors(600, n_clusters=4, seed=5, spread=0.5)
    lone = np.flatnonzero(cl == 3)[0]
    keep = np.concatenate([np.flatnonzero(cl < 3), [lone]])
    assert choose_linear_c(x[keep], cl[keep], 4) >= LINEAR_C_GRID[2]
    noise = np.random.default_rng(0).integers(0, 3, len(keep))
    noise[-1] = 3
    assert choose_linear_c(x[keep], noise, 4) == LINEAR_C_GRID[0]
    # nothing can be held out at all: the documented default
    assert choose_linear_c(x[:3], np.array([0, 1, 2]), 3) == 1.0


def test_validated_threshold_rises_above_an_over_confident_tail_and_closes_when_nothing_holds():
    from labeling.gate import validated_threshold

    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 2, n)
    conf = rng.uniform(0.5, 1.0, n)
    honest = rng.random(n) < conf  # right as often as it claims
    pred = np.where(honest, y, 1 - y)
    probs = np.zeros((n, 2))
    probs[np.arange(n), pred] = conf
    probs[np.arange(n), 1 - pred] = 1 - conf
    t, ev = validated_threshold(probs, y, 0.8)
    assert t == 0.8 and ev["support"] >= 10  # calibrated: the configured threshold stands
    liar = probs.copy()
    band = (conf >= 0.8) & (conf < 0.9)
    liar_pred = np.where(band, 1 - y, pred)  # wrong on every row it scores 0.8-0.9
    liar[np.arange(n), liar_pred] = conf
    liar[np.arange(n), 1 - liar_pred] = 1 - conf
    t, ev = validated_threshold(liar, y, 0.8)
    assert t >= 0.9 and ev["accuracy"] >= ev["mean_confidence"] - 0.1  # raised past the over-confident band
    always_wrong = np.zeros((n, 2))
    always_wrong[np.arange(n), 1 - y] = 0.95
    always_wrong[np.arange(n), y] = 0.05
    t, ev = validated_threshold(always_wrong, y, 0.8)
    assert t == 1.0 and ev["closed"]  # nothing holds: the gate closes
    # closed is not "threshold 1.0": scores of exactly 1.0 (isotonic calibration gives many) were accepted by a
    # gate reported closed (228 labels in a walk-through)
    from labeling.gate import ACCEPTED, StateGate

    certain = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.3]])
    priors = np.array([0.5, 0.5])
    at_one = StateGate(threshold=1.0, cap_factor=10).decide(certain, priors)
    assert (at_one.status == ACCEPTED).tolist() == [True, True, False]
    shut = StateGate(threshold=1.0, closed=True, cap_factor=10).decide(certain, priors)
    assert not (shut.status == ACCEPTED).any()
    sure = np.zeros((n, 2))
    sure[np.arange(n), y] = 1.0  # right, and certain: the check supports 1.0 (and everything below)
    assert not validated_threshold(sure, y, 0.8)[1]["closed"]


@pytest.mark.parametrize(
    ("per_class", "classes", "mode"),
    [
        (200, 10, "cv"),  # a class below 250 labels
        (311, 2, "cv"),  # 250+ per class, but a 20% slice of 124 rows: too few to check the gate's top tail on
        (500, 10, "holdout"),  # a 1,000-row slice (the 100k-point job's seed)
    ],
)
def test_auto_evaluation_mode_needs_enough_rows_per_class_and_in_all(per_class, classes, mode):
    from labeling.selftrain import _chains

    y = np.full(per_class * classes + 50, -1)
    y[: per_class * classes] = np.repeat(np.arange(classes), per_class)
    got, chains = _chains(y, np.flatnonzero(y < 0), LabelingConfig(), np.random.default_rng(0))
    assert got == mode
    assert len(chains) == (4 if mode == "cv" else 1)
    # whatever the mode, no chain is judged on a label it may see
    assert all(not ch.visible[ch.eval_rows].any() for ch in chains)


def test_a_thin_class_does_not_cut_the_folds_every_chain_trains_on():
    """Two labels of one class must not turn 4 folds into 2 (every chain training on half the seed): the
    thin class sits in two folds, and every chain still sees at least one of its labels."""
    from labeling.selftrain import _chains

    y = np.full(200, -1)
    y[:40] = np.repeat(np.arange(4), 10)
    y[40:42] = 4  # the thin class: 2 labels
    gt = np.flatnonzero(y >= 0)
    _, chains = _chains(y, np.flatnonzero(y < 0), LabelingConfig(), np.random.default_rng(0))
    assert len(chains) == 4
    assert sorted(np.concatenate([ch.eval_rows for ch in chains]).tolist()) == gt.tolist()  # each label judged once
    for ch in chains:
        assert ch.visible.sum() >= 31  # ~3/4 of the 42 labels, not half
        assert all((ch.visible & (y == k)).any() for k in range(5))
        assert not ch.visible[ch.eval_rows].any()


def test_repeated_folds_hold_every_label_out_once_per_draw():
    """cv_repeats draws the K folds again with another shuffle: K x repeats chains, each judged only on labels
    it never sees, every ground-truth label held out exactly once per draw, and the draws differ."""
    from labeling.selftrain import _chains

    y = np.full(300, -1)
    y[:120] = np.repeat(np.arange(3), 40)
    gt = np.flatnonzero(y >= 0)
    mode, chains = _chains(y, np.flatnonzero(y < 0), LabelingConfig(cv_repeats=3), np.random.default_rng(0))
    assert mode == "cv" and len(chains) == 12
    draws = [chains[i : i + 4] for i in (0, 4, 8)]
    for draw in draws:
        assert sorted(np.concatenate([ch.eval_rows for ch in draw]).tolist()) == gt.tolist()
    assert all(not ch.visible[ch.eval_rows].any() for ch in chains)
    assert [ch.eval_rows.tolist() for ch in draws[0]] != [ch.eval_rows.tolist() for ch in draws[1]]
    # one draw is the default, and the first draw does not depend on how many follow
    _, one = _chains(y, np.flatnonzero(y < 0), LabelingConfig(), np.random.default_rng(0))
    assert [ch.eval_rows.tolist() for ch in one] == [ch.eval_rows.tolist() for ch in draws[0]]


def test_repeated_folds_run_one_chain_per_fold_and_draw_and_score_with_all_of_them():
    data = _toy(600, seed=3)
    base = {"max_iterations": 2, "review_count": 0, "cv_folds": 2, "xgboost": {"max_rounds": 40}, "final_refit": 0}
    one = SelfTrainer(LabelingConfig(**base)).run(data)
    two = SelfTrainer(LabelingConfig(**base, cv_repeats=2)).run(data)
    assert one.eval_mode == two.eval_mode == "cv"
    assert (one.n_models, two.n_models) == (4, 8)
    assert len(two.predictor.models) == 4 and len(two.predictor.chain_spread) == 4
    # calibration reads every ground-truth label once (its mean held-out score over the draws), not twice
    n_gt = int((data.y >= 0).sum())
    assert len(two.calibration.oof_calibrated) == len(one.calibration.oof_calibrated) == n_gt
    assert np.isfinite(two.probs).all() and np.allclose(two.probs.sum(axis=1), 1.0)
    acc = two.decision.status == ACCEPTED
    assert acc.any() and (two.decision.label[acc] == data.truth[two.pool][acc]).mean() > 0.9


@pytest.mark.parametrize(
    "make",
    [
        lambda: XGBoostLearner(3, XGBoostParams(max_rounds=10), seed=0),
        lambda: RandomForestLearner(3, ForestParams(n_estimators=10), seed=0),
        lambda: LinearLearner(3),
    ],
    ids=["xgboost", "random_forest", "linear"],
)
def test_the_three_learners_check_their_input_alike(make):
    """They differed: XGBoost scored NaN rows with confident probabilities and failed a 1-D row with an
    IndexError; the linear learner alone refused a one-class training set."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    y = np.eye(3)[rng.integers(0, 3, 60)]
    w = np.ones(60)
    model = make().fit(x, y, w)
    with pytest.raises(ValueError, match="2-D"):
        model.predict_proba(x[0])
    with pytest.raises(ValueError, match="finite"):
        model.predict_proba(np.where(np.arange(8) == 3, np.nan, x[:2]))
    with pytest.raises(ValueError, match="trained on 8 features"):
        model.predict_proba(x[:2, :5])
    with pytest.raises(ValueError, match="sum to 1"):
        make().fit(x, y * 5, w)
    one = make().fit(x, np.eye(3)[np.zeros(60, int)], w)  # a single class: certain of it, whatever the learner
    assert np.allclose(one.predict_proba(x[:4]), np.eye(3)[[0, 0, 0, 0]], atol=1e-4)
