"""The spool: nothing appended is lost, nothing is handed out twice, the disk stays bounded."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from genai_mlflow.exporter.spool import Record, Spool, encode_frame

LOGGER = "genai_mlflow.exporter.spool"


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_spool(spool_dir: Path) -> Iterator[Callable[..., Spool]]:
    spools: list[Spool] = []

    def make(**options: int | bool) -> Spool:
        spool = Spool(spool_dir, **options)  # type: ignore[arg-type]
        spools.append(spool)
        return spool

    yield make
    for spool in spools:
        spool.close()


def drain(spool: Spool, batch: int = 1000) -> list[Record]:
    records: list[Record] = []
    while got := spool.read(batch):
        records.extend(got)
    return records


def segment_files(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith("seg-") and p.name.endswith(".log")
    )


def run_script(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def expect_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == expected, f"child said {line!r}, exit code {proc.poll()}"


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


APPENDER = """
    import os, sys, time
    from genai_mlflow.exporter.spool import Spool

    spool = Spool(sys.argv[1], segment_bytes=int(sys.argv[3]))
    for i in range(int(sys.argv[2])):
        assert spool.append(f"{os.getpid()}:{i}".encode())
        time.sleep(float(sys.argv[4]))
    print("appended", flush=True)
    if sys.argv[5] == "close":
        spool.close()
    else:
        time.sleep(60)
"""

DRAINER = """
    import sys
    from genai_mlflow.exporter.spool import Spool

    spool = Spool(sys.argv[1])
    for command in sys.stdin:
        if command.strip() == "acquire":
            print("locked" if spool.acquire_drain_lock() else "busy", flush=True)
        else:
            spool.release_drain_lock()
            print("released", flush=True)
"""


# --- appending and reading -----------------------------------------------------------------------


def test_round_trip(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool()
    payloads = [b"first", b"", os.urandom(300_000), b"last"]
    assert all(spool.append(p) for p in payloads)
    assert spool.acquire_drain_lock()

    records = spool.read()

    assert [r.payload for r in records] == payloads
    assert not any(r.replayed for r in records)  # written by a live writer: this one
    assert len({r.id for r in records}) == len(records)
    assert spool.read() == []  # handed out once
    spool.commit(r.id for r in records)
    assert spool.read() == []
    assert spool.dropped == 0


def test_records_of_a_segment_come_in_append_order_across_batches(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool()
    payloads = [f"record {i}".encode() for i in range(200)]
    for payload in payloads:
        spool.append(payload)
    spool.acquire_drain_lock()

    records = drain(spool, batch=7)

    assert [r.payload for r in records] == payloads
    assert len({r.id.segment for r in records}) == 1
    assert [r.id for r in records] == sorted(r.id for r in records)


def test_segments_rotate_and_finished_ones_are_deleted_once_committed(
    make_spool: Callable[..., Spool], spool_dir: Path
) -> None:
    spool = make_spool(segment_bytes=2_000)
    payloads = [bytes([i]) * 200 for i in range(100)]
    for payload in payloads:
        spool.append(payload)
    files = segment_files(spool_dir)
    assert len(files) >= 10
    assert all((spool_dir / name).stat().st_size <= 2_000 for name in files)
    spool.acquire_drain_lock()

    records = drain(spool)
    assert [r.payload for r in records] == payloads  # oldest segment first
    spool.commit(r.id for r in records)

    assert segment_files(spool_dir) == [files[-1]]  # only the one still being appended to is kept


def test_restart_redelivers_exactly_the_uncommitted_records_as_replayed(
    make_spool: Callable[..., Spool], spool_dir: Path
) -> None:
    first = make_spool(segment_bytes=1_000)
    payloads = [f"payload {i:02d}".encode() * 5 for i in range(30)]
    for payload in payloads:
        first.append(payload)
    first.acquire_drain_lock()
    records = drain(first)
    committed = {29, 3, 0, 1, 17, 12, 2, 28, 4}
    first.commit([records[i].id for i in (29, 3, 0, 1)])  # out of order, in two calls
    first.commit([records[i].id for i in (17, 12, 2, 28, 4)])
    first.close()

    second = make_spool()
    assert second.acquire_drain_lock()
    again = drain(second)

    assert [r.payload for r in again] == [p for i, p in enumerate(payloads) if i not in committed]
    assert all(r.replayed for r in again)  # their writer (the first run) is gone
    second.commit(r.id for r in again[::2])
    second.close()

    third = make_spool()
    third.acquire_drain_lock()
    rest = drain(third)
    assert [r.payload for r in rest] == [r.payload for r in again[1::2]]
    third.commit(r.id for r in rest)
    assert segment_files(spool_dir) == []


def test_records_of_a_killed_process_are_all_read_and_replayed(
    make_spool: Callable[..., Spool], spool_dir: Path
) -> None:
    proc = run_script(APPENDER, spool_dir, 50, 200, 0, "sleep")
    try:
        expect_line(proc, "appended")
        assert len(segment_files(spool_dir)) > 2  # rotated ones too
        # While it lives, its records are not replays: more of its traces may follow.
        before = make_spool()
        before.acquire_drain_lock()
        assert [r.replayed for r in drain(before)] == [False] * 50
        before.release_drain_lock()
    finally:
        kill(proc)

    drainer = make_spool()
    assert drainer.acquire_drain_lock()
    records = drain(drainer)

    assert [r.payload for r in records] == [f"{proc.pid}:{i}".encode() for i in range(50)]
    assert all(r.replayed for r in records)
    drainer.commit(r.id for r in records)
    assert segment_files(spool_dir) == []


def test_a_half_written_frame_of_a_live_writer_is_left_for_later(
    make_spool: Callable[..., Spool], spool_dir: Path
) -> None:
    # A writer from outside, with the documented layout: a held writer lock and a held segment.
    spool_dir.mkdir()
    writer = f"{os.getpid() + 1_000_000}-{time.time_ns()}"
    lock_fd = os.open(spool_dir / f"writer-{writer}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    seg_fd = os.open(spool_dir / f"seg-{time.time_ns():020d}-{writer}-000001.log", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(seg_fd, fcntl.LOCK_EX)
    one, two, three = encode_frame(b"one"), encode_frame(b"two" * 100), encode_frame(b"three")
    os.write(seg_fd, one + two[:50])
    drainer = make_spool()
    drainer.acquire_drain_lock()

    assert [(r.payload, r.replayed) for r in drainer.read()] == [(b"one", False)]
    os.write(seg_fd, two[50:] + three[:5])
    assert [r.payload for r in drainer.read()] == [b"two" * 100]
    assert drainer.corrupt_frames == 0

    os.close(seg_fd)  # the writer dies mid-frame
    os.close(lock_fd)
    assert drainer.read() == []
    assert drainer.corrupt_frames == 1


def test_a_record_is_handed_out_once_per_spool_even_across_a_release(
    make_spool: Callable[..., Spool],
) -> None:
    spool = make_spool()
    for i in range(5):
        spool.append(b"%d" % i)
    spool.acquire_drain_lock()
    records = spool.read()
    spool.commit([records[0].id])

    spool.release_drain_lock()
    spool.acquire_drain_lock()

    assert spool.read() == []  # records[1:] are still out with the caller
    spool.append(b"5")
    assert [r.payload for r in spool.read()] == [b"5"]


# --- draining: one drainer at a time ---------------------------------------------------------------


def test_one_drainer_at_a_time_within_a_process(make_spool: Callable[..., Spool]) -> None:
    first, second = make_spool(), make_spool()
    assert first.acquire_drain_lock()
    assert first.acquire_drain_lock()  # already held
    assert not second.acquire_drain_lock()
    with pytest.raises(RuntimeError, match="drain lock"):
        second.read()

    first.release_drain_lock()
    assert second.acquire_drain_lock()
    assert not first.acquire_drain_lock()


def test_one_drainer_at_a_time_across_processes(make_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = make_spool()
    proc = run_script(DRAINER, spool_dir)
    assert proc.stdin is not None
    try:
        proc.stdin.write("acquire\n")
        proc.stdin.flush()
        expect_line(proc, "locked")
        assert not spool.acquire_drain_lock()
        assert spool.status().drain_locked_by_other

        proc.stdin.write("release\n")
        proc.stdin.flush()
        expect_line(proc, "released")
        assert spool.acquire_drain_lock()
        proc.stdin.write("acquire\n")
        proc.stdin.flush()
        expect_line(proc, "busy")
        spool.release_drain_lock()

        proc.stdin.write("acquire\n")
        proc.stdin.flush()
        expect_line(proc, "locked")
        assert not spool.acquire_drain_lock()
    finally:
        kill(proc)
    assert spool.acquire_drain_lock()  # its holder died
    assert not spool.status().drain_locked_by_other


# --- processes and threads -------------------------------------------------------------------------


def test_after_fork_parent_and_child_append_to_their_own_segments(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool()
    assert spool.acquire_drain_lock()
    spool.ledger_put("before fork", "parent")  # the parent has a database connection open
    spool.append(b"parent before fork")
    count = 500

    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, and never return into pytest
        code = 1
        try:
            ok = not spool.acquire_drain_lock()  # the parent holds it, not the child
            try:
                spool.read()
                ok = False
            except RuntimeError:
                pass
            for i in range(count):
                ok = spool.append(b"child %d" % i) and ok
            spool.ledger_put("child", "wrote")
            ok = ok and spool.ledger_get("before fork") == "parent"
            code = 0 if ok else 2
        finally:
            os._exit(code)

    for i in range(count):
        assert spool.append(b"parent %d" % i)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    records = drain(spool)
    payloads = [r.payload for r in records]
    expected = [b"parent before fork"] + [b"parent %d" % i for i in range(count)]
    expected += [b"child %d" % i for i in range(count)]
    assert sorted(payloads) == sorted(expected)  # each exactly once, none torn
    assert spool.corrupt_frames == 0
    child_segments = {r.id.segment for r in records if r.payload.startswith(b"child")}
    parent_segments = {r.id.segment for r in records if r.payload.startswith(b"parent")}
    assert child_segments.isdisjoint(parent_segments)
    assert all(f"-{pid}-" in name for name in child_segments)
    assert [r.payload for r in records if r.id.segment in child_segments] == [
        b"child %d" % i for i in range(count)
    ]
    assert spool.ledger_get("child") == "wrote"
    assert spool.ledger_get("before fork") == "parent"


def test_concurrent_appends_from_8_threads(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool(segment_bytes=16_000)
    per_thread = 400
    start = threading.Barrier(8)
    failures: list[bytes] = []

    def append(thread: int) -> None:
        start.wait()
        for i in range(per_thread):
            payload = f"thread {thread} record {i} ".encode() * 4
            if not spool.append(payload):
                failures.append(payload)

    threads = [threading.Thread(target=append, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    spool.acquire_drain_lock()
    payloads = [r.payload for r in drain(spool)]
    expected = [f"thread {t} record {i} ".encode() * 4 for t in range(8) for i in range(per_thread)]
    assert len(payloads) == len(expected)
    assert set(payloads) == set(expected)
    assert spool.corrupt_frames == 0


def test_many_appender_processes_and_one_drainer(make_spool: Callable[..., Spool], spool_dir: Path) -> None:
    drainer = make_spool()
    assert drainer.acquire_drain_lock()
    procs = [run_script(APPENDER, spool_dir, 300, 4_000, 0.0005, "close") for _ in range(4)]
    seen: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(seen) < 1_200 and time.monotonic() < deadline:  # drain while they append
            records = drainer.read(100)
            seen.extend(r.payload for r in records)
            drainer.commit(r.id for r in records)
            if not records:
                time.sleep(0.01)
        for proc in procs:
            expect_line(proc, "appended")
            assert proc.wait(10) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill(proc)

    seen.extend(r.payload for r in drain(drainer))
    expected = {f"{proc.pid}:{i}".encode() for proc in procs for i in range(300)}
    assert len(seen) == len(expected)
    assert set(seen) == expected
    for proc in procs:  # each writer's records in its order
        mine = [p for p in seen if p.startswith(f"{proc.pid}:".encode())]
        assert mine == [f"{proc.pid}:{i}".encode() for i in range(300)]
    assert drainer.corrupt_frames == 0
    drainer.commit([])
    drainer.read()
    assert segment_files(spool_dir) == []


# --- the disk bound --------------------------------------------------------------------------------


def test_appends_past_the_bound_are_dropped_counted_and_logged_once(
    make_spool: Callable[..., Spool], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = make_spool(max_bytes=20_000, segment_bytes=4_000)
    payload = b"x" * 1_000

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = [spool.append(payload) for _ in range(40)]

    accepted = results.count(True)
    assert 10 < accepted < 40
    assert results == [True] * accepted + [False] * (40 - accepted)
    assert spool.dropped == 40 - accepted
    assert spool.status().dropped == spool.dropped
    assert sum((spool_dir / n).stat().st_size for n in segment_files(spool_dir)) <= 20_000
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "full" in warnings[0].getMessage()

    assert spool.acquire_drain_lock()
    records = drain(spool)
    assert len(records) == accepted
    spool.commit(r.id for r in records)
    assert segment_files(spool_dir) == []
    assert spool.append(payload)
    assert spool.dropped == 40 - accepted


def test_append_never_raises(make_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = make_spool()
    spool_dir.rmdir()  # the directory vanished before the first append
    assert spool.append(b"lost") is False
    assert spool.append(None) is False  # type: ignore[arg-type]
    spool_dir.mkdir()
    assert spool.append(b"kept")
    spool.close()
    assert spool.append(b"after close") is False
    assert spool.dropped == 3


# --- damage on disk --------------------------------------------------------------------------------

PAYLOADS = [f"record {i} ".encode() * (i + 1) for i in range(10)]
FRAMES = [encode_frame(p) for p in PAYLOADS]
STARTS = [sum(len(f) for f in FRAMES[:i]) for i in range(len(FRAMES))]


def _torn_tail(data: bytes) -> bytes:
    return data[: STARTS[9] + len(FRAMES[9]) // 2]


def _flipped_payload_byte(data: bytes) -> bytes:
    at = STARTS[3] + 20
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _broken_magic(data: bytes) -> bytes:
    return data[: STARTS[3]] + b"XXXX" + data[STARTS[3] + 4 :]


def _huge_length(data: bytes) -> bytes:
    return data[: STARTS[3] + 4] + (0x7FFFFFF0).to_bytes(4, "little") + data[STARTS[3] + 8 :]


def _garbage_between_frames(data: bytes) -> bytes:
    return data[: STARTS[6]] + b"\x00garbage\xd3GMS" * 7 + data[STARTS[6] :]


@pytest.mark.parametrize(
    ("damage", "lost"),
    [
        (_torn_tail, {9}),
        (_flipped_payload_byte, {3}),
        (_broken_magic, {3}),
        (_huge_length, {3}),
        (_garbage_between_frames, set()),
    ],
)
def test_damaged_segments_still_deliver_every_valid_record(
    make_spool: Callable[..., Spool],
    spool_dir: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes], bytes],
    lost: set[int],
) -> None:
    writer = make_spool()
    for payload in PAYLOADS:
        writer.append(payload)
    writer.close()
    (name,) = segment_files(spool_dir)
    path = spool_dir / name
    assert path.read_bytes() == b"".join(FRAMES)
    path.write_bytes(damage(path.read_bytes()))

    drainer = make_spool()
    drainer.acquire_drain_lock()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        records = drain(drainer)

    assert [r.payload for r in records] == [p for i, p in enumerate(PAYLOADS) if i not in lost]
    assert drainer.corrupt_frames == 1
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    drainer.commit(r.id for r in records)
    assert segment_files(spool_dir) == []  # the damaged region does not pin the segment


# --- status and ledger -----------------------------------------------------------------------------


def test_status(make_spool: Callable[..., Spool], spool_dir: Path) -> None:
    drainer = make_spool(segment_bytes=1_000)
    for i in range(40):
        drainer.append(b"status %d" % i * 10)
    drainer.acquire_drain_lock()
    records = drain(drainer)
    drainer.commit(r.id for r in records[:15])
    drainer.read()  # persists progress

    status = drainer.status()
    assert status.directory == str(spool_dir)
    assert status.segments == len(segment_files(spool_dir))
    assert status.bytes == sum((spool_dir / n).stat().st_size for n in segment_files(spool_dir))
    assert status.pending_records == 25
    assert status.live_writers == 1
    assert not status.drain_locked_by_other

    observer = make_spool()  # e.g. `genai-mlflow spool status` in another process
    seen = observer.status()
    assert seen.pending_records == 25
    assert seen.live_writers == 1
    assert seen.drain_locked_by_other


def test_ledger_survives_reopening_and_forgets_old_entries(
    make_spool: Callable[..., Spool], spool_dir: Path
) -> None:
    spool = make_spool()
    assert spool.ledger_get("trace:1") is None
    spool.ledger_put("trace:1", "run-a|created")
    spool.ledger_put("trace:1", "run-a|done")
    spool.ledger_put("trace:old", "run-b|done")
    spool.close()
    with sqlite3.connect(spool_dir / "spool.db") as db:  # age one entry past 30 days
        db.execute("UPDATE ledger SET updated = updated - 31 * 86400 WHERE key = 'trace:old'")
    db.close()

    reopened = make_spool()
    assert reopened.ledger_get("trace:1") == "run-a|done"
    reopened.ledger_put("trace:2", "run-c|created")  # pruning happens on writes, now and then
    assert reopened.ledger_get("trace:old") is None
    assert reopened.ledger_get("trace:2") == "run-c|created"


def test_fsync_mode_round_trip(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool(fsync=True, segment_bytes=100)
    for i in range(5):
        assert spool.append(b"durable %d" % i)
    spool.acquire_drain_lock()
    assert [r.payload for r in drain(spool)] == [b"durable %d" % i for i in range(5)]
