"""The code's shape: imports point downwards, CLI modules import in any order, one error hierarchy,
unique class names."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from models.errors import OrgsyncError, PermanentError, RetryableError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orgsync", "models", "webhooks", "worker", "emulator", "api", "console")
# Importing these builds a Celery app from the environment or runs the command line.
SKIP = frozenset({"worker.main", "orgsync.__main__"})
# The emulator stands in for Clerk and imports nothing of orgsync: its errors are Clerk's.
STAND_ALONE = ("emulator",)
# Bases that are neither retryable nor permanent themselves; every subclass is one or the other.
ABSTRACT_ERRORS = frozenset(
    {
        "models.errors.OrgsyncError",
        "models.errors.RetryableError",
        "models.errors.PermanentError",
        "worker.clerk.ClerkApiError",
        "orgsync.cli.base.CliError",
    }
)
# What each package may import of the others (and of Flask): the composition root
# (``orgsync``: CLI, Python API, the web app factory ``orgsync.web``) sits on top; the web
# surfaces (``webhooks``, ``api``) and the workers only reach down to ``models``.
MAY_IMPORT = {
    "orgsync": {"api", "console", "models", "webhooks", "worker", "emulator", "flask"},
    "console": {"models", "flask"},
    "webhooks": {"models", "flask"},
    "api": {"models", "flask"},
    "worker": {"models"},
    "models": set(),
    "emulator": {"flask"},
}
CLI_MODULES = sorted(
    f"orgsync.cli.{path.stem}" for path in (ROOT / "orgsync" / "cli").glob("*.py") if path.stem != "__init__"
)


def modules() -> Iterator[ModuleType]:
    for name in PACKAGES:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if info.name in SKIP or ".migrations" in info.name:
                continue
            yield importlib.import_module(info.name)


def own_classes() -> list[type]:
    found = []
    for module in modules():
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__ == module.__name__:
                found.append(value)
    return found


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def imported_packages(package: str) -> dict[str, set[str]]:
    """Every package (of ``MAY_IMPORT``) each module of ``package`` imports, lazily or not."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted((ROOT / package).rglob("*.py")):
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), where)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in MAY_IMPORT and top != package:
                    found[where].add(top)
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_point_downwards(package: str) -> None:
    wrong = {
        module: sorted(found - MAY_IMPORT[package])
        for module, found in imported_packages(package).items()
        if found - MAY_IMPORT[package]
    }
    assert wrong == {}


@pytest.mark.parametrize("module", ["orgsync.cli", *CLI_MODULES])
def test_each_cli_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_cli_base_imports_no_sibling_and_features_only_the_base() -> None:
    for name in CLI_MODULES:
        source = (ROOT / "orgsync" / "cli" / f"{name.rsplit('.', 1)[1]}.py").read_text()
        imported = {
            line.split()[1]
            for line in source.splitlines()
            if line.startswith(("from orgsync.cli", "import orgsync.cli"))
        }
        allowed = set() if name == "orgsync.cli.base" else {"orgsync.cli.base"}
        assert imported <= allowed, f"{name} imports {sorted(imported - allowed)}"


def test_every_error_derives_from_retryable_or_permanent() -> None:
    errors = [cls for cls in own_classes() if issubclass(cls, BaseException)]
    assert len(errors) > 20
    outside = [
        qualified(cls)
        for cls in errors
        if not cls.__module__.startswith(STAND_ALONE)
        and not (
            issubclass(cls, (RetryableError, PermanentError))
            or (qualified(cls) in ABSTRACT_ERRORS and issubclass(cls, OrgsyncError))
        )
    ]
    assert outside == []


def test_error_names_end_in_error() -> None:
    badly_named = [
        qualified(cls)
        for cls in own_classes()
        if issubclass(cls, BaseException) and not cls.__name__.endswith("Error")
    ]
    assert badly_named == []


def test_no_two_classes_share_a_name() -> None:
    where: dict[str, set[str]] = defaultdict(set)
    for cls in own_classes():
        where[cls.__name__].add(cls.__module__)
    assert {name: sorted(found) for name, found in where.items() if len(found) > 1} == {}
