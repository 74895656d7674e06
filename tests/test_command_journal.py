"""The command store's journal: what `flush` wrote survives a killed process, a failed SQLite write and a torn line."""

from __future__ import annotations

import contextlib
import logging
import random
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from device_client import protocol
from device_client.protocol import Command, CommandAck, CommandResult, Hello, Welcome
from hub.fleet import CommandEvent, CommandRecord, CommandState, CommandStore
from hub.fleet._command_store import journal_files, stored
from hub.operator import open_control
from tests.hubproc import HubProcess
from tests.hubtools import add_devices, add_operators


def queued(n: int) -> CommandRecord:
    """Command `c-n` as submitted."""
    return CommandRecord(f"c-{n}", "d1", "x", {"n": n}, CommandState.QUEUED, 1.0, 1.0, 61.0, 30.0, None, "op")


def version(n: int, k: int) -> CommandRecord:
    """Command `c-n` after its first `k` transitions (0 queued, 1 sent, 2 delivered, 3 succeeded)."""
    rec = queued(n)
    if k >= 1:
        rec = rec.after(CommandEvent.SEND, 2.0)
    if k >= 2:
        rec = rec.after(CommandEvent.ACK, 3.0, delivered_at=3.0)
    if k >= 3:
        rec = rec.after(CommandEvent.SUCCEED, 4.0, result={"n": n})
    return rec


def sqlite_ids(path: Path) -> list[str]:
    """The command ids in SQLite itself (not the journal), read through a connection of its own."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT command_id FROM commands ORDER BY command_id")]


def test_a_flush_is_a_journal_line_and_sync_moves_it_into_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite3"
    store = CommandStore(path)
    try:
        store.put(queued(1))
        assert store.flush() == 1
        assert stored(path, "c-1") == queued(1)  # durable ...
        assert sqlite_ids(path) == []  # ... in the journal, not in SQLite yet
        assert [p.stat().st_size > 0 for p in journal_files(path)] == [True]
        assert store.sync() == 1
        assert sqlite_ids(path) == ["c-1"]
        assert [p.stat().st_size for p in journal_files(path)] == [0]  # a new, empty journal
        assert store.sync() == 0  # nothing new: no new file either
        assert len(journal_files(path)) == 1
        assert store.get("c-1") == queued(1)
    finally:
        store.close()
    assert journal_files(path) == []
    assert sqlite_ids(path) == ["c-1"]


def die_after(path: Path, steps: str) -> None:
    """Run `steps` on a store at `path` in a process of its own that then dies without closing it (as SIGKILL)."""
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_command_journal import queued, version
from hub.fleet import CommandStore
store = CommandStore({str(path)!r})
{textwrap.dedent(steps)}
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_what_was_flushed_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite3"
    die_after(
        path,
        """
        store.put(queued(1))
        store.put(queued(2))
        store.flush()
        store.sync()  # 1 and 2 in SQLite
        store.put(version(2, 1))
        store.put(queued(3))
        store.flush()  # the newer 2 and 3 in the journal only
        store.put(queued(4))  # put, never flushed: not promised, lost with the process
        """,
    )
    assert sqlite_ids(path) == ["c-1", "c-2"]
    assert [stored(path, f"c-{n}") for n in (1, 2, 3, 4)] == [queued(1), version(2, 1), queued(3), None]
    left = journal_files(path)
    assert len(left) == 1  # the one written after the sync (the one before it was removed)
    reopened = CommandStore(path)
    try:
        assert sqlite_ids(path) == ["c-1", "c-2", "c-3"]  # replayed at the open
        assert [reopened.get(f"c-{n}") for n in (1, 2, 3, 4)] == [queued(1), version(2, 1), queued(3), None]
        assert [p for p in journal_files(path) if p in left] == []
    finally:
        reopened.close()
    assert journal_files(path) == []


def test_a_failed_sqlite_write_keeps_the_journal_until_one_works(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite3"
    store = CommandStore(path)
    try:
        store.put(queued(1))
        store.flush()
        with contextlib.closing(sqlite3.connect(path)) as other:  # SQLite refuses every new row for a while
            other.execute("CREATE TRIGGER refuse BEFORE INSERT ON commands BEGIN SELECT RAISE(ABORT, 'disk full'); END")
            other.commit()
        store.put(queued(2))
        with pytest.raises(sqlite3.Error, match="disk full"):
            store.sync()
        store.put(version(1, 1))
        store.flush()  # flushes go on meanwhile
        with pytest.raises(sqlite3.Error):
            store.sync()
        assert sqlite_ids(path) == []
        assert [stored(path, f"c-{n}") for n in (1, 2)] == [version(1, 1), queued(2)]
        assert len(journal_files(path)) == 3  # two retired, unsynced, and the current one
        with contextlib.closing(sqlite3.connect(path)) as other:
            other.execute("DROP TRIGGER refuse")
            other.commit()
        assert store.sync() == 2
        assert sqlite_ids(path) == ["c-1", "c-2"]
        assert store.get("c-1") == version(1, 1)  # the newer version, not the retired file's
        assert [p.stat().st_size for p in journal_files(path)] == [0]
    finally:
        store.close()


def test_a_torn_last_line_is_skipped_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "commands.sqlite3"
    die_after(path, "store.put(queued(1))\nstore.put(queued(2))\nstore.flush()")
    (journal,) = journal_files(path)
    whole = journal.read_bytes()
    journal.write_bytes(whole[: whole.index(b"\n") + 1] + whole[whole.index(b"\n") + 1 : -20])  # power lost mid-write
    caplog.set_level(logging.WARNING, logger="hub.commands")
    reopened = CommandStore(path)
    try:
        assert [reopened.get("c-1"), reopened.get("c-2")] == [queued(1), None]
    finally:
        reopened.close()
    warnings = [r for r in caplog.records if r.getMessage() == "command journal: unreadable lines skipped"]
    assert [r.kv for r in warnings] == [{"file": journal.name, "lines": 1}]  # type: ignore[attr-defined]


def test_journal_lines_keep_integers_orjson_cannot(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite3"
    big = 2**70 + 1
    store = CommandStore(path)
    try:
        rec = version(1, 2).after(CommandEvent.SUCCEED, 4.0, result={"big": big, "s": "é\u2028"})
        store.put(rec)
        store.flush()
        assert stored(path, "c-1") == rec
    finally:
        store.close()


async def test_a_hub_killed_with_sigkill_keeps_every_command_it_accepted(tmp_path: Path) -> None:
    """Commands accepted (queued) and finished through a real `hub serve`, which is then killed: started again on
    its data directory, it has every one of them, in the state the operator was told."""
    tokens = add_devices(tmp_path, "d1", "d2")
    ops = add_operators(tmp_path, op="operator")
    hub = HubProcess(tmp_path, "--log-level", "info")
    await trio.to_thread.run_sync(hub.start)
    control = f"ws://127.0.0.1:{hub.port}/v1/control"
    told: dict[str, str] = {}
    try:
        headers = [(b"authorization", f"Bearer {tokens['d1']}".encode())]
        async with open_websocket_url(hub.url, extra_headers=headers) as ws, open_control(control, ops["op"]) as ctl:
            await ws.send_message(protocol.encode(Hello()))
            assert isinstance(protocol.decode(await ws.get_message()), Welcome)

            async def device() -> None:  # d1 answers every command: ok for even n, failed for odd
                while True:
                    msg = protocol.decode(await ws.get_message())
                    if isinstance(msg, Command):
                        ok = msg.args["n"] % 2 == 0  # type: ignore[operator]
                        await ws.send_message(protocol.encode(CommandAck(msg.id)))
                        await ws.send_message(protocol.encode(CommandResult(msg.id, ok, None, "" if ok else "no")))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(device)
                for n in range(40):
                    rec = await ctl.send_command("d2", "later", {"n": n})  # offline: accepted, stays queued
                    told[rec["command_id"]] = rec["state"]
                    rec = await ctl.send_command("d1", "now", {"n": n}, wait=True, wait_timeout=30)
                    told[rec["command_id"]] = rec["state"]
                nursery.cancel_scope.cancel()
            await trio.to_thread.run_sync(hub.kill)  # at once: within the write-behind's 0.2 s
        await trio.to_thread.run_sync(hub.start)
        async with open_control(control, ops["op"]) as ctl:
            after = {rec["command_id"]: rec["state"] for rec in await ctl.commands(limit=1000)}
    finally:
        await trio.to_thread.run_sync(hub.kill)
    assert sorted(told.values()).count("queued") == 40
    assert sorted(told.values()).count("succeeded") == sorted(told.values()).count("failed") == 20
    assert after == told


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_while_flushing_syncing_and_reading_it_keeps_every_flushed_version(tmp_path: Path, seed: int) -> None:
    """A process flushes command versions one by one (printing each once `flush` returned) while one thread syncs and
    checkpoints and another reads, over and over; it is killed at a random moment. Opened again, the store has, for
    every command, at least the last version it was told was flushed."""
    path = tmp_path / "commands.sqlite3"
    script = f"""
import sys, threading
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_command_journal import version
from hub.fleet import CommandStore
store = CommandStore({str(path)!r})
def forever(step):
    while True:
        step()
threading.Thread(target=forever, args=(lambda: (store.sync(), store.checkpoint()),), daemon=True).start()
threading.Thread(target=forever, args=(lambda: (store.list(limit=20), store.get("c-3")),), daemon=True).start()
for i in range(1_000_000):
    store.put(version(*divmod(i, 4)))
    store.flush()
    print(i, flush=True)
"""
    kill_after = random.Random(seed).randrange(400, 3000)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    flushed = -1
    try:
        for line in child.stdout:
            flushed = int(line)
            if flushed >= kill_after:
                break
        child.kill()
        flushed = max([flushed, *map(int, child.stdout.read().split())])  # printed before the kill: flushed too
    finally:
        child.kill()
        child.wait(30)
    assert flushed >= kill_after, f"the child stopped at {flushed}"
    last_n, last_k = divmod(flushed, 4)
    store = CommandStore(path)
    try:
        found = {rec.command_id: rec for rec in store.list(limit=last_n + 10)}
        for n in range(last_n):
            assert found.pop(f"c-{n}") == version(n, 3)
        newest = found.pop(f"c-{last_n}")
        assert len(newest.history) >= last_k and newest == version(last_n, len(newest.history))  # a step each
        assert set(found) <= {f"c-{last_n + 1}"}  # put and maybe flushed after the last line printed, no more
    finally:
        store.close()
    assert journal_files(path) == []
