"""benchmarks/machine.py: what a benchmark ran on (read from this machine, not mocked)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import _cpuinfo, fingerprint, machine_info  # noqa: E402


def test_machine_info_records_the_installed_versions_and_none_for_a_missing_package():
    info = machine_info(("numpy", "no-such-distribution-embedstore"))
    assert info["packages"] == {"numpy": np.__version__, "no-such-distribution-embedstore": None}
    assert info["python"] == ".".join(map(str, sys.version_info[:3])) and info["cpus"] >= 1
    assert isinstance(info["cpu"], str) and isinstance(info["simd"], list)


def test_fingerprint_follows_cpu_python_and_packages_but_not_the_core_count():
    info = machine_info()
    same = {**info, "cpus": (info["cpus"] or 1) + 8, "platform": "elsewhere"}
    assert fingerprint(info) == fingerprint(same) and len(fingerprint(info)) == 10
    other_xgboost = {**info, "packages": {**info["packages"], "xgboost": "0.0.1"}}
    other_cpu = {**info, "simd": [*info["simd"], "avx512f"]}
    assert len({fingerprint(info), fingerprint(other_xgboost), fingerprint(other_cpu)}) == 3


def test_cpuinfo_reads_the_first_processor_only(tmp_path):
    text = "processor\t: 0\nmodel name\t: First CPU\nflags\t\t: fpu avx2\n\nprocessor\t: 1\nmodel name\t: Second\n"
    (tmp_path / "cpuinfo").write_text(text)
    fields = _cpuinfo(tmp_path / "cpuinfo")
    assert fields["model name"] == "First CPU" and fields["flags"] == "fpu avx2"
    assert _cpuinfo(tmp_path / "missing") == {}
