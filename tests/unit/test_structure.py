"""The package boundaries of DESIGN.md, enforced by reading every module's imports."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = {"llada_core", "pipelines", "jobs", "serve"}
# Third-party roots a package must never import (project packages are checked separately).
FORBIDDEN_THIRD_PARTY = {
    "llada_core": {"ray", "deepspeed", "boto3", "botocore", "pyarrow", "fastapi"},
    "pipelines": {"deepspeed", "fastapi"},
    "jobs": {"fastapi"},
    "serve": {"deepspeed"},
}
ALLOWED_PROJECT_IMPORTS = {
    "llada_core": {"llada_core"},
    "pipelines": {"llada_core", "pipelines"},
    "jobs": {"llada_core", "pipelines", "jobs"},
    "serve": {"llada_core", "pipelines", "serve"},
}
TRANSFORMERS_ALLOWED_IN_CORE = {"llada_core/hf.py"}
# The `llada` CLI lives in jobs/ and offers `llada serve`: only its command module may reach serve/.
# jobs/infra.py renders a RayService's serveConfigV2 with serve's own printer, so the two cannot drift.
SERVE_ALLOWED_IN_JOBS = {"jobs/commands.py", "jobs/infra.py"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(PROJECT_PACKAGES))
def test_package_import_rule(package):
    violations = []
    for path in modules_of(package):
        rel = path.relative_to(ROOT).as_posix()
        roots = imported_roots(path)
        for root in roots & FORBIDDEN_THIRD_PARTY[package]:
            violations.append(f"{rel} imports {root}")
        for root in (roots & PROJECT_PACKAGES) - ALLOWED_PROJECT_IMPORTS[package]:
            if not (root == "serve" and rel in SERVE_ALLOWED_IN_JOBS):
                violations.append(f"{rel} imports {root}")
        if package == "llada_core" and "transformers" in roots and rel not in TRANSFORMERS_ALLOWED_IN_CORE:
            violations.append(f"{rel} imports transformers (only llada_core/hf.py may)")
    assert not violations, "package import rule broken:\n" + "\n".join(violations)


def test_the_rule_checker_sees_imports():
    assert {"torch", "ray", "llada_core"} <= imported_roots(Path(__file__).parent / "_import_probe.py")


def test_core_never_hardcodes_cuda():
    offenders = [
        p.relative_to(ROOT).as_posix() for p in modules_of("llada_core")
        if ".cuda(" in p.read_text() or "device=\"cuda\"" in p.read_text() or "device='cuda'" in p.read_text()
    ]
    assert not offenders, f"use the input's device, not .cuda(): {offenders}"
