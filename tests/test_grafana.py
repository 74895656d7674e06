"""Grafana provisioning: the JSON and YAML checked, and every dashboard query run against data the hub itself wrote.

The query proof streams a simulated fleet through a real hub into a real InfluxDB 1.6, lets the hub write its own
points, then runs each panel, annotation and variable query of each dashboard with Grafana's macros substituted the
way Grafana does, and asserts every one returns series with values. No Grafana server runs here: panel rendering,
transformations and the provisioning itself are not exercised (see docs/grafana.md).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import socket
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from firmware_sim.fleet import run_fleet
from firmware_sim.sensors import MODELS, make_device
from hub import cli
from tests.hubtools import add_devices, connect, hello, hub_config, receive, start_hub, url
from tests.servers import InfluxDB1
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "influxdb.yaml"
TOKEN_DATASOURCE = GRAFANA / "variants" / "influxdb-token.yaml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "telemetry-hub.yaml"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DASHBOARD_NAMES = ("fleet-overview", "device-detail", "hub-health")

#: Variables Grafana defines itself (InfluxQL macros, alias patterns, data-link and URL variables).
BUILTIN = {"timeFilter", "interval", "col", "m", "measurement"}
_VAR = re.compile(r"\$\{([A-Za-z0-9_.]+)(?::[^}]*)?\}|\[\[([A-Za-z0-9_.]+)\]\]|\$([A-Za-z_][A-Za-z0-9_]*)")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def provisioned() -> dict[str, Any]:
    (source,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    return source


def queries(dash: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, query, result format) of every panel target, annotation and query variable."""
    for panel in dash["panels"]:
        for target in panel["targets"]:
            yield f"panel {panel['title']!r} {target['refId']}", target["query"], target["resultFormat"]
    for note in dash["annotations"]["list"]:
        yield f"annotation {note['name']!r}", note["query"], "table"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            yield f"variable {var['name']!r}", var["query"], "table"


def used_variables(dash: dict[str, Any]) -> set[str]:
    """Names of the variables referenced anywhere in the dashboard ($x, ${x}, ${x:fmt}, [[x]])."""
    text = json.dumps({k: v for k, v in dash.items() if k != "templating"})
    text += json.dumps([v["query"] for v in dash["templating"]["list"] if v["type"] == "query"])
    names = set()
    for match in _VAR.finditer(text):
        names.add(next(g for g in match.groups() if g))
    return names


# ---------------------------------------------------------------------------- static checks


def test_datasource_definitions() -> None:
    source = provisioned()
    assert (source["type"], source["access"], source["jsonData"]["version"]) == ("influxdb", "proxy", "InfluxQL")
    assert source["url"] == "${INFLUX_URL}" and source["jsonData"]["dbName"] == "${INFLUX_DB}"
    assert source["user"] == "${INFLUX_USER}" and source["secureJsonData"]["password"] == "${INFLUX_PASSWORD}"
    assert "password" not in source and "password" not in source["jsonData"]  # only in the encrypted part
    (token,) = yaml.safe_load(TOKEN_DATASOURCE.read_text())["datasources"]
    assert (token["uid"], token["name"], token["type"]) == (source["uid"], source["name"], source["type"])
    assert token["jsonData"]["httpHeaderName1"] == "Authorization"
    assert token["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUX_TOKEN}"
    assert token["jsonData"]["dbName"] == "${INFLUX_DB}" and token["url"] == "${INFLUX_URL}"


def test_dashboards_provider() -> None:
    (provider,) = yaml.safe_load(PROVIDER.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/var/lib/grafana/dashboards/")
    assert provider["allowUiUpdates"] is False


def test_dashboards_have_stable_unique_uids_titles_and_defaults() -> None:
    assert {p.stem for p in DASHBOARDS} == set(DASHBOARD_NAMES)
    dashes = [load(p) for p in DASHBOARDS]
    uids = [d["uid"] for d in dashes]
    assert uids == ["hub-device-detail", "hub-fleet-overview", "hub-health"]
    assert len({d["title"] for d in dashes}) == 3
    for dash in dashes:
        assert "id" not in dash or dash["id"] is None  # an id would clash between Grafana instances
        assert dash["time"]["from"].startswith("now-") and dash["time"]["to"] == "now"
        assert re.fullmatch(r"\d+[smh]", dash["refresh"]), dash["uid"]
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), dash["uid"]
        for panel in dash["panels"]:
            assert panel["title"] and panel["description"], (dash["uid"], panel["id"])
            assert panel["fieldConfig"]["defaults"]["unit"], (dash["uid"], panel["title"])
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_panels_do_not_overlap() -> None:
    for path in DASHBOARDS:
        cells: dict[tuple[int, int], str] = {}
        for panel in load(path)["panels"]:
            g = panel["gridPos"]
            for cell in itertools.product(range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])):
                assert cell not in cells, f"{path.stem}: {panel['title']!r} overlaps {cells[cell]!r}"
                cells[cell] = panel["title"]


def test_everything_queries_the_provisioned_datasource() -> None:
    ref = {"type": "influxdb", "uid": provisioned()["uid"]}
    for path in DASHBOARDS:
        dash = load(path)
        for panel in dash["panels"]:
            assert panel["datasource"] == ref, (path.stem, panel["title"])
            assert panel["targets"], (path.stem, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == ref, (path.stem, panel["title"])
                assert target["rawQuery"] is True and target["query"].startswith(("SELECT", "SHOW"))
        for item in dash["annotations"]["list"] + dash["templating"]["list"]:
            assert item["datasource"] == ref, (path.stem, item["name"])


def test_no_dangling_variables() -> None:
    for path in DASHBOARDS:
        dash = load(path)
        defined = {v["name"] for v in dash["templating"]["list"]}
        used = used_variables(dash)
        builtin = {n for n in used if n in BUILTIN or n.startswith(("__", "tag_"))}
        assert used - builtin == defined, f"{path.stem}: used {sorted(used - builtin)}, defined {sorted(defined)}"


def test_required_panels_variables_and_annotations() -> None:
    fleet, device, health = (load(GRAFANA / "dashboards" / f"{n}.json") for n in DASHBOARD_NAMES)
    titles = {p["title"] for p in fleet["panels"]}
    assert {"Devices online", "Devices late", "Devices offline", "Ingest rate", "Devices", "Top talkers"} <= titles

    (var,) = device["templating"]["list"]
    assert var["name"] == "device" and "device_status" in var["query"]
    notes = {a["name"]: a["query"] for a in device["annotations"]["list"]}
    assert '"device_status"' in notes["Presence"] and '"command"' in notes["Commands"]
    # One panel per sensor measurement the simulated firmware sends.
    sent = {p["measurement"] for model in MODELS for p in make_device(model, 1).read(1_764_000_000_000)}
    assert sent == {"environment", "battery", "power", "position", "radio"}
    device_queries = " ".join(q for _, q, _ in queries(device))
    for measurement in sent:
        assert f'FROM "{measurement}"' in device_queries, measurement

    health_sources = set(re.findall(r'FROM "(\w+)"', " ".join(q for _, q, _ in queries(health))))
    assert health_sources == {"hub", "hub_errors", "hub_commands"}


def test_queried_fields_exist() -> None:
    # Every field a telemetry panel reads is one the simulated firmware sends (a typo would show "No data").
    sent: dict[str, set[str]] = {}
    for model in MODELS:
        for p in make_device(model, 1).read(1_764_000_000_000):
            sent.setdefault(p["measurement"], set()).update(p["fields"])
    for path in DASHBOARDS:
        for where, query, _ in queries(load(path)):
            for inner in re.split(r"\(SELECT ", query):
                source = re.search(r'FROM "(\w+)"', inner)
                if source is None or source.group(1) not in sent:
                    continue
                select = inner.split(" FROM ", 1)[0]
                fields = set(re.findall(r'"(\w+)"', re.sub(r' AS "[^"]+"', "", select)))
                assert fields <= sent[source.group(1)], (path.stem, where, fields - sent[source.group(1)])


def test_docker_compose_is_valid_and_consistent() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"influxdb", "grafana", "redis", "hub-1", "hub-2", "haproxy"}
    assert services["influxdb"]["image"].startswith("influxdb:2")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).resolve().exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    datasource = (COMPOSE.parent / mounts["/etc/grafana/provisioning/datasources/influxdb.yaml"]).resolve()
    assert datasource == TOKEN_DATASOURCE
    needed = set(re.findall(r"\$\{(\w+)\}", TOKEN_DATASOURCE.read_text()))
    assert needed <= set(grafana["environment"]), needed - set(grafana["environment"])
    (provider,) = yaml.safe_load(PROVIDER.read_text())["providers"]
    assert (COMPOSE.parent / mounts[provider["options"]["path"]]).resolve() == GRAFANA / "dashboards"
    env = services["influxdb"]["environment"]
    assert grafana["environment"]["INFLUX_DB"] == env["DOCKER_INFLUXDB_INIT_BUCKET"]  # the virtual DBRP mapping
    # Each replica's command line is one `hub serve` understands, pointing at the same org and bucket, on Redis.
    for name in ("hub-1", "hub-2"):
        hub = services[name]
        script = hub["command"][-1]
        argv = shlex.split(script.split("exec hub ", 1)[1])
        args = cli.build_parser().parse_args(argv)
        assert args.command == "serve"
        assert vars(args)["influx.org"] == env["DOCKER_INFLUXDB_INIT_ORG"]
        assert vars(args)["influx.bucket"] == env["DOCKER_INFLUXDB_INIT_BUCKET"]
        assert "HUB_INFLUX_TOKEN" in hub["environment"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in hub["volumes"]}
        config = tomllib.loads((COMPOSE.parent / mounts[vars(args)["config"]]).read_text())
        assert config["state"]["backend"] == "redis" and "redis" in hub["depends_on"]
    proxy = (COMPOSE.parent / services["haproxy"]["volumes"][0].split(":")[0]).read_text()
    assert "server hub-1 hub-1:8765 check port 9108" in proxy and "server hub-2 hub-2:8765" in proxy


# ---------------------------------------------------------------------------- the query proof

#: How Grafana fills its macros for the dashboard time range "now-1h" to "now" (InfluxQL data source).
TIME_FILTER = "time >= now() - 1h and time <= now()"
INTERVAL_S = 10  # the data source's minimum interval (jsonData.timeInterval): what a 1 h range gets
_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


def substitute(query: str, dash: dict[str, Any], values: dict[str, str]) -> str:
    """The query as Grafana sends it: macros, then template variables (regex-escaped where Grafana escapes)."""
    text = query.replace("$timeFilter", TIME_FILTER)
    text = text.replace("$__interval_ms", str(INTERVAL_S * 1000)).replace("$__interval", f"{INTERVAL_S}s")
    for var in dash["templating"]["list"]:
        value = values[var["name"]]
        if var.get("multi") or var.get("includeAll"):
            value = _REGEX_SPECIAL.sub(r"\\\1", value)
        pattern = rf"\$\{{{var['name']}\}}|\[\[{var['name']}\]\]|\${var['name']}\b"
        text = re.sub(pattern, value.replace("\\", "\\\\"), text)
    leftover = _VAR.search(text)
    assert leftover is None, f"unsubstituted {leftover.group(0)} in {text}"
    return text


def values_of(result: dict[str, Any]) -> int:
    """Non-null values (time column aside) in the series of one statement's result."""
    count = 0
    for series in result.get("series", []):
        for row in series["values"]:
            count += sum(v is not None for col, v in zip(series["columns"], row, strict=True) if col != "time")
    return count


async def wait_for(db: InfluxDB1, influxql: str, minimum: int, timeout: float = 60.0) -> None:
    """Poll an InfluxQL count until it reaches `minimum`."""

    def reached() -> bool:
        series = db.query(influxql, "telemetry")["results"][0].get("series", [])
        return bool(series) and series[0]["values"][0][1] >= minimum

    await eventually(reached, timeout, what=f"{influxql} >= {minimum}", poll=0.2)


@pytest.mark.e2e
async def test_every_dashboard_query_returns_data_the_hub_wrote(tmp_path: Path, influxdb1: InfluxDB1) -> None:
    influxdb1.query("CREATE DATABASE telemetry")
    names = [f"sim-{i:04d}" for i in range(6)]
    tokens = add_devices(tmp_path / "hub", *names, "noisy")
    config = hub_config(
        tmp_path / "hub",
        **{
            "influx.url": influxdb1.url,
            "influx.api": "v1",
            "influx.database": "telemetry",
            "metrics.interval": 0.5,
        },
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)

        async def commands() -> None:
            await trio.sleep(2)  # the scenario: commands come after some telemetry
            for name in names[:3]:
                await hub.commands.submit(name, "ping", {})

        async def bad_input() -> None:
            async with connect(hub, tokens["noisy"]) as ws:
                await hello(ws)
                await trio.sleep(3)  # the scenario: the error comes mid-run
                await ws.send_message("this is not JSON")
                await receive(ws)

        nursery.start_soon(commands)
        nursery.start_soon(bad_input)
        # Long enough to span two of Grafana's 10 s intervals, which derivatives need.
        fleet = [tokens[n] for n in names]
        totals = await run_fleet(url(hub), fleet, interval=0.5, duration=INTERVAL_S + 2, seed=7)
        assert totals.points_acked == totals.points_sent > 0
        await wait_for(influxdb1, 'SELECT count("points_in") FROM "hub"', 2 * INTERVAL_S)
        hub.stop()

    host = socket.gethostname()
    failures = []
    assert {p.stem for p in DASHBOARDS} == set(DASHBOARD_NAMES)
    for path in DASHBOARDS:
        dash = load(path)
        for where, query, _ in queries(dash):
            found = 0
            for device in names:  # each device sends some measurements only: one of them must fill the panel
                text = substitute(query, dash, {"device": device, "host": host})
                (result,) = influxdb1.query(text, "telemetry")["results"]
                found = max(found, values_of(result))
            if not found:
                failures.append(f"{path.stem}: {where}: no values for {text}")
    assert not failures, "\n".join(failures)

    # A few answers checked beyond "has values": the data are the hub's own.
    health = load(GRAFANA / "dashboards" / "hub-health.json")
    errors = next(p for p in health["panels"] if p["title"] == "Protocol errors by code")
    result = influxdb1.query(substitute(errors["targets"][0]["query"], health, {"host": host}), "telemetry")
    spread = {s["tags"]["code"]: s["values"][0][1] for s in result["results"][0]["series"]}
    assert spread["bad_json"] == 1 and spread["bad_field"] == 0
    device = load(GRAFANA / "dashboards" / "device-detail.json")
    variable = substitute(device["templating"]["list"][0]["query"], device, {"device": names[0]})
    listed = {row[1] for row in influxdb1.query(variable, "telemetry")["results"][0]["series"][0]["values"]}
    assert listed == {*names, "noisy"}
    commands = next(p for p in device["panels"] if p["title"] == "Commands")
    rows = influxdb1.rows(substitute(commands["targets"][0]["query"], device, {"device": names[0]}), "telemetry")
    assert {r["state"] for r in rows} >= {"queued", "sent"} and {r["name"] for r in rows} == {"ping"}
    assert time.time() * 1000 - rows[0]["time"] < 3_600_000
