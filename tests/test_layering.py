"""The layering contract (issue 18): the runtime never imports the demo layer.

import-linter checks the contracts declared in pyproject.toml (imports inside functions included);
this test runs it and also checks that the runtime contract lists every runtime module, so a new
module is covered without editing the contract by hand being forgotten. A cross-package import of a
private name (``from optimizer.zoo.build import _meter``) is refused as well: what another package
uses is public. And each module says its one job in a docstring and stays small (item 6).
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest
import tomllib

import objectives
import optimizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = {"optimizer.zoo", "optimizer.experiments", "optimizer.testing"}


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_import_linter_contracts_are_kept() -> None:
    from importlinter.api import read_configuration  # noqa: F401 - the package is installed (dev extra)
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0, "run `lint-imports` to see the broken contract"


def test_runtime_contract_lists_every_runtime_module() -> None:
    contract = _contracts()["runtime"]
    assert set(contract["forbidden_modules"]) == DEMO
    children = {f"optimizer.{m.name}" for m in pkgutil.iter_modules(optimizer.__path__)}
    runtime = (children - DEMO) | {"objectives"}
    assert set(contract["source_modules"]) == runtime, "add the new runtime module to [tool.importlinter] in pyproject.toml"


def _modules(package) -> list[tuple[str, Path]]:
    base = Path(package.__path__[0])
    out = []
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(base.parent).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def _top(name: str) -> str:
    """The layer a module belongs to: ``optimizer.zoo``, ``optimizer.study``, ``objectives``, ..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "optimizer" else parts[0]


@pytest.mark.parametrize("package", [optimizer, objectives], ids=["optimizer", "objectives"])
def test_no_private_names_cross_packages(package) -> None:
    offenders = []
    for module, path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in ("optimizer", "objectives"):
                if _top(node.module) == _top(module):
                    continue
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(private)} from {node.module}")
    assert not offenders, "\n".join(offenders)


def test_zoo_arrives_as_a_plug_in() -> None:
    """The zoo's command group and its CLIP reach the runtime through entry points, not imports."""
    from optimizer.plugins import COMMANDS_GROUP, OPEN_CLIP_GROUP, entry_point

    assert entry_point(COMMANDS_GROUP, "zoo") is not None
    assert entry_point(OPEN_CLIP_GROUP, "evomerge-digits-clip") is not None
    assert entry_point(OPEN_CLIP_GROUP, "no-such-model") is None


#: the size a module may grow to before it holds more than one idea (issue 18: "about 500 lines")
MAX_MODULE_LINES = 550


@pytest.mark.parametrize("package", [optimizer, objectives], ids=["optimizer", "objectives"])
def test_every_module_says_its_job_and_stays_small(package) -> None:
    """Each module opens with a docstring (its one job) and stays under :data:`MAX_MODULE_LINES`."""
    undocumented, large = [], []
    for _, path in _modules(package):
        source = path.read_text()
        if source.strip() and not ast.get_docstring(ast.parse(source)):
            undocumented.append(str(path.relative_to(ROOT)))
        if source.count("\n") > MAX_MODULE_LINES:
            large.append(f"{path.relative_to(ROOT)} ({source.count(chr(10))} lines)")
    assert not undocumented, f"no module docstring: {', '.join(undocumented)}"
    assert not large, f"over {MAX_MODULE_LINES} lines, split by concern: {', '.join(large)}"
