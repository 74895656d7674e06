"""The pipeline end to end with real sinks and servers: batching, acks after durability, spool, replay, splits."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import trio

from hub.ingest import FileSink, InfluxV2Sink, Mark, Pipeline, PipelineConfig, Spool
from hub.stats import Stats
from tests.ports import refused_port
from tests.servers import ScriptedWriteServer, VictoriaMetrics
from tests.waiting import eventually

TS = 1_700_000_000_000

FAST = PipelineConfig(
    max_lines=50, max_delay=0.05, queue_items=8, write_attempts=2, backoff_initial=0.05, backoff_max=0.2
)


def lines(start: int, n: int, measurement: str = "m") -> str:
    return "".join(f"{measurement},device=d f={i} {TS + i}\n" for i in range(start, start + n))


class Acks:
    """The `on_durable` callback: records marks in the order they come back."""

    def __init__(self) -> None:
        self.marks: list[Mark] = []

    async def __call__(self, marks: list[Mark]) -> None:
        self.marks.extend(marks)


def v2(url: str, timeout_s: float = 5.0) -> InfluxV2Sink:
    return InfluxV2Sink(url, token="t", org="o", bucket="b", timeout_s=timeout_s)


def make(
    sink: object, spool_dir: Path, config: PipelineConfig = FAST, max_bytes: int = 10_000_000, acks: Acks | None = None
) -> tuple[Pipeline, Stats, Acks, Spool]:
    stats, acks = Stats(), acks or Acks()
    spool = Spool(spool_dir, max_bytes=max_bytes)
    return Pipeline(sink, spool, config, stats, acks), stats, acks, spool  # type: ignore[arg-type]


async def test_writes_and_acks_in_order(victoria: VictoriaMetrics, tmp_path: Path) -> None:
    sink = v2(victoria.url)
    pipeline, stats, acks, spool = make(sink, tmp_path / "spool")
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for seq in range(1, 41):
            await pipeline.submit(lines((seq - 1) * 10, 10), 10, ("dev", seq))
        await pipeline.submit("", 0, ("dev", 41))  # a mark with no lines still comes back, in order
        pipeline.close_input()
    sink.close()
    spool.close()
    assert acks.marks == [("dev", seq) for seq in range(1, 42)]
    (series,) = victoria.wait_for_count('{__name__="m_f"}', 400)
    assert series["timestamps"] == [TS + i for i in range(400)]
    assert (stats.points_written, stats.points_spooled, stats.points_dropped, stats.write_errors) == (400, 0, 0, 0)
    assert 8 <= stats.batches_written <= 40


async def test_batch_flushes_at_max_lines(scripted: ScriptedWriteServer, tmp_path: Path) -> None:
    config = PipelineConfig(max_lines=25, max_delay=3600, queue_items=4, flush_when_idle=False)
    pipeline, _stats, acks, spool = make(v2(scripted.url), tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for seq in range(10):
            await pipeline.submit(lines(seq * 5, 5), 5, ("d", seq))
        await eventually(lambda: len(acks.marks) == 10)
        assert [body.count("\n") for _, body in scripted.requests] == [25, 25]
        await pipeline.submit(lines(50, 3), 3, ("d", 10))
        pipeline.close_input()  # shutdown flushes the partial batch
    spool.close()
    assert [body.count("\n") for _, body in scripted.requests] == [25, 25, 3]
    assert scripted.accepted_lines() == lines(0, 53).splitlines()


async def test_batch_flushes_after_max_delay(scripted: ScriptedWriteServer, tmp_path: Path) -> None:
    config = PipelineConfig(max_lines=1000, max_delay=0.05, flush_when_idle=False)
    pipeline, _stats, acks, spool = make(v2(scripted.url), tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await pipeline.submit(lines(0, 3), 3, ("d", 1))
        await eventually(lambda: acks.marks == [("d", 1)])  # input still open: the delay flushed it
        assert scripted.accepted_lines() == lines(0, 3).splitlines()
        pipeline.close_input()
    spool.close()


async def test_idle_writer_gets_a_batch_at_once(scripted: ScriptedWriteServer, tmp_path: Path) -> None:
    # An hour of batching delay, yet a lone line is written (and acked) as soon as it arrives: the writer was idle.
    config = PipelineConfig(max_lines=1000, max_delay=3600)
    pipeline, _stats, acks, spool = make(v2(scripted.url), tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for seq in (1, 2, 3):
            await pipeline.submit(lines(seq, 1), 1, ("d", seq))
            await eventually(lambda seq=seq: acks.marks[-1:] == [("d", seq)], timeout=60)
        pipeline.close_input()
    spool.close()
    assert [body.count("\n") for _, body in scripted.requests] == [1, 1, 1]


async def test_an_idle_writer_waits_the_early_flush_interval_after_its_last_write(
    scripted: ScriptedWriteServer, tmp_path: Path
) -> None:
    # The writer is idle again right after the first write, but the second line waits: early flushes come at most
    # once per `early_flush_interval` (an hour here), so a steady load does not keep the writer writing back to back.
    config = PipelineConfig(max_lines=1000, max_delay=3600, early_flush_interval=3600)
    pipeline, _stats, acks, spool = make(v2(scripted.url), tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await pipeline.submit(lines(1, 1), 1, ("d", 1))
        await eventually(lambda: acks.marks == [("d", 1)], timeout=60)  # the first: at once
        await pipeline.submit(lines(2, 1), 1, ("d", 2))
        await eventually(lambda: pipeline._receive.statistics().current_buffer_used == 0, timeout=60)
        await trio.sleep(0.2)  # the batcher holds it: nothing can write it before the hour is up
        assert len(scripted.requests) == 1 and acks.marks == [("d", 1)]
        pipeline.close_input()  # the end of input flushes what is held
    spool.close()
    assert [body.count("\n") for _, body in scripted.requests] == [1, 1]
    assert acks.marks == [("d", 1), ("d", 2)]


async def test_batch_flushes_at_max_bytes(scripted: ScriptedWriteServer, tmp_path: Path) -> None:
    one = lines(0, 1)
    config = PipelineConfig(max_lines=1000, max_delay=3600, max_bytes=len(one) * 4, flush_when_idle=False)
    pipeline, _stats, acks, spool = make(v2(scripted.url), tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for i in range(4):
            await pipeline.submit(lines(i, 1), 1, ("d", i))
        await eventually(lambda: len(acks.marks) == 4)
        pipeline.close_input()
    spool.close()
    assert [body.count("\n") for _, body in scripted.requests] == [4]


async def test_rejected_lines_split_out_and_dropped(
    scripted: ScriptedWriteServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse_bad(path: str, body: str) -> tuple[int, dict[str, str], bytes]:
        if "bad" in body:
            return 400, {}, b'{"code":"invalid","message":"unable to parse"}'
        return 204, {}, b""

    scripted.responder = refuse_bad
    pipeline, stats, acks, spool = make(v2(scripted.url), tmp_path / "spool")
    good = lines(0, 20).splitlines(keepends=True)
    batch = [*good[:3], "bad line one\n", *good[3:17], "bad line two\n", *good[17:]]
    with caplog.at_level(logging.WARNING, logger="hub.pipeline"):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            await pipeline.submit("".join(batch), len(batch), ("d", 1))
            pipeline.close_input()
    spool.close()
    assert acks.marks == [("d", 1)]
    assert scripted.accepted_lines() == [g.rstrip("\n") for g in good]
    assert (stats.points_written, stats.points_dropped, stats.points_spooled) == (20, 2, 0)
    assert stats.write_errors >= 2
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 2 and "bad line one" in dropped[0] and "bad line two" in dropped[1]


async def test_too_large_split_until_it_fits(scripted: ScriptedWriteServer, tmp_path: Path) -> None:
    scripted.responder = lambda path, body: (413, {}, b"") if body.count("\n") > 4 else (204, {}, b"")
    pipeline, stats, acks, spool = make(v2(scripted.url), tmp_path / "spool")
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await pipeline.submit(lines(0, 37), 37, ("d", 1))
        pipeline.close_input()
    spool.close()
    assert acks.marks == [("d", 1)]
    assert scripted.accepted_lines() == lines(0, 37).splitlines()
    assert all(body.count("\n") <= 4 for body in scripted.accepted)
    assert (stats.points_written, stats.points_dropped) == (37, 0)


async def test_retry_after_honoured(scripted: ScriptedWriteServer, tmp_path: Path) -> None:
    answers = iter([(429, {"Retry-After": "1"}, b"slow down")])
    scripted.responder = lambda path, body: next(answers, (204, {}, b""))
    pipeline, stats, acks, spool = make(v2(scripted.url), tmp_path / "spool")
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await pipeline.submit(lines(0, 5), 5, ("d", 1))
        pipeline.close_input()
    spool.close()
    assert acks.marks == [("d", 1)]
    assert len(scripted.requests) == 2
    assert scripted.times[1] - scripted.times[0] >= 0.9  # waited as told (backoff_initial is 0.05)
    assert (stats.write_errors, stats.write_retries, stats.points_written, stats.points_spooled) == (1, 1, 5, 0)


async def test_sink_down_spools_then_replays_in_order(
    scripted: ScriptedWriteServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = True
    scripted.responder = lambda path, body: (503, {}, b"") if down else (204, {}, b"")
    pipeline, stats, acks, spool = make(v2(scripted.url), tmp_path / "spool")
    with caplog.at_level(logging.INFO, logger="hub.pipeline"):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            for seq in range(20):
                await pipeline.submit(lines(seq * 10, 10), 10, ("d", seq))
            await eventually(lambda: len(acks.marks) == 20)  # acked while down: they are in the spool
            assert scripted.accepted == [] and pipeline.spool_depth > 0 and not pipeline.sink_up
            assert stats.points_spooled == 200 and stats.spool_bytes == spool.bytes_used > 0
            down = False
            for seq in range(20, 30):  # new data goes behind the spooled data
                await pipeline.submit(lines(seq * 10, 10), 10, ("d", seq))
            await eventually(lambda: pipeline.spool_depth == 0 and len(acks.marks) == 30)
            pipeline.close_input()
    spool.close()
    assert acks.marks == [("d", seq) for seq in range(30)]
    assert scripted.accepted_lines() == lines(0, 300).splitlines()
    assert stats.points_written == 300 and stats.points_replayed >= 200 and stats.spool_bytes == 0
    text = caplog.text
    assert "sink down" in text and "sink back" in text and "spool drained" in text
    assert text.index("sink down") < text.index("sink back") < text.index("spool drained")


async def test_victoriametrics_outage_mid_stream(victoria: VictoriaMetrics, tmp_path: Path) -> None:
    sink = v2(victoria.url, timeout_s=2.0)
    pipeline, stats, acks, spool = make(sink, tmp_path / "spool")
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        seq = 0

        async def send(n_messages: int) -> None:
            nonlocal seq
            for _ in range(n_messages):
                await pipeline.submit(lines(seq * 20, 20), 20, ("d", seq))
                seq += 1

        await send(10)
        await eventually(lambda: len(acks.marks) == 10)
        await trio.to_thread.run_sync(victoria.stop)
        await send(10)
        await eventually(lambda: len(acks.marks) == 20)
        assert stats.points_spooled > 0 and pipeline.spool_depth > 0
        await trio.to_thread.run_sync(victoria.start)
        await send(10)
        await eventually(lambda: pipeline.spool_depth == 0 and len(acks.marks) == 30)
        pipeline.close_input()
    sink.close()
    spool.close()
    assert acks.marks == [("d", s) for s in range(30)]
    (series,) = victoria.wait_for_count('{__name__="m_f"}', 600)
    assert series["timestamps"] == [TS + i for i in range(600)]
    assert stats.points_replayed > 0


async def test_hung_database_spools_after_the_deadline_and_acks_go_on(
    scripted: ScriptedWriteServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The database accepts the request and never answers (as a stopped process does) until released.
    release = threading.Event()

    def hang(path: str, body: str) -> tuple[int, dict[str, str], bytes]:
        release.wait()
        return 204, {}, b""

    scripted.responder = hang
    config = PipelineConfig(max_lines=10, max_delay=0.01, queue_items=4, spool_after=0.2)
    sink = v2(scripted.url, timeout_s=3600)  # the sink's own timeout never fires in this test
    pipeline, stats, acks, spool = make(sink, tmp_path / "spool", config)
    with caplog.at_level(logging.INFO, logger="hub.pipeline"):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            try:
                with trio.fail_after(60):  # without the deadline, submits block once the hung write fills the queues
                    for seq in range(20):
                        await pipeline.submit(lines(seq * 10, 10), 10, ("d", seq))
                # Every batch acked by the spool while the first write still hangs: it was abandoned, not
                # retried, and nothing overtook it (it keeps the sink lock until its thread returns).
                await eventually(lambda: len(acks.marks) == 20)
                assert len(scripted.requests) == 1 and scripted.accepted == []
                assert stats.points_spooled == 200 and not pipeline.sink_up
            finally:
                release.set()
            await eventually(lambda: pipeline.spool_depth == 0)
            pipeline.close_input()
    sink.close()
    spool.close()
    assert acks.marks == [("d", seq) for seq in range(20)]
    # The abandoned write was applied late, so its points reach the database twice: first late, then from
    # the spool, in order. (InfluxDB overwrites them; VictoriaMetrics needs -dedup.minScrapeInterval.)
    assert scripted.accepted_lines() == lines(0, 10).splitlines() + lines(0, 200).splitlines()
    assert "no answer within 0.2 s" in caplog.text


async def test_replay_coalesces_spooled_records_into_full_batches(
    scripted: ScriptedWriteServer, tmp_path: Path
) -> None:
    old = Spool(tmp_path / "spool", max_bytes=10_000_000)
    for i in range(40):
        old.append(lines(i * 10, 10))
    old.close()
    config = PipelineConfig(max_lines=100, max_delay=0.01)
    pipeline, stats, acks, spool = make(v2(scripted.url), tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await eventually(lambda: pipeline.spool_depth == 0)
        await pipeline.submit(lines(400, 5), 5, ("d", 1))
        await eventually(lambda: acks.marks == [("d", 1)])
        pipeline.close_input()
    spool.close()
    assert [body.count("\n") for _, body in scripted.requests] == [100, 100, 100, 100, 5]
    assert scripted.accepted_lines() == lines(0, 405).splitlines()
    assert stats.points_replayed == 400 and stats.batches_written == 5


async def test_return_of_an_unreachable_database_noticed_without_backoff(
    victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    # Backoff of ten minutes: only the sink checks every probe_interval can notice the return in time.
    config = PipelineConfig(
        max_lines=50, max_delay=0.01, write_attempts=1, backoff_initial=600, backoff_max=600, probe_interval=0.05
    )
    sink = v2(victoria.url, timeout_s=2.0)
    pipeline, stats, acks, spool = make(sink, tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await trio.to_thread.run_sync(victoria.stop)
        for seq in range(10):
            await pipeline.submit(lines(seq * 10, 10), 10, ("d", seq))
        await eventually(lambda: len(acks.marks) == 10 and stats.write_retries >= 1)
        assert pipeline.spool_depth > 0 and stats.points_written == 0
        await trio.to_thread.run_sync(victoria.start)
        await eventually(lambda: pipeline.spool_depth == 0 and pipeline.sink_up)
        pipeline.close_input()
    sink.close()
    spool.close()
    (series,) = victoria.wait_for_count('{__name__="m_f"}', 100)
    assert series["timestamps"] == [TS + i for i in range(100)]
    assert stats.points_replayed == 100


async def test_spool_from_previous_run_replayed_first(scripted: ScriptedWriteServer, tmp_path: Path) -> None:
    old = Spool(tmp_path / "spool", max_bytes=10_000_000)
    old.append(lines(0, 5, "old"))
    old.append(lines(5, 5, "old") + "bad old line\n")
    old.close()
    scripted.responder = lambda path, body: (400, {}, b"") if "bad" in body else (204, {}, b"")
    pipeline, stats, acks, spool = make(v2(scripted.url), tmp_path / "spool")
    assert pipeline.spool_depth == 2
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await pipeline.submit(lines(0, 5, "new"), 5, ("d", 1))
        await eventually(lambda: pipeline.spool_depth == 0 and acks.marks == [("d", 1)])
        pipeline.close_input()
    spool.close()
    assert scripted.accepted_lines() == (lines(0, 10, "old") + lines(0, 5, "new")).splitlines()
    assert stats.points_dropped == 1 and stats.points_replayed >= 10


async def test_spool_full_throttles_ingest_until_sink_back(
    scripted: ScriptedWriteServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = True
    scripted.responder = lambda path, body: (503, {}, b"") if down else (204, {}, b"")
    config = PipelineConfig(
        max_lines=10, max_delay=0.01, queue_items=2, write_attempts=1, backoff_initial=0.05, backoff_max=0.2
    )
    three_records = sum(8 + len(lines(seq * 10, 10)) for seq in range(3))
    pipeline, stats, acks, spool = make(v2(scripted.url), tmp_path / "spool", config, max_bytes=three_records)
    submitted = 0

    async def produce() -> None:
        nonlocal submitted
        for seq in range(20):
            await pipeline.submit(lines(seq * 10, 10), 10, ("d", seq))
            submitted += 1

    with caplog.at_level(logging.INFO, logger="hub.pipeline"):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            nursery.start_soon(produce)
            await eventually(lambda: stats.spool_full == 1 and pipeline.queued == 2)
            await trio.sleep(0.3)  # a few replay attempts fail meanwhile; nothing more may be acked
            assert len(acks.marks) == 3 and pipeline.spool_depth == 3
            assert submitted < 20
            down = False
            await eventually(lambda: submitted == 20)
            await eventually(lambda: pipeline.spool_depth == 0 and len(acks.marks) == 20)
            pipeline.close_input()
    spool.close()
    assert acks.marks == [("d", seq) for seq in range(20)]
    assert scripted.accepted_lines() == lines(0, 200).splitlines()
    assert stats.spool_full == 1
    assert caplog.text.count("spool full") == 1 and "room again" in caplog.text


async def test_shutdown_with_sink_down_spools_everything(tmp_path: Path) -> None:
    config = PipelineConfig(max_lines=10, max_delay=0.05, write_attempts=1)
    sink = v2(f"http://127.0.0.1:{refused_port()}")
    pipeline, stats, acks, spool = make(sink, tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for seq in range(5):
            await pipeline.submit(lines(seq * 7, 7), 7, ("d", seq))
        pipeline.close_input()
    spool.close()
    assert acks.marks == [("d", seq) for seq in range(5)]
    with Spool(tmp_path / "spool", max_bytes=10_000_000) as reopened:
        kept = []
        while (r := reopened.peek()) is not None:
            kept.append(r)
            reopened.pop()
    assert "".join(kept) == lines(0, 35)
    assert stats.points_spooled == 35 and stats.points_written == 0
    with pytest.raises(trio.ClosedResourceError):
        await pipeline.submit(lines(0, 1), 1, None)


async def run_until_cancelled(pipeline: Pipeline, acks: Acks) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)

        async def produce() -> None:
            for seq in range(10_000):
                await pipeline.submit(lines(seq * 3, 3), 3, ("d", seq))

        nursery.start_soon(produce)
        await eventually(lambda: len(acks.marks) >= 30)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("cancel_from_callback", [False, True])
async def test_hard_cancel_loses_no_acked_line(tmp_path: Path, cancel_from_callback: bool) -> None:
    config = PipelineConfig(max_lines=10, max_delay=0.01, write_attempts=1, queue_items=4)
    sink = v2(f"http://127.0.0.1:{refused_port()}")
    cancel_scope = trio.CancelScope()

    class CancellingAcks(Acks):
        async def __call__(self, marks: list[Mark]) -> None:
            await super().__call__(marks)
            if cancel_from_callback and len(self.marks) >= 30:
                cancel_scope.cancel()  # right at an ack: whatever it acked must already be on disk

    pipeline, _stats, acks, spool = make(sink, tmp_path / "spool", config, acks=CancellingAcks())
    with cancel_scope:
        await run_until_cancelled(pipeline, acks)
    spool.close()
    acked = {seq for _, seq in acks.marks}
    with Spool(tmp_path / "spool", max_bytes=10_000_000) as reopened:
        kept = set()
        while (r := reopened.peek()) is not None:
            kept.update(r.splitlines())
            reopened.pop()
    assert len(acked) >= 30
    for seq in acked:
        assert set(lines(seq * 3, 3).splitlines()) <= kept, seq


async def test_unauthorized_is_retried_and_logged_loudly(
    scripted: ScriptedWriteServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.responder = lambda path, body: (401, {}, b'{"message":"unauthorized access"}')
    pipeline, stats, acks, spool = make(v2(scripted.url), tmp_path / "spool")
    with caplog.at_level(logging.INFO, logger="hub.pipeline"):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            await pipeline.submit(lines(0, 2), 2, ("d", 1))
            await eventually(lambda: acks.marks == [("d", 1)] and stats.write_retries >= 3)
            pipeline.close_input()
    spool.close()
    assert stats.points_spooled == 2 and stats.points_dropped == 0
    assert any(r.levelno == logging.ERROR and "credentials" in r.getMessage() for r in caplog.records)


async def test_file_sink_pipeline(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "files")
    pipeline, _stats, acks, spool = make(sink, tmp_path / "spool")
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for seq in range(10):
            await pipeline.submit(lines(seq * 10, 10), 10, ("d", seq))
        pipeline.close_input()
    sink.close()
    spool.close()
    assert len(acks.marks) == 10
    files = sorted((tmp_path / "files").glob("*.lp"))
    assert "".join(p.read_text().removeprefix(sink.header.decode()) for p in files) == lines(0, 100)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PipelineConfig(max_lines=0)
    with pytest.raises(ValueError):
        PipelineConfig(write_attempts=0)
    with pytest.raises(ValueError):
        PipelineConfig(max_delay=-1)
    with pytest.raises(ValueError):
        PipelineConfig(spool_after=0)
    with pytest.raises(ValueError):
        PipelineConfig(probe_interval=0)


async def test_lines_that_came_while_the_writer_was_busy_are_written_once_it_is_idle(
    scripted: ScriptedWriteServer, tmp_path: Path
) -> None:
    # An hour of batching delay. The first line's write is held at the server; a second line comes meanwhile and
    # waits. Once the first write is done, the idle writer takes the second at once, not an hour (or a line) later.
    release, first_started = threading.Event(), threading.Event()

    def hold_the_first(path: str, body: str) -> tuple[int, dict[str, str], bytes]:
        if not first_started.is_set():
            first_started.set()
            release.wait(60)
        return 204, {}, b""

    scripted.responder = hold_the_first
    config = PipelineConfig(max_lines=1000, max_delay=3600)
    pipeline, _stats, acks, spool = make(v2(scripted.url), tmp_path / "spool", config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        await pipeline.submit(lines(1, 1), 1, ("d", 1))
        await eventually(first_started.is_set, timeout=60)
        await pipeline.submit(lines(2, 1), 1, ("d", 2))
        await eventually(lambda: pipeline._receive.statistics().current_buffer_used == 0, timeout=60)
        await trio.sleep(0.05)  # the batcher has taken the second line and holds it: the writer is busy
        release.set()
        await eventually(lambda: acks.marks == [("d", 1), ("d", 2)], timeout=60)
        pipeline.close_input()
    spool.close()
    assert [body.count("\n") for _, body in scripted.requests] == [1, 1]
