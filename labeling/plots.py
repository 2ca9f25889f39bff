"""PNG plots of a run: reliability diagrams before/after calibration, and per-iteration curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labeling.calibration import Reliability


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(before: Reliability, after: Reliability, path: Path, *, title: str = "") -> Path:
    """Two panels: held-out confidence vs accuracy per bin, raw scores and calibrated (out-of-fold) scores."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, rel, name in ((axes[0], before, "before calibration"), (axes[1], after, "after calibration")):
        width = rel.edges[1] - rel.edges[0]
        mids = [(a + b) / 2 for a, b in zip(rel.edges[:-1], rel.edges[1:], strict=True)]
        acc = [a if a is not None else 0.0 for a in rel.accuracy]
        ax.bar(mids, acc, width=width * 0.9, color="#4C72B0", edgecolor="black", label="accuracy")
        pts = [(c, a) for c, a in zip(rel.confidence, rel.accuracy, strict=True) if c is not None and a is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="#DD8452", label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        for m, n in zip(mids, rel.count, strict=True):
            if n:
                ax.text(m, 0.02, str(n), ha="center", fontsize=7, color="white")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_title(name)
    axes[0].set_ylabel("accuracy on held-out ground truth")
    axes[0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def iteration_curves(iterations: list[dict[str, Any]], path: Path, *, threshold: float, chosen: int) -> Path:
    """Held-out macro-F1 and ECE, accepted count, and (when truth is known) pseudo-label precision per iteration."""
    plt = _plt()
    its = [r["iteration"] for r in iterations]
    # The collapse breaker's iteration was scored but never gated: it has a held-out F1 (the reason it
    # stopped) and no accepted set, so it is marked on the quality panel and left off the other two.
    gated = [r for r in iterations if not r.get("breaker")]
    broke = [r for r in iterations if r.get("breaker")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(its, [r["heldout_after"]["macro_f1"] for r in iterations], "o-", label="held-out macro-F1")
    axes[0].plot(its, [r["heldout_after"]["ece"] for r in iterations], "s--", label="held-out ECE (calibrated)")
    axes[0].axvline(chosen, color="green", alpha=0.4, label=f"written: iteration {chosen}")
    for r in broke:
        axes[0].plot(
            [r["iteration"]],
            [r["heldout_after"]["macro_f1"]],
            "X",
            color="red",
            markersize=10,
            label=f"collapse breaker: stopped at {r['iteration']}",
        )
    axes[0].set_title("held-out quality")
    axes[0].legend(fontsize=8)
    g_its = [r["iteration"] for r in gated]
    axes[1].plot(g_its, [r["counts"].get("accepted", 0) for r in gated], "o-", label="accepted")
    axes[1].plot(g_its, [r["revoked"] for r in gated], "x--", label="revoked")
    axes[1].set_title("pseudo-labels")
    axes[1].legend(fontsize=8)
    prec = [(r["iteration"], r["pseudo_precision"]) for r in gated if r.get("pseudo_precision") is not None]
    conf = [
        (r["iteration"], r["mean_accepted_confidence"]) for r in gated if r.get("mean_accepted_confidence") is not None
    ]
    if prec:
        axes[2].plot([p[0] for p in prec], [p[1] for p in prec], "o-", label="precision vs known truth")
    if conf:
        axes[2].plot([p[0] for p in conf], [p[1] for p in conf], "s--", label="mean calibrated confidence")
    axes[2].axhline(threshold, color="grey", linestyle=":", label=f"gate {threshold:.2f}")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title("accepted pseudo-labels")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
