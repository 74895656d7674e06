"""Firmware simulator: realistic simulated devices on the device SDK, run as a fleet (`firmware-sim`)."""

from firmware_sim.fleet import FleetTotals, device_seed, run_fleet
from firmware_sim.sensors import MODELS, DeviceModel, make_device

__all__ = ["MODELS", "DeviceModel", "FleetTotals", "device_seed", "make_device", "run_fleet"]
