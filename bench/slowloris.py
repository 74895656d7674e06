"""The slow-handshake attacker process: many sockets that each send an upgrade request one byte at a time.

Run by `bench.run` as `python -m bench.slowloris HOST PORT COUNT GAP SOURCE [SOURCE ...]`. It opens COUNT
connections spread over the source addresses, sends one byte of a WebSocket upgrade request on each every GAP
seconds, and opens a new connection whenever the server closes one. It reports `ready` once every socket has been
opened, then on `exit` (or EOF) a `result`: connections opened, closed by the server, answered with HTTP.
It runs at nice 10: a real attacker's CPU is not the hub machine's.
"""

from __future__ import annotations

import collections
import os
import random
import sys

import trio

from bench.jsonl import emit, raise_fd_limit, stdin_lines

__all__ = ["main"]

#: What each socket trickles: a complete upgrade request, which the hub never sees the end of in time.
REQUEST = (
    b"GET /v1/device HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Authorization: Bearer slow.slow\r\n\r\n"
)


class _Attack:
    def __init__(self, host: str, port: int, count: int, gap: float, sources: list[str]) -> None:
        self.host, self.port, self.count, self.gap, self.sources = host, port, count, gap, sources
        self.counts: collections.Counter[str] = collections.Counter()
        self.opened_once = 0
        self.ready = trio.Event()

    async def socket_loop(self, index: int) -> None:
        source = self.sources[index % len(self.sources)]
        first = True
        while True:
            try:
                stream = await trio.open_tcp_stream(self.host, self.port, local_address=source)
            except OSError:
                self.counts["connect_failed"] += 1
                await trio.sleep(random.uniform(0.05, 0.5))
                continue
            self.counts["opened"] += 1
            if first:
                first = False
                self.opened_once += 1
                if self.opened_once == self.count:
                    self.ready.set()
            async with stream:
                await self._trickle(stream)

    async def _trickle(self, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                try:
                    data = await stream.receive_some(4096)
                except (OSError, trio.BrokenResourceError):
                    data = b""
                self.counts["answered" if data else "closed_by_server"] += 1
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await trio.sleep(random.uniform(0, self.gap))  # spread the sockets' bytes over the gap
            try:
                for i in range(len(REQUEST)):
                    await stream.send_all(REQUEST[i : i + 1])
                    self.counts["bytes"] += 1
                    await trio.sleep(self.gap)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server closed it: `watch` counts that
            await trio.sleep_forever()  # the whole request went out: wait for the server to answer or close


async def _main(host: str, port: int, count: int, gap: float, sources: list[str]) -> None:
    attack = _Attack(host, port, count, gap, sources)
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(attack.socket_loop, i)

        async def report_ready() -> None:
            await attack.ready.wait()
            emit("ready", sockets=count)

        nursery.start_soon(report_ready)
        async for line in stdin_lines():
            if line == "exit":
                break
        emit("result", **attack.counts)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Run the attack until `exit` on stdin."""
    args = sys.argv[1:] if argv is None else argv
    host, port, count, gap, *sources = args
    raise_fd_limit()
    # An attacker is another machine: here it shares our two cores, so it yields them to the hub and the good
    # devices rather than measure how much CPU it can take from them.
    os.nice(10)
    trio.run(_main, host, int(port), int(count), float(gap), sources or ["127.0.0.1"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
