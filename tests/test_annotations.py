"""Every annotation in the packages names something that exists.

ruff (ANN rules) makes sure functions outside tests/ carry type hints; with ``from __future__ import annotations``
and names imported under ``if TYPE_CHECKING:`` nothing evaluates those hints at run time, so a renamed class or a
stale import would go unnoticed. This resolves every function's and method's hints the way a type checker would
see them: the module's globals plus its ``TYPE_CHECKING`` imports.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import typing
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "labeling", "embedder")
# generated protobuf/gRPC code and its package: not ours to annotate
SKIP_PREFIXES = ("embedstore.",)


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}.")]
    return [n for n in names if not n.startswith(SKIP_PREFIXES)]


def _type_checking_namespace(module: ModuleType) -> dict[str, object]:
    """The names a module imports under ``if TYPE_CHECKING:``, imported for real."""
    ns: dict[str, object] = {}
    source = inspect.getsource(module)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            block = ast.Module(body=node.body, type_ignores=[])
            exec(compile(block, module.__file__ or module.__name__, "exec"), {"__name__": module.__name__}, ns)
    return ns


def _functions(module: ModuleType) -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: checked in its own module
        if inspect.isfunction(obj):
            found.append((name, obj))
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                fn = member.__func__ if isinstance(member, classmethod | staticmethod) else member
                if isinstance(member, property):
                    fn = member.fget
                if inspect.isfunction(fn) and fn.__module__ == module.__name__:
                    found.append((f"{name}.{attr}", fn))
    return found


@pytest.mark.parametrize("module_name", _modules())
def test_every_annotation_resolves(module_name: str) -> None:
    module = importlib.import_module(module_name)
    ns = {**vars(module), **_type_checking_namespace(module)}
    bad = []
    for qualname, fn in _functions(module):
        try:
            typing.get_type_hints(fn, globalns=ns)
        except Exception as exc:  # NameError for a stale name, TypeError for a malformed hint
            bad.append(f"{module_name}.{qualname}: {type(exc).__name__}: {exc}")
    assert not bad, "\n".join(bad)


def test_a_stale_name_is_caught() -> None:
    """The check itself: a hint naming a class the module never imports fails to resolve."""
    module = ModuleType("stale_example")
    exec(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pathlib import Path\n"
        "def ok(p: Path) -> None: ...\n"
        "def stale(p: PurePathz) -> None: ...\n",
        module.__dict__,
    )
    ns = {**vars(module), "Path": Path}
    typing.get_type_hints(module.__dict__["ok"], globalns=ns)
    with pytest.raises(NameError, match="PurePathz"):
        typing.get_type_hints(module.__dict__["stale"], globalns=ns)
