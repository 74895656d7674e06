"""The ingest pipeline: batch line protocol, write it to the sink, spool it while the sink is down, replay in order.

Guarantees: every queue is bounded; a mark is handed to `on_durable` only after every line
submitted with it (and before it) was written to the sink, appended and fsynced to the spool,
or refused by the database and dropped (logged and counted). While the spool holds records,
new batches go behind them so the database sees the data in order.

A batch whose write has not succeeded within `spool_after` seconds is spooled (and acked) without
waiting for the sink: the abandoned write stops retrying but may still be applied late, and its
points then reach the database twice (once late, once from the spool). The replayer writes spooled
records coalesced into batches of up to `max_lines`/`max_bytes`; while the sink does not answer at
all it checks it every `probe_interval` seconds, so its return is noticed within about that long.

Counters: `points_written` counts every point the sink accepted, replays included;
`points_replayed` is the part of it that came from the spool. Each successful write also
records its duration and size (`Stats.count_write`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeAlias, TypeVar, TypeVarTuple

import attrs
import trio

from hub.ingest._sinks import Sink, SinkError, SinkRejected, SinkTooLarge, SinkUnavailable
from hub.ingest._spool import Spool, SpoolFull
from hub.stats import Stats

__all__ = ["Mark", "OnDurable", "Pipeline", "PipelineConfig"]

log = logging.getLogger("hub.pipeline")

Mark = tuple[object, int]
"""(opaque device token, seq): handed back through `on_durable` once its lines are durable."""

OnDurable = Callable[[list[Mark]], Awaitable[None]]
#: What the pipeline's input channel carries: (lines, how many, mark or None).
_Item: TypeAlias = "tuple[str, int, Mark | None]"
_T = TypeVar("_T")
_N = TypeVar("_N", int, float)
_Ts = TypeVarTuple("_Ts")


def _positive(_inst: object, attribute: attrs.Attribute[_N], value: _N) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen
class PipelineConfig:
    """Batching, queueing and retry settings of the pipeline."""

    max_lines: int = attrs.field(default=5000, validator=_positive)  # flush a batch at this many lines
    max_delay: float = attrs.field(default=0.2, validator=attrs.validators.ge(0))  # ... or this long after its first
    max_bytes: int = attrs.field(default=8 * 2**20, validator=_positive)  # ... or at this many characters
    queue_items: int = attrs.field(default=1024, validator=_positive)  # bound of the input channel
    batch_queue: int = attrs.field(default=1, validator=attrs.validators.ge(0))  # batches between batcher and writer
    write_attempts: int = attrs.field(default=3, validator=_positive)  # sink tries before a batch is spooled
    backoff_initial: float = attrs.field(default=0.2, validator=_positive)
    backoff_max: float = attrs.field(default=30.0, validator=_positive)
    retry_after_cap: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))  # writer's Retry-After cap
    spool_after: float = attrs.field(default=2.0, validator=_positive)  # spool a batch not written within this
    probe_interval: float = attrs.field(default=1.0, validator=_positive)  # check an unreachable sink this often
    flush_when_idle: bool = True  # hand a batch to an idle writer at once instead of waiting max_delay ...
    # ... but no sooner than this long after the previous write began: a steadily loaded hub would write back to back
    early_flush_interval: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))


@attrs.frozen
class _Batch:
    text: str
    lines: int
    marks: list[Mark]


@attrs.define
class _Attempt:
    """One batch's direct write to the sink, in a task of its own so the writer can stop waiting for it."""

    pending: list[tuple[str, int]]  # unwritten pieces, oldest last
    done: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)  # cancelled: abandoned, no more retries


def _split(body: str) -> tuple[str, str] | None:
    """Two non-empty halves of `\\n`-terminated lines, cut at a line end near the middle; None for one line."""
    mid = len(body) // 2
    cut = body.find("\n", mid)
    if cut == -1 or cut == len(body) - 1:
        cut = body.rfind("\n", 0, mid)
        if cut == -1:
            return None
    return body[: cut + 1], body[cut + 1 :]


class Pipeline:
    """Batcher, writer and spool replayer for one sink. Start with `run()`, feed with `submit()`."""

    def __init__(
        self,
        sink: Sink,
        spool: Spool,
        config: PipelineConfig,
        stats: Stats,
        on_durable: OnDurable,
    ) -> None:
        self._sink = sink
        self._spool = spool
        self._config = config
        self._stats = stats
        self._on_durable = on_durable
        self._send, self._receive = trio.open_memory_channel[_Item](config.queue_items)
        self._sink_lock = trio.Lock()
        self._spool_lock = trio.Lock()
        self._spooled = trio.Event()  # set after an append: wakes the replayer
        self._room = trio.Event()  # set after a pop: wakes a writer waiting for spool room
        self._sink_up = True
        self._writer_idle = True  # the writer waits for a batch (see _early_flush_at)
        self._write_started = -math.inf  # when the writer last took a batch (trio's clock)
        self._holding: trio.CancelScope | None = None  # the batcher's wait while it holds lines (see _writer)
        self._spool_full = False  # in a spool-full episode: from full until at most a quarter full
        self._nursery: trio.Nursery | None = None  # runs write attempts, which may outlive the writer's wait
        stats.spool_bytes = spool.bytes_used

    # ------------------------------------------------------------------ public face

    @property
    def spool_depth(self) -> int:
        """Records (batches) waiting in the spool."""
        return self._spool.records

    @property
    def spool_bytes(self) -> int:
        """Bytes waiting in the spool."""
        return self._spool.bytes_used

    @property
    def queued(self) -> int:
        """Submitted items not yet taken by the batcher."""
        return self._send.statistics().current_buffer_used

    @property
    def sink_up(self) -> bool:
        """False from a failed write until the next successful one."""
        return self._sink_up

    async def submit(self, text: str, n_lines: int, mark: Mark | None = None) -> None:
        """Queue complete lines (each ending with `\\n`); blocks while the pipeline is full.

        `mark` comes back through `on_durable` once these lines are durable. Raises
        `trio.ClosedResourceError` after `close_input()`.
        """
        await self._send.send((text, n_lines, mark))

    def try_submit(self, text: str, n_lines: int, mark: Mark | None = None) -> bool:
        """`submit` without waiting or a checkpoint: False, with nothing queued, while the pipeline is full."""
        try:
            self._send.send_nowait((text, n_lines, mark))
        except trio.WouldBlock:
            return False
        return True

    def close_input(self) -> None:
        """No more submits: `run()` makes everything already submitted durable, then returns."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run batcher, writer and replayer until `close_input()` and a full drain.

        A write abandoned after `spool_after` is already spooled; `run()` still waits for its thread to
        return (at most the sink's timeout), since a thread cannot be cancelled.
        """
        log.info("pipeline: writing to %s", self._sink.description)
        if self._spool.records:
            log.info(
                "pipeline: %d spooled batches (%d bytes) from a previous run: replaying them first",
                self._spool.records,
                self._spool.bytes_used,
            )
        batch_send, batch_receive = trio.open_memory_channel[_Batch](self._config.batch_queue)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._replayer)
            async with trio.open_nursery() as ingest:
                ingest.start_soon(self._batcher, batch_send)
                ingest.start_soon(self._writer, batch_receive)
                task_status.started()
            nursery.cancel_scope.cancel()
        if self._spool.records:
            log.info("pipeline stopped: %d batches stay in the spool for the next start", self._spool.records)

    # ------------------------------------------------------------------ batcher

    async def _batcher(self, batch_send: trio.MemorySendChannel[_Batch]) -> None:
        cfg = self._config
        receive = self._receive
        parts: list[str] = []
        marks: list[Mark] = []
        lines = size = 0
        deadline = math.inf
        async with batch_send, receive:
            while True:
                item = None
                with trio.move_on_at(deadline) as wait:
                    # Holding lines the busy writer could not take: it ends this wait once it is idle.
                    self._holding = wait if deadline != math.inf and cfg.flush_when_idle else None
                    try:
                        item = await receive.receive()
                    except trio.EndOfChannel:
                        break
                    finally:
                        self._holding = None
                if item is not None:
                    while True:  # take what else is queued without a checkpoint per item
                        text, n, mark = item
                        if text:
                            parts.append(text)
                            lines += n
                            size += len(text)
                        if mark is not None:
                            marks.append(mark)
                        if lines >= cfg.max_lines or size >= cfg.max_bytes:
                            break
                        try:
                            item = receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break  # the end of input shows at the next receive
                    if deadline == math.inf:
                        deadline = trio.current_time() + cfg.max_delay
                    if lines < cfg.max_lines and size < cfg.max_bytes:
                        early = await self._early_flush_at(receive)
                        if early > trio.current_time():
                            deadline = min(deadline, early)
                            continue
                await batch_send.send(_Batch("".join(parts), lines, marks))
                parts, marks, lines, size, deadline = [], [], 0, 0, math.inf
            if parts or marks:
                await batch_send.send(_Batch("".join(parts), lines, marks))

    # ------------------------------------------------------------------ writer

    async def _early_flush_at(self, receive: trio.MemoryReceiveChannel[_Item]) -> float:
        """When to hand over a batch before it is full or due (trio's clock; inf: not early): once the writer is idle
        and nothing else is waiting, but not sooner than `early_flush_interval` after the last write began.

        Under load the writer is busy and batches grow by themselves; a quiet hub writes at once instead of
        waiting `max_delay`, so acks are not held back by the batching delay. In between, a steady load would keep
        an idle writer writing back to back, many small writes whose HTTP work in the writer thread takes the
        interpreter lock from the loop (measured: 2.0 -> 1.3 ms median command round trip with 1,000 devices
        streaming, at 0.05 s).
        """
        cfg = self._config
        if not (cfg.flush_when_idle and self._writer_idle):
            return math.inf
        await trio.lowlevel.checkpoint()  # let sessions that are ready to submit do so first
        if not (self._writer_idle and receive.statistics().current_buffer_used == 0):
            return math.inf
        return self._write_started + cfg.early_flush_interval

    async def _writer(self, batch_receive: trio.MemoryReceiveChannel[_Batch]) -> None:
        async with batch_receive:
            async for batch in batch_receive:
                self._writer_idle = False
                self._write_started = trio.current_time()
                if batch.lines:
                    await self._make_durable(batch.text, batch.lines)
                if batch.marks:
                    await self._on_durable(batch.marks)
                self._writer_idle = batch_receive.statistics().current_buffer_used == 0
                if self._writer_idle and self._holding is not None:
                    # Lines came while this batch was being written, and nothing since: without this they would
                    # wait for the next line or the batching delay (`max_delay`), and so would their acks.
                    self._holding.cancel()

    async def _make_durable(self, text: str, lines: int) -> None:
        cfg = self._config
        pending = [(text, lines)]
        if not self._spool.records:
            assert self._nursery is not None
            attempt = _Attempt(pending)
            self._nursery.start_soon(self._write_directly, attempt)
            with trio.move_on_after(cfg.spool_after):
                await attempt.done.wait()
            if not attempt.done.is_set():
                # Durability does not need the sink: spool what is unwritten and go on. A write in
                # progress keeps the sink lock until its thread returns, so nothing newer overtakes it.
                attempt.scope.cancel()
                self._note_sink_down(SinkUnavailable(f"no answer within {cfg.spool_after:g} s"))
            pending = list(attempt.pending)  # a copy: an abandoned attempt still pops what it writes late
        for piece, n in reversed(pending):
            await self._spool_append(piece, n)

    async def _write_directly(self, attempt: _Attempt) -> None:
        """Write `attempt.pending` with retries; stop early once abandoned. Sets `attempt.done`."""
        cfg = self._config
        delay = cfg.backoff_initial
        with attempt.scope:
            for number in range(1, cfg.write_attempts + 1):
                try:
                    await self._deliver(attempt.pending, replay=False)
                except SinkError as exc:
                    if attempt.scope.cancel_called:
                        break
                    if number == cfg.write_attempts:
                        self._note_sink_down(exc)
                        break
                    self._stats.write_retries += 1
                    wait = delay if exc.retry_after is None else min(exc.retry_after, cfg.retry_after_cap)
                    log.info("write failed (%s): retry %d in %.1f s", exc, number, wait)
                    await trio.sleep(wait)
                    delay = min(delay * 2, cfg.backoff_max)
                else:
                    if not self._sink_up and not self._spool.records:
                        self._note_sink_up()
                    break
        attempt.done.set()

    async def _spool_append(self, text: str, lines: int) -> None:
        """Append to the spool, waiting for room while it is full (that wait throttles ingest)."""
        delay = self._config.backoff_initial
        while True:
            room = self._room = trio.Event()  # before the append, so a pop in between is not missed
            try:
                await self._spool_call(self._spool.append, text)
            except SpoolFull as exc:
                if not self._spool.records:
                    await self._spool_oversized(text, lines, exc)
                    return
                if not self._spool_full:
                    self._spool_full = True
                    self._stats.spool_full += 1
                    log.warning("spool full (%s): ingest waits until replay frees room", exc)
                await room.wait()
                continue
            except OSError as exc:
                log.error("cannot append to the spool (%s): retrying in %.1f s", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self._config.backoff_max)
                continue
            break
        self._stats.points_spooled += lines
        self._stats.spool_bytes = self._spool.bytes_used
        self._spooled.set()

    async def _spool_oversized(self, text: str, lines: int, exc: SpoolFull) -> None:
        # Larger than the whole (empty) spool: spool it in pieces, or drop a single line loudly.
        halves = _split(text)
        if lines <= 1 or halves is None:
            self._stats.points_dropped += 1
            log.error("line larger than the whole spool (%s), dropped: %.200s", exc, text)
            return
        first, second = halves
        n_first = first.count("\n")
        await self._spool_append(first, n_first)
        await self._spool_append(second, lines - n_first)

    # ------------------------------------------------------------------ replayer

    async def _replayer(self) -> None:
        cfg = self._config
        delay = cfg.backoff_initial
        pending: list[tuple[str, int]] = []  # unwritten pieces of the oldest records, oldest last
        records = 0  # how many records those pieces came from
        peek = partial(self._spool.peek_many, max_bytes=cfg.max_bytes, max_lines=cfg.max_lines)
        while True:
            if not self._spool.records:
                spooled = self._spooled = trio.Event()
                await spooled.wait()
                continue
            if not pending:
                bodies = await self._spool_call(peek)
                if not bodies:
                    continue
                body = "".join(bodies)
                pending, records = [(body, body.count("\n"))], len(bodies)
            try:
                await self._deliver(pending, replay=True)
            except SinkError as exc:
                self._note_sink_down(exc)
                self._stats.write_retries += 1
                level = logging.ERROR if exc.status in (401, 403) else logging.INFO
                if exc.status is None:  # no answer at all: watch for its return rather than back off
                    log.log(
                        level,
                        "replay failed (%s): %d spooled batches, checking the sink every %.1f s",
                        exc,
                        self.spool_depth,
                        cfg.probe_interval,
                    )
                    await self._until_reachable()
                    continue
                wait = min(delay if exc.retry_after is None else exc.retry_after, cfg.backoff_max)
                log.log(level, "replay failed (%s): %d spooled batches, retry in %.1f s", exc, self.spool_depth, wait)
                await trio.sleep(wait)
                delay = min(delay * 2, cfg.backoff_max)
                continue
            with trio.CancelScope(shield=True):  # written: record that, even when shutting down
                await self._spool_call(self._spool.pop, records)
            delay = cfg.backoff_initial
            self._stats.spool_bytes = self._spool.bytes_used
            self._room.set()
            if self._spool_full and self._spool.bytes_used <= self._spool.max_bytes // 4:
                self._spool_full = False  # the episode ends with hysteresis, not at every freed record
                log.info("spool has room again (%d bytes used)", self._spool.bytes_used)
            if not self._sink_up:
                self._note_sink_up()
            if not self._spool.records:
                log.info("spool drained: writing directly to the sink again")

    # ------------------------------------------------------------------ sink

    async def _deliver(self, pending: list[tuple[str, int]], *, replay: bool) -> None:
        """Write the pieces on `pending` (oldest last), splitting refused ones, until none is left.

        Raises `SinkError` (unavailable) with the unwritten pieces still on `pending`.
        """
        stats = self._stats
        while pending:
            body, lines = pending[-1]
            try:
                seconds = await self._sink_write(body)
            except (SinkRejected, SinkTooLarge) as exc:
                stats.write_errors += 1
                pending.pop()
                halves = _split(body)
                if lines <= 1 or halves is None:
                    stats.points_dropped += 1
                    log.warning("sink refused a line (%s), dropped: %.200s", exc, body)
                    continue
                first, second = halves
                n_first = first.count("\n")
                log.info("sink refused %d lines (%s): retrying in halves", lines, exc)
                pending.append((second, lines - n_first))
                pending.append((first, n_first))
                continue
            except SinkError:
                stats.write_errors += 1
                raise
            pending.pop()
            stats.points_written += lines
            stats.batches_written += 1
            stats.count_write(seconds, lines)
            if replay:
                stats.points_replayed += lines

    async def _sink_write(self, body: str) -> float:
        """Write `body` to the sink; the seconds the write took (waiting for the lock excluded)."""
        async with self._sink_lock:
            started = time.perf_counter()
            await trio.to_thread.run_sync(self._sink.write, body, abandon_on_cancel=False)
            return time.perf_counter() - started

    async def _until_reachable(self) -> None:
        """Return once `sink.check()` answers; it is asked every `probe_interval` seconds."""
        while True:
            await trio.sleep(self._config.probe_interval)
            if await trio.to_thread.run_sync(self._sink.check, abandon_on_cancel=True):
                return

    async def _spool_call(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        async with self._spool_lock:
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=False)

    def _note_sink_down(self, exc: SinkError) -> None:
        if exc.status in (401, 403):
            log.error("sink %s refuses our credentials (%s): check the token; spooling", self._sink.description, exc)
        if self._sink_up:
            self._sink_up = False
            log.warning("sink down (%s): spooling batches until it is back", exc)

    def _note_sink_up(self) -> None:
        self._sink_up = True
        if self._spool.records:
            log.warning("sink back: replaying %d spooled batches", self._spool.records)
        else:
            log.warning("sink back")
