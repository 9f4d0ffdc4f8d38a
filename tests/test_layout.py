"""The package's module structure: no import circle among bnfold's modules.

A circle makes the import order matter (a name used before its module has finished running)
and says that two modules do one job between them. Imports inside functions count too: a lazy
import that closes a circle only hides it.
"""

import ast
import pathlib

import bnfold

PACKAGE = pathlib.Path(bnfold.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The bnfold modules that `path` imports, at its top or inside a function."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [node.module])])
            for alias in node.names:  # `from bnfold import wire` imports a module, not the package's names
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a path that comes back to its start), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        for imported in sorted(graph[name]):
            circle = visit(imported, [*path, name])
            if circle:
                return circle
        done.add(name)
        return None

    for name in sorted(graph):
        circle = visit(name, [])
        if circle:
            return circle
    return None


def test_layout_no_import_circle():
    graph = import_graph()
    assert "bnfold.graph" in graph and "bnfold.tensors" in graph["bnfold.graph"]  # the scan sees imports
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_layout_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_layout_cli_import_loads_neither_onnxruntime_nor_torch():
    """`bnfold --help` must start fast: onnxruntime and torch load only in the commands that
    run them (a module check, not a timing)."""
    import subprocess
    import sys

    code = "import sys, bnfold.cli; print(sorted(m for m in ('onnxruntime', 'torch') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_layout_version_is_pyproject_version():
    """`bnfold --version` prints bnfold.__version__ (no package metadata lookup at start-up):
    it must be the version pyproject.toml installs."""
    import re

    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == bnfold.__version__
