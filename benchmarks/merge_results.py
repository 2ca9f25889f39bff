"""Merge ``benchmarks/self_training.py`` result files into one, the way the committed combined files are built.

    python benchmarks/merge_results.py --out benchmarks/results/self_training_default_5pct.json \\
        --fractions 0.05 --note "..." A.json B.json ...

A row is keyed by (dataset, seed fraction, method, seed), as ``--resume`` keys it. The same key in two sources must
be the same measurement: every measured field (macro-F1, the pseudo-label and calibration figures, iterations) and
the vectors it ran on agree, or the merge stops and names both files and the first field that differs. The fields
that say *how* a row was run (``commit``, ``env``, ``config``, ``wall_s``) may differ: a row run with
``--config '{"final_refit": 0.5}'`` and the same row run where 0.5 became the default are one measurement, and the
first source's copy is kept. A dataset whose rows ran on more than one set of vectors is refused unless
``--allow-mixed-vectors`` (rows on other vectors never pair: ``self_training.targets`` leaves them out).

The summary and the targets are recomputed from the merged rows; ``merged_from`` records each source file and the
arguments it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.self_training import row_key as key  # noqa: E402
from benchmarks.self_training import summarise, targets  # noqa: E402

#: the fields a row measured; two copies of one row must agree on all of them
MEASURED = (
    "vectors",
    "seed_override",
    "macro_f1",
    "pseudo_precision",
    "mean_confidence",
    "coverage",
    "ece",
    "test_ece",
    "test_gap",
    "pool_ece",
    "pool_gap",
    "iterations",
    "oracle_model",
)

Key = tuple[str, float, str, int]


class MergeError(ValueError):
    """Sources that cannot be merged (conflicting copies of a row, mixed vectors, a file of another format)."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def merge(
    sources: list[tuple[str, dict[str, Any]]],
    *,
    datasets: set[str] | None = None,
    fractions: set[float] | None = None,
    methods: set[str] | None = None,
    allow_mixed_vectors: bool = False,
    note: str | None = None,
) -> dict[str, Any]:
    """The merged result of ``sources`` ((name, parsed file) pairs, in order of preference)."""

    def wanted(r: dict[str, Any]) -> bool:
        return (
            (datasets is None or r["dataset"] in datasets)
            and (fractions is None or any(abs(float(r["seed_fraction"]) - f) < 1e-9 for f in fractions))
            and (methods is None or r["method"] in methods)
        )

    rows: dict[Key, dict[str, Any]] = {}
    origin: dict[Key, str] = {}
    traces: dict[Key, dict[str, Any]] = {}
    environments: dict[str, Any] = {}
    merged_from: list[dict[str, Any]] = []
    machine = None
    for name, saved in sources:
        if not isinstance(saved, dict) or not isinstance(saved.get("rows"), list):
            raise MergeError(f"{name}: not a self_training result file (no 'rows' list)")
        taken = 0
        for r in saved["rows"]:
            missing = {"dataset", "seed_fraction", "method", "seed"} - set(r)
            if missing:
                raise MergeError(f"{name}: a row lacks {sorted(missing)}: {r}")
            if not wanted(r):
                continue
            k = key(r)
            if k in rows:
                old = rows[k]
                for f in MEASURED:
                    if not _same(old.get(f), r.get(f)):
                        raise MergeError(
                            f"{k}: {origin[k]} and {name} disagree on {f!r} ({old.get(f)!r} vs {r.get(f)!r}): "
                            "two different measurements under one key"
                        )
                continue
            rows[k], origin[k] = r, name
            taken += 1
        for t in saved.get("traces", []):
            if wanted(t) and key(t) in rows and origin[key(t)] == name and key(t) not in traces:
                traces[key(t)] = t
        environments.update(saved.get("environments", {}))
        machine = machine or saved.get("machine")
        merged_from.append({"file": name, "rows": taken, "args": saved.get("args")})
    if not rows:
        raise MergeError("no row of the sources matches the selection")
    if not allow_mixed_vectors:
        seen: dict[str, set[Any]] = {}
        for r in rows.values():
            seen.setdefault(r["dataset"], set()).add(r.get("vectors"))
        mixed = {d: sorted(map(str, v)) for d, v in seen.items() if len(v) > 1}
        if mixed:
            raise MergeError(f"rows on more than one set of vectors: {mixed} (--allow-mixed-vectors to keep them)")
    out_rows = list(rows.values())
    out: dict[str, Any] = {"benchmark": "self_training", "machine": machine, "environments": environments}
    if note:
        out["note"] = note
    out.update(
        merged_from=merged_from,
        rows=out_rows,
        summary=summarise(out_rows),
        targets=targets(out_rows),
        traces=list(traces.values()),
    )
    return out


def _floats(text: str | None) -> set[float] | None:
    return None if text is None else {float(f) for f in text.split(",")}


def _names(text: str | None) -> set[str] | None:
    return None if text is None else set(text.split(","))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", type=Path, help="result files, in order of preference")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--datasets", help="comma-separated; default: all")
    ap.add_argument("--fractions", help="comma-separated seed fractions; default: all")
    ap.add_argument("--methods", help="comma-separated; default: all")
    ap.add_argument("--note", help="what the merged file holds, kept in it")
    ap.add_argument("--allow-mixed-vectors", action="store_true")
    args = ap.parse_args(argv)
    sources = []
    for p in args.sources:
        try:
            sources.append((p.name, json.loads(p.read_text())))
        except (OSError, ValueError) as exc:
            ap.error(f"{p}: {exc}")
    try:
        merged = merge(
            sources,
            datasets=_names(args.datasets),
            fractions=_floats(args.fractions),
            methods=_names(args.methods),
            allow_mixed_vectors=args.allow_mixed_vectors,
            note=args.note,
        )
    except MergeError as exc:
        raise SystemExit(f"merge_results: {exc}") from None
    # written beside the target and renamed over it: a failed run leaves the old file whole
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(merged, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, args.out)
    counts = Counter((r["dataset"], r["seed_fraction"]) for r in merged["rows"])
    for (d, f), n in sorted(counts.items()):
        print(f"{d} {f:.0%}: {n} rows")
    print(f"{len(merged['rows'])} rows, {len(merged['traces'])} traces -> {args.out}")


if __name__ == "__main__":
    main()
