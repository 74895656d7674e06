"""Simulated sensors: signals stay in range, follow their physics, and repeat exactly for a seed."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from device_client.outbox import check_points
from firmware_sim.sensors import MODELS, Battery, Humidity, Rssi, Temperature, make_device

T0 = 1_700_000_000_000  # ms; 2023-11-14 22:13 UTC
MINUTE = 60_000
HOUR = 3_600_000


def run(model: str, seed: int, steps: int, step_ms: int = 10 * MINUTE) -> list[list[dict]]:
    device = make_device(model, seed)
    return [device.read(T0 + i * step_ms) for i in range(steps)]


def series(reports: list[list[dict]], measurement: str, field: str) -> list:
    return [p["fields"][field] for report in reports for p in report if p["measurement"] == measurement]


@pytest.mark.parametrize("model", list(MODELS))
def test_deterministic_by_seed(model: str) -> None:
    assert run(model, 7, 200) == run(model, 7, 200)
    assert run(model, 7, 200) != run(model, 8, 200)


@pytest.mark.parametrize("model", list(MODELS))
def test_points_are_valid_for_the_hub(model: str) -> None:
    for report in run(model, 3, 300, step_ms=7 * MINUTE):
        check_points(report)
        assert {p["ts"] for p in report} == {report[0]["ts"]}


def test_models_produce_their_measurements() -> None:
    assert {p["measurement"] for p in make_device("th-100", 1).read(T0)} == {"environment", "battery"}
    assert {p["measurement"] for p in make_device("pm-10", 1).read(T0)} == {"power"}
    assert {p["measurement"] for p in make_device("tracker", 1).read(T0)} == {"position", "radio", "battery"}
    with pytest.raises(ValueError):
        make_device("toaster", 1)


@pytest.mark.parametrize("seed", range(8))
def test_environment_in_range(seed: int) -> None:
    reports = run("th-100", seed, 24 * 14 * 6)  # two weeks every 10 minutes
    temps = series(reports, "environment", "temperature")
    hums = series(reports, "environment", "humidity")
    assert all(-30 < t < 50 for t in temps)
    assert all(0.0 <= h <= 100.0 for h in hums)
    assert all(isinstance(t, float) for t in temps + hums)


def test_temperature_follows_the_device_clock_day() -> None:
    # Averaged over many days, the afternoon is warmer than the early morning, by the device's local hour.
    temp = Temperature(random.Random(1), mean=20.0, tz_hours=0.0)
    by_hour: dict[int, list[float]] = {h: [] for h in range(24)}
    start = T0 - T0 % (24 * HOUR)  # midnight UTC
    for i in range(24 * 60):
        ts = start + i * HOUR
        by_hour[i % 24].append(temp.read(ts, 1.0))
    afternoon = statistics.mean(by_hour[15])
    dawn = statistics.mean(by_hour[3])
    assert afternoon - dawn > 2 * temp.amplitude * 0.6


def test_humidity_is_anticorrelated_with_temperature() -> None:
    rng = random.Random(5)
    temp = Temperature(rng, tz_hours=0.0)
    hum = Humidity(rng, temp)
    ts, hums, temps = T0, [], []
    for _ in range(2000):
        ts += 15 * MINUTE
        temps.append(temp.read(ts, 0.25))
        hums.append(hum.read(0.25))
    assert statistics.correlation(temps, hums) < -0.5


def test_battery_discharges_and_recharges() -> None:
    battery = Battery(random.Random(2), drain_per_hour=2.0)
    readings = [battery.read(0.5) for _ in range(24 * 2 * 20)]  # 20 days, every 30 minutes
    percents = [r["percent"] for r in readings]
    volts = [r["voltage"] for r in readings]
    assert all(0.0 <= p <= 100.0 for p in percents)
    assert all(2.9 < v < 4.35 for v in volts)
    assert any(r["charging"] for r in readings) and not all(r["charging"] for r in readings)
    drops = sum(1 for a, b in itertools.pairwise(readings) if not b["charging"] and b["percent"] < a["percent"])
    assert drops > len(readings) / 2  # mostly discharging
    # Voltage follows the charge: fuller means higher voltage (off the charger).
    idle = [r for r in readings if not r["charging"]]
    full = statistics.mean(r["voltage"] for r in idle if r["percent"] > 80)
    low = statistics.mean(r["voltage"] for r in idle if r["percent"] < 30)
    assert full > low + 0.1


@pytest.mark.parametrize("seed", range(10))
def test_rssi_stays_in_range_and_is_an_integer(seed: int) -> None:
    radio = Rssi(random.Random(seed))
    values = [radio.read(0.1) for _ in range(3000)]
    assert all(type(v["rssi"]) is int and -120 <= v["rssi"] <= -30 for v in values)
    assert len({v["rssi"] for v in values}) > 10  # it moves


def test_power_meter_energy_is_a_growing_integer_counter() -> None:
    reports = run("pm-10", 4, 24 * 6 * 3)  # three days every 10 minutes
    energy = series(reports, "power", "energy")
    assert all(type(e) is int for e in energy)
    assert all(b >= a for a, b in itertools.pairwise(energy)) and energy[-1] > energy[0]
    power = series(reports, "power", "power")
    volts = series(reports, "power", "voltage")
    assert all(p >= 0 for p in power)
    nominal = 230.0 if abs(volts[0] - 230) < abs(volts[0] - 120) else 120.0
    assert all(abs(v - nominal) < nominal * 0.08 for v in volts)
    # energy grows by about the integral of power
    expected_wh = sum(power[1:]) * (10 / 60)
    assert abs((energy[-1] - energy[0]) - expected_wh) < expected_wh * 0.05 + 2


def test_tracker_moves_plausibly() -> None:
    reports = run("tracker", 9, 600, step_ms=MINUTE)
    lats = series(reports, "position", "lat")
    lons = series(reports, "position", "lon")
    speeds = series(reports, "position", "speed")
    assert all(0 <= s < 20 for s in speeds)
    assert max(speeds) > 1  # it moved at some point
    for (a, b), (c, d) in itertools.pairwise(zip(lats, lons, strict=True)):
        assert abs(c - a) < 0.02 and abs(d - b) < 0.03  # at most ~1.2 km per minute
    rssi = series(reports, "radio", "rssi")
    assert all(-120 <= r <= -30 for r in rssi)
