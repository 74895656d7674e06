"""The device SDK stays importable without the hub or any database client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import device_client

SDK_DIR = Path(device_client.__file__).resolve().parent
REPO = SDK_DIR.parent
DIST = "trio-telemetry-hub"
BLOCKED = ("hub", "influxdb_client", "urllib3", "reactivex")
SERVER_ONLY = {"influxdb-client", "urllib3", "reactivex"}

# The child blocks the hub and the database client before anything else is imported, records
# every attempt (so an import guarded by try/except is caught too), imports the given modules,
# runs a tiny codec round trip, and prints one JSON report line.
CHILD = textwrap.dedent(
    """
    import importlib
    import importlib.abc
    import json
    import sys

    BLOCKED = {blocked!r}
    attempts = []
    preloaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)

    class BlockServerSide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{{name}} must not be imported by the device SDK")
            return None

    sys.meta_path.insert(0, BlockServerSide())
    errors = {{}}
    for module in {modules!r}:
        try:
            importlib.import_module(module)
        except Exception as exc:
            errors[module] = f"{{type(exc).__name__}}: {{exc}}"

    from device_client.protocol import Ack, Telemetry, decode, encode

    msg = decode(encode(Telemetry(3, [{{"measurement": "m", "ts": 1700000000000, "fields": {{"i": 1}}}}])))
    codec_ok = msg.seq == 3 and msg.points[0]["fields"] == {{"i": {{"int": 1}}}} and decode(encode(Ack(3))) == Ack(3)
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps({{"attempts": attempts, "errors": errors, "preloaded": preloaded, "loaded": loaded,
                      "codec_ok": codec_ok}}))
    """
)


def sdk_modules() -> list[str]:
    """Every module of the SDK package as it is on disk now, package first."""
    names = []
    for path in sorted(SDK_DIR.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # importing it would run the program
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return sorted(names, key=lambda n: (n.count("."), n))


def run_child(modules: list[str], extra_path: Path | None = None) -> dict[str, object]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    script = CHILD.format(blocked=BLOCKED, modules=modules)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_module_list_covers_the_sdk() -> None:
    modules = sdk_modules()
    assert modules[:1] == ["device_client"]
    assert "device_client.protocol" in modules
    for optional in ("client", "outbox"):
        if (SDK_DIR / f"{optional}.py").exists():
            assert f"device_client.{optional}" in modules


def test_sdk_imports_without_hub_or_database_client() -> None:
    report = run_child(sdk_modules())
    assert report["preloaded"] == []
    assert report["errors"] == {}
    assert report["attempts"] == []
    assert report["loaded"] == []
    assert report["codec_ok"] is True


@pytest.mark.parametrize(
    "statement",
    [
        "import hub.stats",
        "import influxdb_client",
        "from hub import config",
        "try:\n    import urllib3\nexcept ImportError:\n    urllib3 = None",
    ],
)
def test_the_guard_catches_a_server_side_import(tmp_path: Path, statement: str) -> None:
    # Proves the child can fail: a stand-in SDK module with the forbidden import is reported.
    (tmp_path / "sdk_standin.py").write_text(f"import device_client.protocol\n{statement}\n")
    report = run_child(["device_client", "sdk_standin"], extra_path=tmp_path)
    assert report["attempts"], report
    assert report["loaded"] == []


def _base_and_extras(requirements: list[str], extra_names: list[str]) -> tuple[set[str], dict[str, set[str]]]:
    base: set[str] = set()
    extras: dict[str, set[str]] = {}
    for line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            base.add(name)
        for extra in extra_names:
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                extras.setdefault(name, set()).add(extra)
    return base, extras


def test_installed_metadata_keeps_the_database_client_in_extras() -> None:
    dist = metadata.distribution(DIST)
    base, extras = _base_and_extras(dist.requires or [], dist.metadata.get_all("Provides-Extra") or [])
    assert "trio" in base
    assert not base & SERVER_ONLY, base
    assert extras.get("influxdb-client", set()) <= {"hub", "test", "bench"}
    assert "hub" in extras.get("influxdb-client", set())


def test_pyproject_keeps_the_database_client_in_extras() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert "trio" in base
    assert not base & SERVER_ONLY, base
    for extra, reqs in project.get("optional-dependencies", {}).items():
        names = {canonicalize_name(Requirement(r).name) for r in reqs}
        if "influxdb-client" in names:
            assert extra in {"hub", "test", "bench"}, extra
