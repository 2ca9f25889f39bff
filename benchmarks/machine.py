"""What a benchmark ran on, saved beside its figures.

A commit does not pin a result. On 2026-11-30 a fresh install of this machine
type (same commit, same data and seeds; the items embedded and the label-free
projection fitted again, as the cache was gone) reran Rotten Tomatoes' 5% cell:
the logistic regression on the seed came out identical on all 10 seeds, but
XGBoost's fits moved by up to 2 points on single seeds and our loop by up to
2.4 (BENCHMARKS.md, "Environments"). The earlier install's CPU and packages
had not been recorded, so the cause could not be pinned down. Every result
file now records :func:`machine_info`, and the self-training rows carry its
:func:`fingerprint` and a digest of their vectors, so a reader can tell rows
of two environments apart.

Imported by the scripts as ``benchmarks.machine`` (``benchmarks/`` is not a
package; the scripts put the repository root on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

#: The distributions whose numerics reach a benchmark's figures: the array and model libraries, the encoders'
#: runtimes, the store engine and the transports. Missing ones are recorded as None.
PACKAGES = (
    "numpy",
    "scipy",
    "scikit-learn",
    "xgboost",
    "betacal",
    "torch",
    "torchvision",
    "onnxruntime",
    "opencv-python-headless",
    "sentence-transformers",
    "transformers",
    "tokenizers",
    "qdrant-edge-py",
    "qdrant-client",
    "grpcio",
    "protobuf",
    "faiss-cpu",
)

#: CPU features that change which kernels numpy, XGBoost, ONNX Runtime and torch pick (and so their rounding).
SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends at the first blank line
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def machine_info(packages: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """CPU (model, family/model/stepping, SIMD features), core count, Python, OS and the versions of ``packages``."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_id": "/".join(cpu.get(k, "?") for k in ("cpu family", "model", "stepping")) if cpu else None,
        "simd": [f for f in SIMD if f in flags],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def fingerprint(info: dict[str, Any]) -> str:
    """10 hex digits naming an environment: the same CPU, Python and package versions give the same value.
    The core count and the OS string are left out (neither changes a single-process result here)."""
    keyed = {k: info.get(k) for k in ("cpu", "cpu_id", "simd", "python", "packages")}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
