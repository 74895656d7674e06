"""The transport baseline: a bare trio-websocket server that only receives (run as `python -m bench.baseline`).

It answers a device's first message with a fixed `welcome`, then counts what arrives and never acks (with `--ack`,
it acks each telemetry message as it arrives, as a transport with at-least-once delivery does: MQTT's QoS 1). For
the command round trip it relays: an operator on `/relay` sends `{"device": NAME, "id": ID}`, the server sends that
device a `command`, and forwards the device's `command_result` back. Commands on stdin: `report`, `reset`, `exit`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from functools import partial

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from bench.jsonl import emit, raise_fd_limit, stdin_lines
from bench.wire import COMMAND_RESULT_PREFIX, TELEMETRY_PREFIX
from device_client import protocol
from hub.gctune import ALLOCATION_THRESHOLDS, tune_gc

__all__ = ["Baseline", "main"]

#: The hub's own listener settings (hub/devices/_server.py), so both sides pay the same per-frame costs.
MAX_MESSAGE_BYTES = 256 * 1024
HANDSHAKE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0


class Baseline:
    """Counts received messages; relays commands between `/relay` operators and devices."""

    def __init__(self, *, ack: bool = False) -> None:
        self.ack = ack  # ack each telemetry message on arrival
        self.devices: dict[str, WebSocketConnection] = {}
        self.waiting: dict[str, WebSocketConnection] = {}  # command id -> the operator that sent it
        self.connections = 0
        self.reset()

    def reset(self) -> None:
        """Zero the message counters."""
        self.messages = 0
        self.bytes = 0
        self.t_first = 0.0
        self.t_last = 0.0

    def report(self) -> None:
        """Emit the counters."""
        emit(
            "report",
            messages=self.messages,
            bytes=self.bytes,
            t_first=self.t_first,
            t_last=self.t_last,
            connections=self.connections,
        )

    async def handle(self, request: WebSocketRequest) -> None:
        """One connection: a device (any path but /relay) or an operator (/relay)."""
        path = request.path
        headers = dict(request.headers)
        ws = await request.accept()
        if path.startswith("/relay"):
            await self._relay(ws)
            return
        token = headers.get(b"authorization", b"Bearer x.y")[7:].decode()
        name = token.rpartition(".")[0]
        self.connections += 1
        try:
            await ws.get_message()  # hello
            welcome = protocol.Welcome(device=name, ack=0, epoch=1, window=16, max_points=5000, ping_interval=10.0)
            await ws.send_message(protocol.encode(welcome))
            self.devices[name] = ws
            while True:
                text = await ws.get_message()
                now = time.monotonic()
                if not self.messages:
                    self.t_first = now
                self.messages += 1
                self.bytes += len(text)
                self.t_last = now
                if text.startswith(COMMAND_RESULT_PREFIX):
                    await self._result(text)
                elif self.ack and text.startswith(TELEMETRY_PREFIX):
                    start = len(TELEMETRY_PREFIX)
                    await ws.send_message(protocol.encode_ack(int(text[start : text.index(",", start)])))
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            if self.devices.get(name) is ws:
                del self.devices[name]

    async def _result(self, text: str) -> None:
        cid = json.loads(text)["id"]
        operator = self.waiting.pop(cid, None)
        if operator is not None:
            with contextlib.suppress(ConnectionClosed):  # the operator left: nobody waits for this answer
                await operator.send_message(text)

    async def _relay(self, ws: WebSocketConnection) -> None:
        try:
            while True:
                request = json.loads(await ws.get_message())
                device = self.devices.get(request["device"])
                if device is None:
                    await ws.send_message(json.dumps({"id": request["id"], "error": "not connected"}))
                    continue
                self.waiting[request["id"]] = ws
                command = protocol.Command(id=request["id"], name="ping", args={}, timeout=10.0)
                await device.send_message(protocol.encode(command))
        except ConnectionClosed:
            pass


async def _main(ack: bool) -> None:
    baseline = Baseline(ack=ack)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve_websocket,
                baseline.handle,
                "127.0.0.1",
                0,
                None,
                handler_nursery=None,
                max_message_size=MAX_MESSAGE_BYTES,
                connect_timeout=HANDSHAKE_TIMEOUT,
                disconnect_timeout=CLOSE_TIMEOUT,
            )
        )
        emit("listening", port=server.port)
        async for line in stdin_lines():
            if line == "report":
                baseline.report()
            elif line == "reset":
                baseline.reset()
            elif line == "exit":
                break
            else:
                emit("error", detail=f"unknown command {line!r}")
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m bench.baseline [--ack]`."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ack", action="store_true", help="ack each telemetry message as it arrives")
    args = parser.parse_args(argv)
    raise_fd_limit()
    tune_gc(ALLOCATION_THRESHOLDS)  # the harness adds no collector pauses of its own to what it measures
    trio.run(_main, args.ack)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
