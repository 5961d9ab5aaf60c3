"""Reproducible installs: every module the code and the tests import comes from a distribution that pyproject.toml
declares, and constraints.txt pins every declared distribution to one version."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ["bench", "cli", "docker", "engine", "kernels", "server", "tests"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def declared() -> dict[str, set[str]]:
    """Declared distribution names: 'main' for the dependencies, and one set per extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {"main": {requirement_name(r) for r in project["dependencies"]}}
    for extra, requirements in project["optional-dependencies"].items():
        out[extra] = {requirement_name(r) for r in requirements}
    return out


def pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def imported_modules(directory: str) -> set[str]:
    """Top-level names of absolute imports in the .py files under ``directory``."""
    names = set()
    for path in (REPO / directory).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_declared_distribution_is_pinned():
    pins = pinned()
    for extra, names in declared().items():
        for name in names:
            assert name in pins, f"{name} ({extra}) is not pinned in constraints.txt: run make lock"
    assert pins["torch"] == re.search(r"torch==([\w.]+)", (REPO / "Makefile").read_text()).group(1)


def test_every_import_is_declared():
    local = {"mtpserve", "conftest"} | {p.stem for p in (REPO / "tests").glob("*.py")}
    distributions = packages_distributions()
    groups = declared()
    allowed = {"main": groups["main"], "tests": groups["main"] | groups["test"]}
    for directory in SOURCE_DIRS:
        names = imported_modules(directory) - local - set(sys.stdlib_module_names)
        scope = allowed["tests" if directory == "tests" else "main"]
        if directory == "bench":
            scope = scope | groups["bench"]
        if directory == "kernels":  # the Triton kernels, imported only when their backend runs
            scope = scope | groups["cuda"]
        for name in sorted(names):
            owners = {canonical(d) for d in distributions.get(name, [])}
            assert owners & scope, f"{directory}/ imports {name} (from {owners or 'nothing installed'}), " \
                                   f"which pyproject.toml does not declare"
