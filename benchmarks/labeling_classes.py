"""How the labeling loop's cost grows with the number of classes: seconds per iteration and per model fit.

    python benchmarks/labeling_classes.py                                  # 10, 30 and 100 classes, both learners
    python benchmarks/labeling_classes.py --classes 10,50 --points 4000 --iterations 3

Why: the benchmarked data sets have 2-31 classes; a user's may have hundreds. Two
things in the loop grow with the class count C: XGBoost's ``multi:softprob`` grows
one tree per class per boosting round, and the neighbourhood features are
per class (vote share, max and mean similarity, propagation, spreading: about
5 C columns beside the 128D prefix). So an XGBoost fit costs about C x (128 + 5 C)
histogram columns per round, while a Random Forest grows one tree for all classes.

What runs: the self-training engine (:class:`labeling.selftrain.SelfTrainer`, the
job's training stage) on arrays, not through the store: reading, the kNN graph and
the write-back are per-point store work that does not depend on C
(benchmarks/labeling_scale.py measures them). Data: ``retrieval.synthetic``
clustered 512D vectors, one cluster per class, a stratified seed, an exact k = 15
graph. The run keeps every iteration it is given (breaker off, ``stop_change = 0``)
so iterations are comparable across C. Each learner fit is timed through the
engine's learner factory, which also records the feature count.

Results: benchmarks/results/labeling_classes.json (per run: seconds per iteration,
per fit, feature count, and the pool's macro-F1 against the hidden truth).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402
from labeling.calibration import macro_f1  # noqa: E402
from labeling.config import LabelingConfig  # noqa: E402
from labeling.gate import ACCEPTED  # noqa: E402
from labeling.learners import Learner, make_learner  # noqa: E402
from labeling.neighbours import NeighbourGraph  # noqa: E402
from labeling.selftrain import LabelingInput, SelfTrainer  # noqa: E402
from retrieval.schema import normalise  # noqa: E402
from retrieval.synthetic import clustered_vectors  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "labeling_classes.json"


class _TimedLearner:
    """Delegates to a real learner; records each fit's seconds and feature count."""

    def __init__(self, inner: Learner, log: list[dict[str, Any]], iteration: int) -> None:
        self._inner, self._log, self._iteration = inner, log, iteration
        self.name, self.n_classes = inner.name, inner.n_classes

    def fit(self, x: np.ndarray, y: np.ndarray, w: np.ndarray, eval_set: Any = None) -> _TimedLearner:
        t0 = time.perf_counter()
        self._inner.fit(x, y, w, eval_set=eval_set)
        self._log.append(
            {"iteration": self._iteration, "seconds": time.perf_counter() - t0, "rows": len(x), "features": x.shape[1]}
        )
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self._inner.predict_proba(x)

    def __getattr__(self, name: str) -> Any:  # best_rounds_ etc.
        return getattr(self._inner, name)


def make_data(n_classes: int, points: int, seed_fraction: float, spread: float, seed: int) -> dict[str, Any]:
    raw, truth = clustered_vectors(points, n_clusters=n_classes, seed=seed, spread=spread)
    x, prefix = normalise(raw)  # the store's own (full512, mrl128) pair
    rng = np.random.default_rng(seed)
    y = np.full(points, -1, np.int64)
    for c in range(n_classes):
        rows = np.flatnonzero(truth == c)
        if len(rows) < 3:
            raise ValueError(f"class {c} has {len(rows)} points; give more --points for {n_classes} classes")
        take = min(len(rows) - 1, max(2, round(seed_fraction * len(rows))))  # >= 2 labels, >= 1 left to label
        y[rng.choice(rows, take, replace=False)] = c
    return {"x": x, "prefix": prefix, "y": y, "truth": truth}


def run(n_classes: int, learner: str, args: argparse.Namespace) -> dict[str, Any]:
    d = make_data(n_classes, args.points, args.seed_fraction, args.spread, args.seed)
    t0 = time.perf_counter()
    graph = NeighbourGraph.exact(d["x"], args.k)
    graph_s = time.perf_counter() - t0
    cfg = LabelingConfig(
        learner=learner,
        allow_sparse_seed=True,  # a few labels per class at 100 classes: the guard's override, recorded here
        seed=args.seed,
        k=args.k,
        max_iterations=args.iterations,
        breaker=False,
        stop_change=0.0,
    )
    fits: list[dict[str, Any]] = []

    def factory(c: int, seed: int, iteration: int) -> Learner:
        return _TimedLearner(make_learner(cfg, c, seed), fits, iteration)

    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "iteration":
            s = data["stats"]
            print(f"  {learner} C={n_classes} iteration {s.iteration}: {s.seconds.get('total', 0):.1f} s", flush=True)

    classes = [f"class{i}" for i in range(n_classes)]
    t0 = time.perf_counter()
    out = SelfTrainer(cfg, learner_factory=factory, progress=progress).run(
        LabelingInput(d["prefix"], d["y"], classes, graph, truth=d["truth"])
    )
    wall = time.perf_counter() - t0
    pool_truth = d["truth"][out.pool]
    accepted = out.decision.status == ACCEPTED
    per_it = [s.seconds.get("total", 0.0) for s in out.iterations]
    return {
        "classes": n_classes,
        "learner": learner,
        "points": args.points,
        "ground_truth": int((d["y"] >= 0).sum()),
        "iterations": len(out.iterations),
        "models_per_iteration": out.n_models,
        "features": fits[0]["features"] if fits else None,
        "graph_s": round(graph_s, 2),
        "wall_s": round(wall, 2),
        "seconds_per_iteration": [round(s, 2) for s in per_it],
        "fit_s_per_iteration": [
            round(sum(f["seconds"] for f in fits if f["iteration"] == it), 2) for it in range(1, len(per_it) + 1)
        ],
        "mean_fit_s": round(float(np.mean([f["seconds"] for f in fits])), 3),
        "mean_fit_rows": round(float(np.mean([f["rows"] for f in fits])), 1),
        "pool_macro_f1": round(macro_f1(out.probs.argmax(axis=1), pool_truth, n_classes), 4),
        "coverage": round(float(accepted.mean()), 4),
        "pseudo_precision": (
            round(float((out.decision.label[accepted] == pool_truth[accepted]).mean()), 4) if accepted.any() else None
        ),
    }


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| learner | classes | features | ground truth | models / iteration | s / iteration | s / fit (mean) "
        "| pool macro-F1 | accepted correct / coverage |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in runs:
        acc = "-" if r["pseudo_precision"] is None else f"{r['pseudo_precision']:.1%} / {r['coverage']:.1%}"
        its = ", ".join(f"{s:.0f}" for s in r["seconds_per_iteration"])
        lines.append(
            f"| {r['learner']} | {r['classes']} | {r['features']} | {r['ground_truth']} | {r['models_per_iteration']} "
            f"| {its} | {r['mean_fit_s']:.1f} | {r['pool_macro_f1']:.3f} | {acc} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", default="10,30,100", help="comma-separated class counts")
    ap.add_argument("--learners", default="xgboost,random_forest")
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--seed-fraction", type=float, default=0.1)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--spread", type=float, default=1.5)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    class_counts = [int(c) for c in args.classes.split(",")]
    learners = args.learners.split(",")
    runs = [run(c, learner, args) for learner in learners for c in class_counts]
    result = {
        "benchmark": "labeling_classes",
        "machine": machine_info(),  # CPU, Python and package versions (benchmarks/machine.py)
        "data": (
            f"retrieval.synthetic clustered 512D, one cluster per class, spread {args.spread}, "
            f"{args.points} points, {args.seed_fraction:.0%} stratified seed, exact k={args.k} graph"
        ),
        "config": {"iterations": args.iterations, "breaker": False, "stop_change": 0.0},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(runs))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
