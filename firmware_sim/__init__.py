"""Firmware simulator: realistic simulated devices on the device SDK, run as a fleet (`firmware-sim`).

Every simulated device answers the hub's commands: reboot, set_interval, set_config,
ping, fail and echo (`firmware_sim.commands`).
"""

from firmware_sim.commands import COMMANDS, SimState, register_commands
from firmware_sim.fleet import FleetTotals, device_seed, run_fleet
from firmware_sim.sensors import MODELS, DeviceModel, make_device

__all__ = [
    "COMMANDS",
    "MODELS",
    "DeviceModel",
    "FleetTotals",
    "SimState",
    "device_seed",
    "make_device",
    "register_commands",
    "run_fleet",
]
