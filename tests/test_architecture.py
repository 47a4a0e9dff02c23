"""The import rules docs/architecture.md states, checked on the source (no module is imported).

Every ``import`` and ``from ... import`` of the package is read with ``ast``, at any depth
(imports inside functions count: they run, only later).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "harness"
HEAVY = ("torch", "torchvision", "anomalib", "lightning", "timm")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every module ``name`` imports, as written (``harness.check.stats``, ``ray.tune``)."""
    tree = ast.parse(MODULES[name].read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES}
    return out


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in packages)


def offenders(allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Modules outside ``allowed`` that import anything under ``forbidden``."""
    found = {}
    for name in MODULES:
        if under(name, *allowed):
            continue
        bad = sorted(m for m in imports(name) if under(m, *forbidden))
        if bad:
            found[name] = bad
    return found


def test_the_rules_see_every_module() -> None:
    assert {"harness.check.load", "harness.report.sections", "harness.sweep.tasks", "harness.record"} <= set(MODULES)
    assert "harness.sweep.cluster" in imports("harness.sweep")
    assert "ray" in imports("harness.sweep.tasks")  # an import inside a function is seen


@pytest.mark.parametrize(
    ("owner", "library"),
    [(("harness.sweep",), ("ray",)), (("harness.tracking",), ("wandb",))],
)
def test_ray_and_wandb_each_live_in_one_place(owner: tuple[str, ...], library: tuple[str, ...]) -> None:
    assert offenders(owner, library) == {}


def test_the_analysis_layer_needs_no_training_stack() -> None:
    """check/ and report/ rebuild a verdict anywhere: no torch, anomalib, Ray or W&B, no run code."""
    light = ("harness.check", "harness.report", "harness.analysis", "harness.formatting", "harness.record")
    light += ("harness.store",)
    for name in MODULES:
        if under(name, *light):
            bad = [m for m in imports(name) if under(m, *HEAVY, "ray", "wandb")]
            bad += [m for m in imports(name) if under(m, "harness.sweep", "harness.tracking", "harness.run")]
            bad += [m for m in imports(name) if under(m, "harness.cli", "harness.demo", "harness.models")]
            assert not bad, (name, bad)


def test_the_base_modules_import_nothing_above_them() -> None:
    base = ("harness.errors", "harness.hashing", "harness.fsutil", "harness.formatting", "harness.malloc")
    for name in (*base, "harness.record"):
        above = [m for m in imports(name) if m.startswith("harness") and not under(m, *base)]
        assert not above, (name, above)


def test_only_the_cli_imports_the_cli_and_the_demo() -> None:
    assert offenders(("harness.cli", "harness.__main__"), ("harness.cli",)) == {}
    assert offenders(("harness.cli", "harness.demo"), ("harness.demo",)) == {}


def test_the_malloc_setting_is_the_one_the_package_defines() -> None:
    """The Makefile and the image set glibc's threshold for processes the CLI does not start."""
    from harness.malloc import MALLOC_ENV

    ((name, value),) = MALLOC_ENV.items()
    root = PACKAGE.parent
    assert f"export {name} := {value}" in (root / "Makefile").read_text()
    assert f"{name}={value}" in (root / "infra" / "Dockerfile").read_text()
