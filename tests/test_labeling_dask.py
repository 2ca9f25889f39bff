"""Training through xgboost.dask on a local Dask cluster of worker processes, behind the same learner contract."""

from __future__ import annotations

import numpy as np
import pytest

from labeling.config import LabelingConfig
from labeling.learners import DaskXGBoostLearner, XGBoostLearner, make_learner
from labeling.selftrain import SelfTrainer
from retrieval.synthetic import clustered_vectors
from tests.test_labeling_parts import _toy


@pytest.fixture(scope="module")
def dask_client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _data(n: int = 3000, seed: int = 4):
    x, cl = clustered_vectors(n, n_clusters=4, seed=seed, spread=2.5)
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < 0.1  # 10% label noise: a problem the model cannot solve perfectly
    cl = np.where(noisy, rng.integers(0, 4, n), cl)
    return x[:, :48].astype(np.float32), cl


def test_dask_learner_matches_the_single_machine_learner(dask_client):
    x, cl = _data()
    y, w = np.eye(4, dtype=np.float32)[cl], np.ones(len(x), np.float32)
    tr, te = slice(0, 2400), slice(2400, None)
    local = XGBoostLearner(4, seed=0).fit(x[tr], y[tr], w[tr], eval_set=(x[te], cl[te]))
    dist = DaskXGBoostLearner(4, seed=0, scheduler=dask_client).fit(x[tr], y[tr], w[tr], eval_set=(x[te], cl[te]))
    assert len(dask_client.scheduler_info()["workers"]) == 2  # it really ran on two worker processes
    pl, pd = local.predict_proba(x[te]), dist.predict_proba(x[te])
    np.testing.assert_allclose(pd.sum(axis=1), 1.0, rtol=1e-5)
    acc_l, acc_d = (pl.argmax(1) == cl[te]).mean(), (pd.argmax(1) == cl[te]).mean()
    assert acc_d > 0.6 and abs(acc_l - acc_d) < 0.03, (acc_l, acc_d)
    assert (pl.argmax(1) == pd.argmax(1)).mean() > 0.9
    with pytest.raises(ValueError, match="features"):
        dist.predict_proba(x[te, :10])


def test_the_labeling_loop_runs_on_the_dask_learner(dask_client):
    cfg = LabelingConfig(max_iterations=2, review_count=0, learner="xgboost_dask")
    assert isinstance(make_learner(cfg, 3, 0), DaskXGBoostLearner)
    out = SelfTrainer(
        cfg, learner_factory=lambda c, s, it: DaskXGBoostLearner(c, cfg.xgboost, seed=s, scheduler=dask_client)
    ).run(_toy(600))
    assert 1 <= len(out.iterations) <= 2 and out.iterations[0].f1 > 0.5
    assert out.decision.counts()["accepted"] > 0
