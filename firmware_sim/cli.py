"""The `firmware-sim` command: run N simulated devices against a hub, with a live progress line.

Each device answers the hub's commands: reboot, set_interval, set_config, ping, fail,
echo (see `firmware_sim.commands` and ``firmware-sim --help``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

from device_client import DeviceClient
from firmware_sim.fleet import FleetTotals, run_fleet
from firmware_sim.sensors import MODELS

__all__ = ["build_parser", "format_totals", "main", "read_tokens"]

log = logging.getLogger("firmware_sim")


_EPILOG = """\
commands (send them with hubctl; every simulated device answers these):
  reboot        {"delay": S}?      answers {"rebooting": true, "delay": S}, then drops the
                                   connection and reconnects after S seconds (default 1, at
                                   most 300); the outbox is kept, it counts as a reconnect
  set_interval  {"interval": S}    reporting interval in seconds (0.01..86400); answers
                                   {"interval", "previous"}; the next hello declares it
  set_config    {KEY: VALUE, ...}  stores the keys (null deletes one); answers {"config": {...}}
  ping          {}                 answers {"pong": true, "ts": device clock in ms}
  fail          {"message": T}?    always fails, on purpose
  echo          {...}              answers its args
  other names fail with "unknown command 'NAME'"; bad args fail with a message naming them.

Ctrl-C (or SIGTERM) stops gracefully: every device flushes and waits up to --close-timeout
for acks; a second Ctrl-C quits at once. Exit status: 0 when everything sent was acked,
1 when batches were left unacked, 2 for bad arguments.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `firmware-sim`."""
    parser = argparse.ArgumentParser(
        prog="firmware-sim",
        description="Simulate a fleet of devices streaming telemetry to the hub over WebSocket\n"
        "(each device is a device_client.DeviceClient with its own clock, model and interval).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--hub",
        default="ws://127.0.0.1:8765",
        metavar="URL",
        help="hub URL; the path /v1/device is added when missing (default: %(default)s)",
    )
    parser.add_argument(
        "--ca-file",
        metavar="FILE",
        help="wss://: trust only the CA certificates in FILE (PEM) (default: the system CAs)",
    )
    parser.add_argument(
        "--insecure-plain-ws",
        action="store_true",
        help="allow plain ws:// to a hub that is not on loopback: tokens and telemetry travel unencrypted",
    )
    parser.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="number of devices (default: one per token in --tokens)",
    )
    parser.add_argument(
        "--tokens",
        type=Path,
        required=True,
        metavar="FILE",
        help="file with one device token per line ('<name>.<secret>'; blank lines and # comments "
        "are skipped); the first N are used. For a local hub, `hub device add-sim N --tokens-file FILE "
        "--data-dir DATA_DIR` registers (or re-keys) devices sim-0001..sim-N and writes their tokens",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=10.0,
        metavar="S",
        help="reporting interval per device in seconds, jittered by ±10%% (default: %(default)s)",
    )
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: run until Ctrl-C)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed for signals, intervals and clock offsets (default: %(default)s)",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        metavar="LIST",
        help="comma-separated device models, assigned round-robin (default: %(default)s)",
    )
    parser.add_argument(
        "--outbox-dir",
        type=Path,
        metavar="DIR",
        help="keep each device's outbox in DIR/<name>.outbox.sqlite3, so unacked batches "
        "survive a restart (default: in memory)",
    )
    parser.add_argument(
        "--clock-skew",
        type=float,
        default=2.0,
        metavar="S",
        help="each device clock is off by up to ±S seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--close-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="on stop, wait at most S seconds for the last acks (default: %(default)s)",
    )
    parser.add_argument(
        "--progress-every",
        type=float,
        metavar="S",
        help="progress refresh period (default: 1 on a terminal, 5 otherwise)",
    )
    parser.add_argument(
        "--no-compress",
        action="store_true",
        help="send telemetry as plain JSON text even to a hub that accepts compressed telemetry (default: compress)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the device clients (default: %(default)s)",
    )
    return parser


def read_tokens(path: Path) -> list[str]:
    """The tokens in a file: one per line, blank lines and '#' comments skipped."""
    tokens = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(line)
    return tokens


def format_totals(t: FleetTotals) -> str:
    """One progress line."""
    return (
        f"{t.elapsed:7.1f}s  devices {t.connected}/{t.devices} connected  points sent {t.points_sent} "
        f"acked {t.points_acked}  pending {t.pending} batches  reconnects {t.reconnects}  "
        f"failed connects {t.connect_failures}  rejected {t.rejected}  commands {t.commands}"
    )


def _progress_printer(stream: TextIO, tty: bool) -> Callable[[FleetTotals], None]:
    width = 0

    def show(totals: FleetTotals) -> None:
        nonlocal width
        line = format_totals(totals)
        if tty:
            stream.write("\r" + line.ljust(width))
            width = len(line)
        else:
            stream.write(line + "\n")
        stream.flush()

    return show


async def _watch_signals(stop: trio.Event, hard_stop: trio.CancelScope, stream: TextIO) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if stop.is_set():
                stream.write("\nsecond interrupt: quitting now\n")
                hard_stop.cancel()
                return
            stream.write("\nstopping: flushing and waiting for acks (Ctrl-C again to quit now)\n")
            stop.set()


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The DeviceClient options given on the command line (TLS, compression)."""
    return {"ca_file": args.ca_file, "allow_insecure": args.insecure_plain_ws, "compress": not args.no_compress}


async def _run(args: argparse.Namespace, tokens: list[str], models: list[str]) -> FleetTotals | None:
    stream = sys.stderr
    tty = stream.isatty()
    every = args.progress_every if args.progress_every is not None else (1.0 if tty else 5.0)
    stop = trio.Event()
    totals: FleetTotals | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, stop, nursery.cancel_scope, stream)
        totals = await run_fleet(
            args.hub,
            tokens,
            interval=args.interval,
            models=models,
            duration=args.duration,
            seed=args.seed,
            progress=_progress_printer(stream, tty),
            progress_every=every,
            outbox_dir=args.outbox_dir,
            clock_skew=args.clock_skew,
            close_timeout=args.close_timeout,
            stop=stop,
            client_options=_client_options(args),
        )
        nursery.cancel_scope.cancel()
    if tty:
        stream.write("\n")
    return totals


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `firmware-sim`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if args.devices is not None and args.devices < 1:
        parser.error("--devices must be at least 1")
    try:
        tokens = read_tokens(args.tokens)
    except OSError as exc:
        parser.error(f"--tokens: {exc}")
    if not tokens:
        parser.error(f"--tokens: no tokens in {args.tokens}")
    if args.devices is not None:
        if args.devices > len(tokens):
            parser.error(f"--devices {args.devices}: only {len(tokens)} tokens in {args.tokens}")
        tokens = tokens[: args.devices]
    try:
        for token in tokens:
            DeviceClient(args.hub, token, **_client_options(args))  # checks URL, token and TLS; opens nothing
    except ValueError as exc:
        parser.error(str(exc))
    totals = trio.run(_run, args, tokens, models)
    if totals is None:
        print("interrupted", file=sys.stderr)
        return 130
    print("done: " + format_totals(totals).strip(), file=sys.stderr)
    return 0 if totals.pending == 0 and totals.buffered == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
