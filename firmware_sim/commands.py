"""The commands every simulated device answers, and the device state they change.

- `reboot` ``{"delay": s}?`` (0..300, default 1): answers ``{"rebooting": true, "delay": s}``,
  then drops the connection and reconnects after `delay` seconds. The outbox is kept;
  it counts as a reconnect.
- `set_interval` ``{"interval": s}`` (0.01..86400): answers ``{"interval": new, "previous":
  old}``. The next report comes one new interval after the last one; the next `hello`
  declares the new interval.
- `set_config` ``{key: value, ...}``: stores the keys (a `null` value deletes one) and
  answers ``{"config": {...}}``, the whole stored config (at most 8 KiB of JSON).
- `ping`: answers ``{"pong": true, "ts": device clock in ms}``.
- `fail` ``{"message": text}?``: always fails, with `message` or a default text.
- `echo`: answers its args unchanged.

Bad args (a missing or out-of-range number, say) make the command fail with a message
that names the argument; a name not listed fails with ``unknown command 'NAME'``.

The twin (`register_twin`): a simulated device takes from its desired document
- `interval` (seconds, 0.01..86400): its reporting interval, as `set_interval` does;
- `measurements` ``{name: false, ...}``: the measurements it stops reporting (``true`` or
  ``null`` turns one back on);
and reports back what it now does: ``{"interval": s, "measurements": {name: bool}}``. A value out
of range is left unapplied (the twin's delta keeps showing it).
"""

from __future__ import annotations

import math
import time
from typing import Any

import attrs
import trio

from device_client import CommandContext, DeviceClient
from device_client.protocol import json_size

__all__ = [
    "COMMANDS",
    "DEFAULT_REBOOT_DELAY",
    "MAX_CONFIG_BYTES",
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "SimState",
    "apply_desired",
    "register_commands",
    "register_twin",
]

#: Seconds a simulated reboot keeps the device offline unless `reboot` says otherwise.
DEFAULT_REBOOT_DELAY = 1.0
MAX_REBOOT_DELAY = 300.0
#: Bounds of `set_interval` (seconds).
MIN_INTERVAL = 0.01
MAX_INTERVAL = 86_400.0
#: Largest stored config, as compact JSON.
MAX_CONFIG_BYTES = 8192
#: The command names a simulated device answers.
COMMANDS = ("reboot", "set_interval", "set_config", "ping", "fail", "echo")


@attrs.define
class SimState:
    """What commands change on one simulated device: its reporting interval, config and reboot count."""

    interval: float
    clock_offset_ms: float = 0.0  # this device's clock runs off by this much
    config: dict[str, Any] = attrs.field(factory=dict)
    reboots: int = 0
    disabled: set[str] = attrs.field(factory=set)  # measurements the twin turned off
    _interval_changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def now_ms(self) -> int:
        """The device clock: ms since the epoch, off by `clock_offset_ms`."""
        return int(time.time() * 1000.0 + self.clock_offset_ms)

    @property
    def interval_changed(self) -> trio.Event:
        """Set when `set_interval` changes the interval (a new event is armed for the next change)."""
        return self._interval_changed

    def set_interval(self, seconds: float) -> float:
        """Change the reporting interval; return the previous one."""
        previous, self.interval = self.interval, seconds
        self._interval_changed.set()
        self._interval_changed = trio.Event()
        return previous


def _number(args: dict[str, Any], key: str, low: float, high: float, default: float | None = None) -> float:
    value = args.get(key, default)
    if value is None:
        raise ValueError(f"{key!r} is required: a number of seconds from {low:g} to {high:g}")
    if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{key!r} must be a number of seconds from {low:g} to {high:g}")
    return float(value)


def register_commands(client: DeviceClient, state: SimState) -> None:
    """Register the simulated device's command handlers (see the module docstring) on `client`."""

    @client.command("reboot")
    async def reboot(args: dict[str, Any], ctx: CommandContext) -> dict[str, Any]:
        delay = _number(args, "delay", 0.0, MAX_REBOOT_DELAY, DEFAULT_REBOOT_DELAY)
        state.reboots += 1
        ctx.reconnect(delay)
        return {"rebooting": True, "delay": delay}

    @client.command("set_interval")
    async def set_interval(args: dict[str, Any]) -> dict[str, Any]:
        seconds = _number(args, "interval", MIN_INTERVAL, MAX_INTERVAL)
        previous = state.set_interval(seconds)
        client.interval = seconds
        return {"interval": seconds, "previous": previous}

    @client.command("set_config")
    async def set_config(args: dict[str, Any]) -> dict[str, Any]:
        config = {**state.config, **args}
        config = {k: v for k, v in config.items() if v is not None}
        if json_size(config) > MAX_CONFIG_BYTES:
            raise ValueError(f"the config would be over {MAX_CONFIG_BYTES} bytes of JSON")
        state.config = config
        return {"config": config}

    @client.command("ping")
    async def ping(args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "ts": state.now_ms()}

    @client.command("fail")
    async def fail(args: dict[str, Any]) -> None:
        message = args.get("message")
        raise RuntimeError(
            message if isinstance(message, str) and message else "failed on purpose (the 'fail' test command)"
        )

    @client.command("echo")
    async def echo(args: dict[str, Any]) -> dict[str, Any]:
        return args


def apply_desired(state: SimState, desired: dict[str, Any]) -> dict[str, Any]:
    """Take the reporting interval and measurement switches from a desired document; what to report back."""
    interval = desired.get("interval")
    if isinstance(interval, int | float) and not isinstance(interval, bool) and math.isfinite(interval):
        seconds = float(interval)
        if MIN_INTERVAL <= seconds <= MAX_INTERVAL and seconds != state.interval:
            state.set_interval(seconds)
    switches = desired.get("measurements")
    reported: dict[str, Any] = {"interval": state.interval}
    if isinstance(switches, dict):
        state.disabled = {name for name, on in switches.items() if on is False}
        reported["measurements"] = {name: name not in state.disabled for name in switches}
    else:
        state.disabled = set()
    return reported


def register_twin(client: DeviceClient, state: SimState) -> None:
    """Apply each desired document (`apply_desired`) and report what the device now does."""

    @client.on_desired
    async def desired(doc: dict[str, Any]) -> dict[str, Any]:
        reported = apply_desired(state, doc)
        client.interval = state.interval
        return reported
