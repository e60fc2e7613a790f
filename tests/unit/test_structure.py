"""The package boundaries of DESIGN.md, enforced by reading every module's imports (no
whitelist), and no import cycle between the project's modules."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = {"llada", "llada_core", "pipelines", "jobs", "serve"}
# Third-party roots a package must never import (project packages are checked separately).
FORBIDDEN_THIRD_PARTY = {
    "llada": set(),
    "llada_core": {"ray", "deepspeed", "boto3", "botocore", "pyarrow", "fastapi"},
    "pipelines": {"deepspeed", "fastapi"},
    "jobs": {"fastapi"},
    "serve": {"deepspeed"},
}
ALLOWED_PROJECT_IMPORTS = {
    "llada": PROJECT_PACKAGES,  # the front door may import everything
    "llada_core": {"llada_core"},
    "pipelines": {"llada_core", "pipelines"},
    "jobs": {"llada_core", "pipelines", "jobs"},
    "serve": {"llada_core", "pipelines", "serve"},
}
TRANSFORMERS_ALLOWED_IN_CORE = {"llada_core/hf.py"}


def imported_names(path: Path) -> set[str]:
    """Every module name a file imports, anywhere in it (function-level imports included):
    ``import a.b`` -> a.b; ``from a.b import c`` -> a.b.c (a module or a name in a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def imported_roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_names(path)}


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PROJECT_PACKAGES for path in modules_of(package)}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in: itself, or the longest module prefix."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = {resolve(name, modules) for name in imported_names(path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None. Depth-first, iterative."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


@pytest.mark.parametrize("package", sorted(PROJECT_PACKAGES))
def test_package_import_rule(package):
    violations = []
    for path in modules_of(package):
        rel = path.relative_to(ROOT).as_posix()
        roots = imported_roots(path)
        for root in roots & FORBIDDEN_THIRD_PARTY[package]:
            violations.append(f"{rel} imports {root}")
        for root in (roots & PROJECT_PACKAGES) - ALLOWED_PROJECT_IMPORTS[package]:
            violations.append(f"{rel} imports {root}")
        if package == "llada_core" and "transformers" in roots and rel not in TRANSFORMERS_ALLOWED_IN_CORE:
            violations.append(f"{rel} imports transformers (only llada_core/hf.py may)")
    assert not violations, "package import rule broken:\n" + "\n".join(violations)


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}) == ["b", "b2", "b"]


def test_the_rule_checker_sees_imports():
    probe = Path(__file__).parent / "_import_probe.py"
    assert {"torch", "ray", "llada_core"} <= imported_roots(probe)


def test_the_graph_sees_function_level_imports_between_project_modules():
    graph = import_graph()
    assert "llada.commands" in graph["llada.cli"]  # imported inside build_parser()


def test_core_never_hardcodes_cuda():
    offenders = [
        p.relative_to(ROOT).as_posix() for p in modules_of("llada_core")
        if ".cuda(" in p.read_text() or "device=\"cuda\"" in p.read_text() or "device='cuda'" in p.read_text()
    ]
    assert not offenders, f"use the input's device, not .cuda(): {offenders}"


def test_no_two_test_files_share_a_name():
    """The test folders have no __init__.py, so pytest imports each test file by its bare name: two
    files of one name stop a full `pytest tests` at collection ("import file mismatch") even
    though each folder passes alone (it happened once, with test_resume.py)."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen.setdefault(path.name, path)
    assert not clashes, f"test files with the same name: {clashes}"
