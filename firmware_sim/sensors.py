"""Simulated sensors and device models: realistic signals, deterministic for a seed and a sequence of timestamps."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, ClassVar

__all__ = [
    "MODELS",
    "Battery",
    "DeviceModel",
    "EnvSensor",
    "Humidity",
    "Load",
    "Position",
    "PowerMeter",
    "Rssi",
    "Temperature",
    "Tracker",
    "make_device",
]

_HOUR_MS = 3_600_000
_MAX_STEP_H = 24.0  # a longer gap between readings is simulated as one day


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class _OU:
    """Ornstein-Uhlenbeck walk: mean-reverting noise with stationary deviation `sd` and time constant `tau_h`."""

    def __init__(self, rng: random.Random, sd: float, tau_h: float) -> None:
        self.rng = rng
        self.sd = sd
        self.tau_h = tau_h
        self.x = rng.gauss(0.0, sd)

    def step(self, dt_h: float) -> float:
        if dt_h > 0:
            decay = math.exp(-dt_h / self.tau_h)
            self.x = self.x * decay + self.sd * math.sqrt(1 - decay * decay) * self.rng.gauss(0.0, 1.0)
        return self.x


class Temperature:
    """Air temperature (°C): a daily sinusoid by the device's local clock, a slow random walk, and noise."""

    def __init__(self, rng: random.Random, *, mean: float | None = None, tz_hours: float = 0.0) -> None:
        self.rng = rng
        self.mean = rng.uniform(12.0, 24.0) if mean is None else mean
        self.amplitude = rng.uniform(2.0, 6.0)
        self.tz_hours = tz_hours
        self.walk = _OU(rng, sd=1.5, tau_h=6.0)
        self.value = self.mean

    def read(self, ts_ms: int, dt_h: float) -> float:
        hour = (ts_ms / _HOUR_MS + self.tz_hours) % 24.0
        daily = self.amplitude * math.sin(2 * math.pi * (hour - 9.0) / 24.0)  # warmest at 15:00
        self.value = self.mean + daily + self.walk.step(dt_h) + self.rng.gauss(0.0, 0.08)
        return round(self.value, 2)


class Humidity:
    """Relative humidity (%): falls when the paired temperature rises, plus its own walk and noise; 0..100."""

    def __init__(self, rng: random.Random, temperature: Temperature) -> None:
        self.rng = rng
        self.temperature = temperature
        self.mean = rng.uniform(35.0, 65.0)
        self.walk = _OU(rng, sd=4.0, tau_h=8.0)

    def read(self, dt_h: float) -> float:
        delta_t = self.temperature.value - self.temperature.mean
        value = self.mean - 2.5 * delta_t + self.walk.step(dt_h) + self.rng.gauss(0.0, 0.4)
        return round(_clamp(value, 0.0, 100.0), 1)


# Li-ion resting voltage by state of charge.
_LI_ION = ((0, 3.00), (5, 3.45), (10, 3.68), (20, 3.74), (40, 3.80), (60, 3.87), (80, 3.98), (100, 4.20))


def _li_ion_voltage(percent: float) -> float:
    for (p0, v0), (p1, v1) in itertools.pairwise(_LI_ION):
        if percent <= p1:
            return v0 + (v1 - v0) * (percent - p0) / (p1 - p0)
    return _LI_ION[-1][1]


class Battery:
    """A Li-ion cell: slow discharge, recharge when low (or now and then), voltage from the charge curve."""

    def __init__(self, rng: random.Random, *, drain_per_hour: float | None = None) -> None:
        self.rng = rng
        self.percent = rng.uniform(40.0, 100.0)
        self.drain = rng.uniform(0.05, 0.3) if drain_per_hour is None else drain_per_hour
        self.charge_rate = 25.0  # %/h on the charger
        self.charging = False

    def read(self, dt_h: float) -> dict[str, Any]:
        if self.charging:
            self.percent += self.charge_rate * dt_h
            if self.percent >= 100.0:
                self.percent, self.charging = 100.0, False
        else:
            self.percent -= self.drain * dt_h
            # Someone plugs it in: surely when it is low, now and then otherwise (about once in 10 days).
            if self.percent <= 10.0 or self.rng.random() < 1 - math.exp(-dt_h / 240.0):
                self.charging = True
        self.percent = _clamp(self.percent, 0.0, 100.0)
        voltage = _li_ion_voltage(self.percent) + (0.06 if self.charging else 0.0) + self.rng.gauss(0.0, 0.004)
        return {"voltage": round(voltage, 3), "percent": round(self.percent, 1), "charging": self.charging}


class Rssi:
    """Received signal strength (dBm, integer): a random walk around a per-device level, -120..-30, with SNR."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.level = rng.uniform(-100.0, -55.0)
        self.walk = _OU(rng, sd=6.0, tau_h=0.5)

    def read(self, dt_h: float) -> dict[str, Any]:
        dbm = _clamp(self.level + self.walk.step(dt_h) + self.rng.gauss(0.0, 1.5), -120.0, -30.0)
        snr = _clamp((dbm + 112.0) / 4.0 + self.rng.gauss(0.0, 0.8), -20.0, 30.0)
        return {"rssi": round(dbm), "snr": round(snr, 1)}


class Load:
    """Household electrical load (W): base load, morning and evening peaks, fridge cycles, kettle bursts."""

    def __init__(self, rng: random.Random, *, tz_hours: float = 0.0) -> None:
        self.rng = rng
        self.base = rng.uniform(80.0, 250.0)
        self.tz_hours = tz_hours
        self.kettle_until = 0.0  # hours since epoch
        self.walk = _OU(rng, sd=40.0, tau_h=1.0)

    def read(self, ts_ms: int, dt_h: float) -> float:
        t_h = ts_ms / _HOUR_MS
        hour = (t_h + self.tz_hours) % 24.0
        peaks = 600.0 * math.exp(-(((hour - 7.5) / 1.0) ** 2)) + 900.0 * math.exp(-(((hour - 19.5) / 1.5) ** 2))
        fridge = 110.0 if (t_h * 60.0 / 25.0) % 1.0 < 0.4 else 0.0  # compressor: 10 of every 25 minutes
        if t_h >= self.kettle_until and self.rng.random() < 1 - math.exp(-dt_h / 3.0):
            self.kettle_until = t_h + self.rng.uniform(2.0, 4.0) / 60.0
        kettle = 2000.0 if t_h < self.kettle_until else 0.0
        return max(0.0, self.base + peaks + fridge + kettle + self.walk.step(dt_h) + self.rng.gauss(0.0, 5.0))


class Position:
    """A moving tracker: heading and speed drift, sometimes it stops; latitude/longitude in degrees."""

    _CITIES = ((52.5200, 13.4050), (48.8566, 2.3522), (40.4168, -3.7038), (59.3293, 18.0686), (45.4642, 9.1900))

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        lat, lon = rng.choice(self._CITIES)
        self.lat = lat + rng.uniform(-0.05, 0.05)
        self.lon = lon + rng.uniform(-0.05, 0.05)
        self.heading = rng.uniform(0.0, 360.0)
        self.speed = 0.0  # m/s
        self.moving = rng.random() < 0.5

    def read(self, dt_h: float) -> dict[str, Any]:
        dt_s = dt_h * 3600.0
        if self.rng.random() < 1 - math.exp(-dt_h / 0.5):  # start or stop about every half hour
            self.moving = not self.moving
        target = self.rng.uniform(3.0, 14.0) if self.moving else 0.0
        self.speed = max(0.0, self.speed + (target - self.speed) * min(1.0, dt_s / 60.0))
        self.heading = (self.heading + self.rng.gauss(0.0, 8.0) * min(1.0, dt_s / 10.0 + 0.1)) % 360.0
        dist = self.speed * dt_s
        rad = math.radians(self.heading)
        self.lat = _clamp(self.lat + dist * math.cos(rad) / 111_320.0, -85.0, 85.0)
        self.lon += dist * math.sin(rad) / (111_320.0 * math.cos(math.radians(self.lat)))
        self.lon = (self.lon + 180.0) % 360.0 - 180.0
        return {
            "lat": round(self.lat, 6),
            "lon": round(self.lon, 6),
            "speed": round(self.speed, 2),
            "heading": round(self.heading, 1),
        }


class DeviceModel:
    """A simulated device: `read(ts_ms)` returns its point dicts for one report at device time `ts_ms`."""

    model: ClassVar[str] = ""
    firmware: ClassVar[str] = ""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tz_hours = self.rng.choice((-5.0, 0.0, 1.0, 2.0, 5.5, 9.0))
        self._last_ms: int | None = None

    def read(self, ts_ms: int) -> list[dict[str, Any]]:
        """The points of one report; signals advance by the time since the previous call."""
        dt_h = 0.0 if self._last_ms is None else _clamp((ts_ms - self._last_ms) / _HOUR_MS, 0.0, _MAX_STEP_H)
        self._last_ms = ts_ms
        return [
            {"measurement": name, "ts": ts_ms, "fields": fields, "tags": {}}
            for name, fields in self._fields(ts_ms, dt_h)
        ]

    def _fields(self, ts_ms: int, dt_h: float) -> list[tuple[str, dict[str, Any]]]:
        raise NotImplementedError


class EnvSensor(DeviceModel):
    """`th-100`: an indoor/outdoor environment sensor on a battery."""

    model = "th-100"
    firmware = "th100-2.4.1"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.temperature = Temperature(self.rng, tz_hours=self.tz_hours)
        self.humidity = Humidity(self.rng, self.temperature)
        self.battery = Battery(self.rng)

    def _fields(self, ts_ms: int, dt_h: float) -> list[tuple[str, dict[str, Any]]]:
        env = {"temperature": self.temperature.read(ts_ms, dt_h), "humidity": self.humidity.read(dt_h)}
        return [("environment", env), ("battery", self.battery.read(dt_h))]


class PowerMeter(DeviceModel):
    """`pm-10`: a mains power meter; `energy` is an integer Wh counter that only grows."""

    model = "pm-10"
    firmware = "pm10-1.7.0"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.nominal = self.rng.choice((230.0, 120.0))
        self.mains = _OU(self.rng, sd=self.nominal * 0.01, tau_h=2.0)
        self.load = Load(self.rng, tz_hours=self.tz_hours)
        self.energy_wh = self.rng.uniform(1e5, 5e6)

    def _fields(self, ts_ms: int, dt_h: float) -> list[tuple[str, dict[str, Any]]]:
        voltage = self.nominal + self.mains.step(dt_h) + self.rng.gauss(0.0, 0.3)
        power = self.load.read(ts_ms, dt_h)
        pf = _clamp(0.93 + self.rng.gauss(0.0, 0.02), 0.5, 1.0)
        self.energy_wh += power * dt_h
        fields = {
            "voltage": round(voltage, 1),
            "current": round(power / (voltage * pf), 3),
            "power": round(power, 1),
            "power_factor": round(pf, 3),
            "energy": int(self.energy_wh),  # a Python int: sent as an integer field
        }
        return [("power", fields)]


class Tracker(DeviceModel):
    """`tracker`: a GPS tracker with a radio link and a battery that drains faster."""

    model = "tracker"
    firmware = "trk-3.0.2"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.position = Position(self.rng)
        self.radio = Rssi(self.rng)
        self.battery = Battery(self.rng, drain_per_hour=self.rng.uniform(0.5, 1.5))

    def _fields(self, ts_ms: int, dt_h: float) -> list[tuple[str, dict[str, Any]]]:
        return [
            ("position", self.position.read(dt_h)),
            ("radio", self.radio.read(dt_h)),
            ("battery", self.battery.read(dt_h)),
        ]


MODELS: dict[str, type[DeviceModel]] = {m.model: m for m in (EnvSensor, PowerMeter, Tracker)}


def make_device(model: str, seed: int) -> DeviceModel:
    """A simulated device of `model` (one of `MODELS`), deterministic for `seed`."""
    try:
        return MODELS[model](seed)
    except KeyError:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}") from None
