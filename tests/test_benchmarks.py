"""The benchmark scripts keep running and keep their result format (no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"method", "recall_at_10", "p50_ms", "p99_ms", "qps", "build_s", "rss_mb"}


def test_search_benchmark_writes_the_documented_format(tmp_path):
    out = tmp_path / "search.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search.py"), "--n", "3000", "--queries", "20",
         "--methods", "edge_prefetch,edge_full512_hnsw,numpy_exact", "--out", str(out)],
        check=True, cwd=ROOT, timeout=600, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["n"] == 3000
    methods = {r["method"]: r for r in result["rows"]}
    assert set(methods) == {"edge_prefetch", "edge_prefetch_engine", "edge_full512_hnsw", "numpy_exact"}
    for row in methods.values():
        assert set(row) >= ROW_KEYS, row
        assert 0.0 <= row["recall_at_10"] <= 1.0
    assert methods["numpy_exact"]["recall_at_10"] == 1.0  # the ground truth agrees with itself
    assert set(result["targets"]["checks"]) == {
        "recall_at_10 >= 0.99",
        "p50 <= full512 HNSW p50",
        "build_s <= 0.5 x full512 HNSW",
        "ram_mb <= 0.5 x full512 HNSW",
    }
