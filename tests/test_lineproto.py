"""Line protocol building: escaping, value types, tag order, caching, and round trips through real databases."""

from __future__ import annotations

from typing import Any

import pytest

from device_client.protocol import validate_points
from hub.ingest import LineBuilder, line
from hub.ingest._lineproto import escape_key, escape_measurement, format_fields, series_prefix
from tests.servers import InfluxDB1, VictoriaMetrics

TS = 1_700_000_000_000


def point(
    measurement: str = "env", fields: dict[str, Any] | None = None, tags: dict[str, str] | None = None, ts: int = TS
) -> dict[str, Any]:
    return {"measurement": measurement, "ts": ts, "fields": fields or {"v": 1.5}, "tags": tags or {}}


def test_escape_measurement_commas_and_spaces_only() -> None:
    assert escape_measurement("plain") == "plain"
    assert escape_measurement("a b,c=d") == "a\\ b\\,c=d"


def test_escape_keys_commas_equals_spaces() -> None:
    assert escape_key("k") == "k"
    assert escape_key("a b,c=d") == "a\\ b\\,c\\=d"
    assert escape_key('quote"s') == 'quote"s'


def test_series_prefix_sorts_tags_and_adds_device() -> None:
    tags = {"zone": "z1", "b": "2", "a": "1", "room 1": "x,y", "k=v": "p=q"}
    assert series_prefix("m", tags, "dev-7") == "m,a=1,b=2,device=dev-7,k\\=v=p\\=q,room\\ 1=x\\,y,zone=z1"


def test_series_prefix_many_tags_sorted_by_key() -> None:
    tags = {f"t{i:02d}": f"v{i}" for i in reversed(range(32))}
    prefix = series_prefix("m", tags, "d")
    keys = [pair.split("=")[0] for pair in prefix.split(",")[1:]]
    assert keys == sorted([*tags, "device"])
    assert len(keys) == 33


def test_device_name_is_escaped_like_any_tag_value() -> None:
    assert series_prefix("m", {}, "my dev,1=2") == "m,device=my\\ dev\\,1\\=2"


def test_float_int_and_explicit_int_fields() -> None:
    # A plain int means a float and is written unsuffixed; {"int": n} is an integer field.
    fields = {"f": 21.5, "big": 1e20, "neg": -0.25, "plain": 21, "i": {"int": -42}, "zero": {"int": 0}}
    assert format_fields(fields) == "f=21.5,big=1e+20,neg=-0.25,plain=21,i=-42i,zero=0i"


def test_booleans_are_not_ints() -> None:
    assert format_fields({"on": True, "off": False}) == "on=true,off=false"
    b = LineBuilder("d")
    assert b.lines([point(fields={"on": True, "n": 1, "off": False})]) == f"env,device=d on=true,n=1,off=false {TS}\n"


def test_string_fields_quote_and_backslash_escaped() -> None:
    fields = {"s": 'say "hi"', "path": "C:\\temp\\", "plain": "a b,c=d", "empty": ""}
    assert format_fields(fields) == 's="say \\"hi\\"",path="C:\\\\temp\\\\",plain="a b,c=d",empty=""'


def test_field_keys_escaped_and_input_order_kept() -> None:
    assert format_fields({"z": 1.0, "a b": 2.0, "c,d=e": 3.0}) == "z=1.0,a\\ b=2.0,c\\,d\\=e=3.0"


def test_unicode_names_and_values() -> None:
    b = LineBuilder("gerät-ü")
    text = b.lines([point("température", {"état": "très chaud ☀", "x": 1.0}, {"pièce": "salle à manger"})])
    assert text == f'température,device=gerät-ü,pièce=salle\\ à\\ manger état="très chaud ☀",x=1.0 {TS}\n'


def test_builder_output_one_line_per_point_with_trailing_newline() -> None:
    b = LineBuilder("d1")
    points = [point(fields={"v": float(i)}, ts=TS + i) for i in range(3)]
    assert b.lines(points) == f"env,device=d1 v=0.0 {TS}\nenv,device=d1 v=1.0 {TS + 1}\nenv,device=d1 v=2.0 {TS + 2}\n"


def test_builder_cache_is_bounded_and_stays_correct() -> None:
    b = LineBuilder("d", cache_size=4)
    for round_ in range(3):
        points = [point(tags={"t": str(i)}, fields={f"f{i}": 1.0}) for i in range(10)]
        lines = b.lines(points).splitlines()
        assert lines == [f"env,device=d,t={i} f{i}=1.0 {TS}" for i in range(10)], round_
    assert len(b._prefixes) <= 4 and len(b._field_keys) <= 4


def test_builder_same_tags_different_order_give_same_sorted_prefix() -> None:
    b = LineBuilder("d")
    text = b.lines([point(tags={"a": "1", "b": "2"}), point(tags={"b": "2", "a": "1"})])
    assert text.splitlines() == [f"env,a=1,b=2,device=d v=1.5 {TS}"] * 2


def test_builder_on_validated_wire_points() -> None:
    points = validate_points([{"measurement": "m", "ts": TS, "fields": {"a": 3, "b": {"int": 3}, "c": 3.0}}])
    assert LineBuilder("d").lines(points) == f"m,device=d a=3,b=3i,c=3.0 {TS}\n"


def test_line_for_cold_paths() -> None:
    assert line("presence", {"device": "d 1"}, {"state": "online", "epoch": {"int": 3}}, TS) == (
        f'presence,device=d\\ 1 state="online",epoch=3i {TS}'
    )
    assert line("hub", {"b": "", "a": "x"}, {"n": 2}, TS) == f"hub,a=x n=2 {TS}"  # empty tag left out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, [1]])
def test_line_refuses_values_without_a_literal(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        line("m", {}, {"f": bad}, TS)


def test_line_needs_a_field() -> None:
    with pytest.raises(ValueError):
        line("m", {}, {}, TS)


def test_round_trip_through_victoriametrics(victoria: VictoriaMetrics) -> None:
    from tests.servers import http_post

    b = LineBuilder("dev 1")
    points = [
        point("env", {"temp": 21.5, "hum": 40, "count": {"int": 7}, "on": True}, {"room": "a b,c"}, TS),
        point("env", {"temp": -3.25, "hum": 41, "count": {"int": -8}, "on": False}, {"room": "a b,c"}, TS + 1),
        point("big", {"v": 1e20}, {}, TS),
    ]
    status, body = http_post(victoria.url + "/api/v2/write?precision=ms", b.lines(points).encode())
    assert status == 204, body
    temp = victoria.wait_for_count('{__name__="env_temp"}', 2)
    assert temp[0]["metric"] == {"__name__": "env_temp", "device": "dev 1", "room": "a b,c"}
    assert temp[0]["values"] == [21.5, -3.25] and temp[0]["timestamps"] == [TS, TS + 1]
    assert victoria.wait_for_count('{__name__="env_hum"}', 2)[0]["values"] == [40, 41]
    assert victoria.wait_for_count('{__name__="env_count"}', 2)[0]["values"] == [7, -8]
    assert victoria.wait_for_count('{__name__="env_on"}', 2)[0]["values"] == [1, 0]
    assert victoria.wait_for_count('{__name__="big_v"}', 1)[0]["values"] == [1e20]


def test_round_trip_through_influxdb1_all_types_and_escapes(influxdb1: InfluxDB1) -> None:
    influxdb1.query("CREATE DATABASE t")
    b = LineBuilder("dév 1,x=y")
    fields = {"f": 21.5, "plain": 21, "i": {"int": 9_000_000_000}, "b": True, "s": 'a "q" \\ b, c=d ☀', "k ,=": 1.0}
    tags = {"room name": "a b,c=d", "z": "ü"}
    status, body = influxdb1.write(b.lines([point("my meas,x", fields, tags)]), "t")
    assert status == 204, body
    rows = influxdb1.rows('SELECT * FROM "my meas,x"', "t")
    assert rows == [
        {
            "time": TS,
            "f": 21.5,
            "plain": 21,
            "i": 9_000_000_000,
            "b": True,
            "s": 'a "q" \\ b, c=d ☀',
            "k ,=": 1.0,
            "device": "dév 1,x=y",
            "room name": "a b,c=d",
            "z": "ü",
        }
    ]
    # Field types as InfluxDB stored them: plain ints became floats, {"int"} an integer.
    keys = influxdb1.query('SHOW FIELD KEYS FROM "my meas,x"', "t")["results"][0]["series"][0]["values"]
    assert dict(keys) == {
        "b": "boolean",
        "f": "float",
        "i": "integer",
        "k ,=": "float",
        "plain": "float",
        "s": "string",
    }
