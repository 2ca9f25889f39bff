"""Generate (or check) the Python gRPC code for protos/embedstore/v1/*.proto.

    python protos/generate.py          # write protos/embedstore/v1/*_pb2{,_grpc}.py and .pyi
    python protos/generate.py --check  # exit 1 if the committed code differs from a fresh generation

Decision: the generated code is committed (users need no protoc at install
time) and pinned to the grpcio-tools version in pyproject's ``test`` extra; a
test regenerates it and fails on any difference. The output mirrors the proto
package path (``embedstore/v1``), which setuptools installs as the Python
package ``embedstore.v1`` (``package-dir`` in pyproject), so the generated
absolute imports (``from embedstore.v1 import types_pb2``) resolve.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "embedstore" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def protos() -> list[Path]:
    return sorted(PACKAGE.glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every proto into ``out``; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(ROOT)) for p in protos()]
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {files}")
    return sorted(p for p in (out / "embedstore" / "v1").iterdir() if p.name.endswith(SUFFIXES))


def check() -> list[str]:
    """Names of generated files that are missing, stale or extra in the checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        committed = {p.name: p for p in PACKAGE.iterdir() if p.name.endswith(SUFFIXES)}
        problems = [f"missing: {n}" for n in sorted(fresh.keys() - committed.keys())]
        problems += [f"extra: {n}" for n in sorted(committed.keys() - fresh.keys())]
        problems += [
            f"stale: {n}"
            for n in sorted(fresh.keys() & committed.keys())
            if not filecmp.cmp(fresh[n], committed[n], shallow=False)
        ]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if args.check:
        problems = check()
        for p in problems:
            print(p)
        if problems:
            print("generated gRPC code is out of date: run `make protos`", file=sys.stderr)
        return 1 if problems else 0
    for p in generate(ROOT):
        print(p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
