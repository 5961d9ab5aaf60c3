"""The layout rules of README "Layout": which top-level package may import which. Every import counts, at module
level or inside a function, absolute or relative."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "kernels", "server", "cli", "bench")
FORBIDDEN = {
    "engine": {"server", "cli", "bench"},
    "kernels": {"server", "cli", "bench"},
    "server": {"bench", "cli"},
    "bench": {"cli"},
}


def module_parts(path: Path, root: Path) -> list[str]:
    """["mtpserve", "server", "app"] for ``root``/server/app.py; a package is named by its __init__.py."""
    parts = ["mtpserve", *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return parts


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """The dotted names ``path`` imports, relative imports resolved; ``from A import b`` gives A and A.b."""
    names = set()
    package = module_parts(path, root)
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            for alias in node.names:
                names.add(f"{module}.{alias.name}")
    return names


def imported_packages(path: Path, root: Path = REPO) -> set[str]:
    """The top-level packages of mtpserve that ``path`` imports."""
    out = set()
    for name in imported_modules(path, root):
        parts = name.split(".")
        if len(parts) > 1 and parts[0] == "mtpserve" and parts[1] in PACKAGES:
            out.add(parts[1])
    return out


def package_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def package_graph() -> dict[str, set[str]]:
    """package -> the other packages its files import."""
    graph = {}
    for package in PACKAGES:
        edges = set()
        for path in package_files(package):
            edges |= imported_packages(path)
        edges.discard(package)
        graph[package] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path that ends where it starts, or None (depth-first search)."""
    state = {}  # node -> "open" while on the current path, "done" once every path from it is checked

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_imports_are_read_everywhere_in_a_file(tmp_path):
    (tmp_path / "server").mkdir()
    path = tmp_path / "server" / "x.py"
    path.write_text("import mtpserve.kernels.rotary\n"
                    "from mtpserve import engine\n"
                    "def f():\n"
                    "    from ..bench import loadgen\n"
                    "    from . import app\n"
                    "class C:\n"
                    "    def g(self):\n"
                    "        from mtpserve.cli.main import main\n")
    assert imported_packages(path, tmp_path) == {"kernels", "engine", "bench", "cli", "server"}


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": set(), "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_packages_import_only_what_they_may():
    wrong = []
    for package, forbidden in FORBIDDEN.items():
        for path in package_files(package):
            for imported in sorted(imported_packages(path) & forbidden):
                wrong.append(f"{path.relative_to(REPO)} imports {imported}/")
    assert not wrong, "layout rules broken (see README, Layout):\n" + "\n".join(wrong)


def test_no_cycle_between_packages():
    graph = package_graph()
    assert graph["cli"] >= {"engine", "server", "bench"}  # the walk sees the imports at all
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between top-level packages: {' -> '.join(cycle)}"


def test_public_api_is_lazy():
    """``import mtpserve`` stays cheap (no torch); its exports resolve on first use."""
    code = ("import sys, mtpserve\n"
            "assert 'torch' not in sys.modules\n"
            "for name in mtpserve.__all__:\n"
            "    assert getattr(mtpserve, name).__name__ == name\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO.parent)
