"""The layout: every module imports; the hub's parts depend on each other without a cycle; the SDK and the simulator
stand apart from the hub (README, "Layout")."""

from __future__ import annotations

import ast
import graphlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / "hub"
#: Sub-packages: the hub's parts.
PARTS = sorted(p.name for p in HUB.iterdir() if (p / "__init__.py").exists())
#: Modules at the top of hub/ that several parts import; they import no part.
SHARED = {"config", "stats", "ratelimit", "logs", "control_codes", "gctune"}
#: Modules at the top of hub/ that put the parts together (the server's tree, the `hub` command, the demo).
ASSEMBLY = {"app", "cli", "demo"}


def modules(package: str) -> list[str]:
    """Every module of a top-level package on disk, as a dotted name."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # importing it would run the program
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def source(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported(module: str) -> Iterator[str]:
    """The modules `module` imports (anywhere in it: top level, functions, TYPE_CHECKING), as dotted names."""
    tree = ast.parse(source(module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from hub import fleet` imports hub.fleet
                if (ROOT.joinpath(*node.module.split("."), alias.name)).is_dir() or source(
                    f"{node.module}.{alias.name}"
                ).exists():
                    yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{module}: relative import")  # absolute imports keep this test simple


def part_of(module: str) -> str | None:
    """The part of the hub (sub-package or top-level module name) a dotted hub module belongs to; None outside hub."""
    bits = module.split(".")
    return bits[1] if bits[0] == "hub" and len(bits) > 1 else None


def hub_edges() -> dict[str, set[str]]:
    """Part -> the other parts it imports."""
    graph: dict[str, set[str]] = {}
    for module in modules("hub"):
        here = part_of(module)
        if here is None:
            continue
        graph.setdefault(here, set())
        for target in imported(module):
            there = part_of(target)
            if there is not None and there != here:
                graph[here].add(there)
    return graph


@pytest.mark.parametrize("package", ["hub", "device_client", "firmware_sim"])
def test_every_module_imports(package: str) -> None:
    for module in modules(package):
        importlib.import_module(module)


def test_the_parts_are_the_documented_ones() -> None:
    assert PARTS == ["cluster", "control", "devices", "edge", "fleet", "ingest", "operator", "ops", "web"]
    top = {p.stem for p in HUB.glob("*.py")} - {"__init__"}
    assert top == SHARED | ASSEMBLY


def test_no_import_cycle_between_parts() -> None:
    graph = hub_edges()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle between parts of the hub: {' -> '.join(exc.args[1])}")
    assert set(order) >= set(PARTS)


def test_shared_modules_import_no_part_and_parts_import_no_assembly() -> None:
    graph = hub_edges()
    for name in SHARED:
        assert graph.get(name, set()) <= SHARED, name
    for part in PARTS:
        assert not graph[part] & ASSEMBLY, part


def test_only_the_demo_imports_the_simulator() -> None:
    for module in modules("hub"):
        if module != "hub.demo":
            assert not any(t.partition(".")[0] == "firmware_sim" for t in imported(module)), module


@pytest.mark.parametrize("package", ["device_client", "firmware_sim"])
def test_the_sdk_and_the_simulator_import_nothing_of_the_hub(package: str) -> None:
    for module in modules(package):
        assert not any(t.partition(".")[0] == "hub" for t in imported(module)), module


def test_outside_a_part_only_its_public_names_are_imported() -> None:
    for package in ("hub", "bench", "firmware_sim"):
        for module in modules(package):
            for target in imported(module):
                bits = target.split(".")
                if bits[0] == "hub" and len(bits) > 2 and bits[2].startswith("_"):
                    assert part_of(module) == bits[1], f"{module} imports {target}"


@pytest.mark.parametrize("part", PARTS)
def test_each_part_says_what_it_does_and_exports_real_names(part: str) -> None:
    package = importlib.import_module(f"hub.{part}")
    assert package.__doc__ and package.__doc__.strip()
    assert package.__all__ and len(set(package.__all__)) == len(package.__all__)
    for name in package.__all__:
        assert hasattr(package, name), f"hub.{part}.{name}"
    privates = {p.stem for p in (HUB / part).glob("*.py")} - {"__init__"}
    public = {"ctl"} if part == "operator" else set()  # hubctl's entry point
    assert privates - public and all(p.startswith("_") for p in privates - public), privates
