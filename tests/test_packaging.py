"""setup.py's runtime dependencies each pay for themselves: some module of
the project imports every package that ``REQUIRED`` installs."""

import ast
import pathlib
from importlib import metadata

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "transforms", "model")


def _required() -> list[str]:
    """``REQUIRED`` of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and \
                any(getattr(t, "id", None) == "REQUIRED" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py assigns no REQUIRED")


def _imported_top_levels() -> set[str]:
    """Top-level names that the project's own modules import (anywhere in
    a module, lazy imports inside functions included)."""
    names = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module \
                        and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_every_required_package_is_imported_by_the_project():
    by_distribution: dict[str, set[str]] = {}
    for top_level, distributions in metadata.packages_distributions().items():
        for distribution in distributions:
            by_distribution.setdefault(_normalise(distribution), set()).add(
                top_level)
    imported = _imported_top_levels()
    unused = []
    for requirement in map(Requirement, _required()):
        provides = by_distribution.get(_normalise(requirement.name))
        assert provides, f"{requirement.name} is not installed here"
        if not provides & imported:
            unused.append(requirement.name)
    assert not unused, f"setup.py REQUIRED pins packages nothing imports: {unused}"
