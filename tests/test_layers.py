"""The import rule of docs/architecture.md: a module imports only from its own group or from lower layers."""

import ast
from pathlib import Path

import pytest

import medvar_bundle

PACKAGE = Path(medvar_bundle.__file__).parent
LAYERS = {
    "files": 0, "runtime": 0, "weights": 0,
    "data": 1, "networks": 1, "visualize": 1,
    "sampling": 2, "losses": 2, "metrics": 2, "model_file": 2,
    "engines": 3, "io": 3, "tokenize": 3,
    "inference": 4, "inpaint": 4,
    "evaluation": 5, "benchmark": 5,
    "bundle_run": 5,
    "bundle_config": 0,
    "cli": 6,
}  # fmt: skip


def group_of(module: str) -> str:
    """``medvar_bundle.data.store`` → ``data``."""
    return module.split(".")[1]


def imports_of(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """Every ``medvar_bundle`` module imported by the file at ``path`` (function-level imports too), with lines.

    ``source`` replaces the file's text (to check a probe without writing into the package).
    """
    module = "medvar_bundle." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("medvar_bundle.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "medvar_bundle":  # from medvar_bundle import x: x is the module
                found += [(node.lineno, f"medvar_bundle.{a.name}") for a in node.names]
            elif target.startswith("medvar_bundle."):
                found.append((node.lineno, target))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_has_a_layer():
    groups = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert groups <= set(LAYERS), f"modules without a layer in docs/architecture.md: {groups - set(LAYERS)}"


def violations(path: Path, source: str | None = None) -> list[str]:
    """The imports of ``path`` that point to its own layer's peers or upward, as readable lines."""
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    return [
        f"line {line}: {target} ({group_of(target)}, layer {LAYERS[group_of(target)]})"
        for line, target in imports_of(path, source)
        if group_of(target) != own and LAYERS[group_of(target)] >= LAYERS[own]
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    bad = violations(path)
    assert not bad, f"{path.relative_to(PACKAGE)} imports upward or sideways: {bad}"


def test_the_rule_catches_upward_relative_and_sideways_imports():
    """Known violations are reported: a sampler importing the engines (absolute and relative) or a peer."""
    sampler = PACKAGE / "sampling" / "medvar.py"
    clean = sampler.read_text()
    assert violations(sampler) == []
    upward = violations(sampler, clean + "\nfrom medvar_bundle.engines.common import evenly_spaced\n")
    assert len(upward) == 1 and "medvar_bundle.engines.common" in upward[0]
    relative = violations(sampler, clean + "\ndef f():\n    from ..engines import common\n")
    assert len(relative) == 1 and "medvar_bundle.engines" in relative[0]
    sideways = violations(sampler, clean + "\nfrom .. import model_file\n")
    assert len(sideways) == 1 and "model_file" in sideways[0]
    inside = violations(sampler, clean + "\nfrom . import guidance\n")
    assert inside == []
