"""The layout the README describes, held by tests: imports run one way and every piece stays small.

Imports are read with `ast` from the source, so a lazy import inside a function counts as much as a
top-level one: the rules are about which module may know about which, not about import time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import lora_doctor

PKG_DIR = Path(lora_doctor.__file__).parent
PKG = "lora_doctor"

MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 60

# Modules allowed over MAX_MODULE_LINES, with their line counts. None at present; a row may only go down:
# a listed module that grows past its recorded count fails too.
MODULE_ALLOW: dict[str, int] = {}

# Functions over MAX_FUNCTION_LINES today ("path:function": lines), under the same rule. None at present.
FUNCTION_ALLOW: dict[str, int] = {}


@lru_cache(maxsize=None)
def _modules() -> tuple[tuple[str, Path, ast.Module], ...]:
    """(dotted name, path, parsed tree) of every module in the package."""
    out = []
    for path in sorted(PKG_DIR.rglob("*.py")):
        parts = path.relative_to(PKG_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))))
    return tuple(out)


def _rel(path: Path) -> str:
    return path.relative_to(PKG_DIR.parent).as_posix()


def _imports(name: str, path: Path, tree: ast.Module) -> set[str]:
    """Absolute names of every module this one imports, anywhere in it; `from a import b` yields a and a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _importers(predicate) -> list[str]:
    """'module imports X' for every (module, import) the predicate flags."""
    return [f"{_rel(path)} imports {imp}" for name, path, tree in _modules()
            for imp in sorted(_imports(name, path, tree)) if predicate(name, imp)]


def _is(imp: str, module: str) -> bool:
    return imp == module or imp.startswith(module + ".")


def _in(name: str, *modules: str) -> bool:
    return any(_is(name, f"{PKG}.{m}") for m in modules)


# --- import direction ---------------------------------------------------------------------------------


def test_import_reader_resolves_relative_imports():
    tree = ast.parse("from .. import hardware\nfrom ..diagnose import PlanBasis\nfrom . import tables\n"
                     "def f():\n    import torch\n")
    found = _imports("lora_doctor.report.plan", PKG_DIR / "report" / "plan.py", tree)
    assert {"lora_doctor.hardware", "lora_doctor.diagnose", "lora_doctor.report.tables", "torch"} <= found


def test_function_reader_names_methods_and_nested_functions():
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\ndef h():\n    pass\n")
    assert [q for q, _ in _qualified_functions(tree)] == ["A.f", "A.f.g", "h"]


def test_nothing_imports_the_cli():
    offenders = _importers(lambda name, imp: _is(imp, f"{PKG}.cli"))
    assert not offenders, "cli.py is the boundary; nothing imports it:\n" + "\n".join(offenders)


def test_report_imports_no_torch():
    offenders = _importers(lambda name, imp: _in(name, "report") and _is(imp, "torch"))
    assert not offenders, "report/ renders numbers and imports no torch:\n" + "\n".join(offenders)


def test_report_pulls_in_no_torch_at_import():
    """What report/ imports from the package must not import torch at load time either."""
    code = ("import importlib, pkgutil, sys, lora_doctor.report as r\n"
            "[importlib.import_module('lora_doctor.report.' + m.name) for m in pkgutil.iter_modules(r.__path__)]\n"
            "print(','.join(k for k in ('torch', 'transformers', 'peft', 'click') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG_DIR.parent)
    assert out.stdout.strip() == ""


def test_specs_import_only_errors_from_the_package():
    offenders = _importers(lambda name, imp: name == f"{PKG}.specs" and _is(imp, PKG)
                           and not _in(imp, "errors"))
    assert not offenders, "specs.py is the bottom layer:\n" + "\n".join(offenders)


def test_engine_diagnose_budget_introspect_never_import_commands():
    lower = ("engine", "diagnose", "budget", "introspect")
    offenders = _importers(lambda name, imp: _in(name, *lower) and _in(imp, "commands"))
    assert not offenders, "imports run cli -> commands -> engine/diagnose/budget/introspect:\n" + "\n".join(offenders)


def test_only_hardware_imports_pynvml():
    offenders = _importers(lambda name, imp: name != f"{PKG}.hardware" and _is(imp, "pynvml"))
    assert not offenders, "NVML opens in hardware.py only (hardware.nvml()):\n" + "\n".join(offenders)


def test_runconfig_imports_no_click():
    offenders = _importers(lambda name, imp: name == f"{PKG}.runconfig" and _is(imp, "click"))
    assert not offenders, "Click options live in commands/options.py:\n" + "\n".join(offenders)


# --- size --------------------------------------------------------------------------------------------


def _module_lines() -> dict[str, int]:
    return {_rel(path): len(path.read_text(encoding="utf-8").splitlines()) for _, path, _ in _modules()}


def _qualified_functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function, methods and nested ones included ('Engine.setup')."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qualname = prefix + node.name
            if not isinstance(node, ast.ClassDef):
                yield qualname, node
            yield from _qualified_functions(node, qualname + ".")
        else:
            yield from _qualified_functions(node, prefix)


def _function_lines() -> dict[str, int]:
    return {f"{_rel(path)}:{qualname}": node.end_lineno - node.lineno + 1
            for _, path, tree in _modules() for qualname, node in _qualified_functions(tree)}


def _over(sizes: dict[str, int], limit: int, allow: dict[str, int]) -> list[str]:
    return [f"{key}: {n} lines (limit {limit}" + (f", allowed {allow[key]})" if key in allow else ")")
            for key, n in sorted(sizes.items()) if n > allow.get(key, limit)]


def test_no_module_over_the_limit():
    offenders = _over(_module_lines(), MAX_MODULE_LINES, MODULE_ALLOW)
    assert not offenders, "split these modules by concern:\n" + "\n".join(offenders)


def test_no_function_over_the_limit():
    offenders = _over(_function_lines(), MAX_FUNCTION_LINES, FUNCTION_ALLOW)
    assert not offenders, "split these functions into named steps:\n" + "\n".join(offenders)


def test_allow_lists_name_only_real_offenders():
    """A row whose module shrank under the limit (or was removed) must be deleted, so the list only shrinks."""
    modules, functions = _module_lines(), _function_lines()
    stale = [k for k in MODULE_ALLOW if modules.get(k, 0) <= MAX_MODULE_LINES]
    stale += [k for k in FUNCTION_ALLOW if functions.get(k, 0) <= MAX_FUNCTION_LINES]
    assert not stale, "delete these allow-list rows, they are within the limit now:\n" + "\n".join(stale)


def test_size_check_reports_offenders_by_name():
    assert _over({"a.py": 500, "b.py": 10, "c.py": 430}, 420, {"c.py": 440}) == ["a.py: 500 lines (limit 420)"]
    assert _over({"c.py": 450}, 420, {"c.py": 440}) == ["c.py: 450 lines (limit 420, allowed 440)"]
