"""The package's layering: the client and the worker runtime meet only in
``workbench.wire``, and every error is a ``WorkbenchError`` (no engine)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import workbench
from workbench import errors, wire

PACKAGE = Path(workbench.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_client_side_modules_import_nothing_from_the_runtime():
    client_side = [path for path in PACKAGE.rglob("*.py") if "runtime" not in path.relative_to(PACKAGE).parts]
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(name for name in imported_modules(path) if "workbench.runtime" in name)
        for path in client_side
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_runtime_imports_no_client_module():
    allowed = {"workbench.wire", "workbench.ops", "workbench.specs", "workbench.errors", "workbench.model_layers"}
    offenders = {}
    for path in (PACKAGE / "runtime").glob("*.py"):
        ours = {name for name in imported_modules(path) if name.startswith("workbench")}
        bad = {name for name in ours if not name.startswith("workbench.runtime")} - allowed - {"workbench"}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_every_rpc_name_is_a_worker_extension_method():
    from workbench.runtime.worker import WorkbenchWorkerExtension

    names = [value for key, value in vars(wire.Rpc).items() if key.isupper()]
    assert names and all(callable(getattr(WorkbenchWorkerExtension, name, None)) for name in names)
    assert wire.WORKER_EXTENSION == f"{WorkbenchWorkerExtension.__module__}.{WorkbenchWorkerExtension.__name__}"


def test_every_exception_class_is_in_the_workbench_tree_and_exported():
    classes = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if cls.__module__ == errors.__name__]
    assert all(issubclass(cls, errors.WorkbenchError) for cls in classes)
    assert {cls.__name__ for cls in classes} <= set(workbench.__all__)
    for cls in classes:  # the tree in the module docstring names each of them
        assert cls.__name__ in errors.__doc__, cls.__name__


def test_no_module_raises_builtin_errors_the_tree_covers():
    """Bare ValueError / RuntimeError / TimeoutError raised by our own code would
    escape ``except WorkbenchError``; the tree has a class for each such case."""
    builtins = {"ValueError", "RuntimeError", "TimeoutError", "KeyError", "IndexError"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(call, ast.Name) and call.id in builtins:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {call.id}")
    assert found == []
