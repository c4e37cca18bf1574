"""The spool: a durable on-disk queue of OTLP records, between the app and the writer that drains it.

Any thread of any process appends; one drainer per directory (across processes) reads and commits.
A spool directory holds:

``seg-<created_ns>-<pid>-<writer_start_ns>-<seq>.log``
    Segments. Each is appended to by one writer (a ``Spool`` object in one process), which holds an
    exclusive ``flock`` on it while it is current. Unlocked means finished: rotated away, closed, or
    its process died. Names sort oldest first.
``writer-<pid>-<writer_start_ns>.lock``
    Held (``flock``) by a writer from its first append until it closes or dies. A record whose
    writer is gone is ``replayed``: it may have been delivered before a crash, and no more records
    of that writer will come.
``drain.lock``
    Held (``flock``) by the one drainer. Holds its pid, for ``status()`` only.
``spool.db`` (SQLite, WAL)
    The drainer's progress per segment, and the ledger.
``*.tmp``
    A segment or writer lock being created: files get their final name only once locked, so that
    nobody ever sees a live writer's file unlocked.

A frame is ``magic (4 bytes) | length (uint32 LE) | CRC32 of length and payload (uint32 LE) | payload``.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import sqlite3
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

from genai_mlflow.throttle import Throttle

logger = logging.getLogger(__name__)

MAGIC = b"\xd3GMS"
_HEADER = struct.Struct("<4sII")
HEADER_SIZE = _HEADER.size
# Records are OTLP requests of a few KB to a few MB; a larger length field is corruption.
MAX_PAYLOAD = 256 << 20

_SEGMENT_RE = re.compile(r"^seg-\d{20}-(\d+-\d+)-\d+\.log$")
_WRITER_RE = re.compile(r"^writer-(\d+-\d+)\.lock$")
TMP_SUFFIX = ".tmp"
DRAIN_LOCK_NAME = "drain.lock"
DB_NAME = "spool.db"

_RESCAN_S = 0.5  # how stale the appender's view of the directory size may get
_PERSIST_S = 0.1  # how often commit() writes progress at most
_WARN_S = 10.0  # at most one warning of a kind per this many seconds
_MAINTAIN_S = 10.0  # how often the drainer clears what crashed processes left behind
_STALE_TMP_S = 60.0
_LEDGER_TTL_S = 30 * 86400.0
_PRUNE_S = 3600.0
_READ_CHUNK = 1 << 20
_INDEX_CHUNK = 64 << 10

_OK, _SHORT, _BAD = 0, 1, 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS progress (
    segment TEXT PRIMARY KEY,
    watermark INTEGER NOT NULL,  -- every frame below this offset is committed
    done TEXT NOT NULL           -- JSON list: committed frame offsets above the watermark
);
CREATE TABLE IF NOT EXISTS ledger (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_updated ON ledger (updated);
"""


@dataclass(frozen=True, order=True)
class RecordId:
    segment: str  # segment file name
    offset: int  # byte offset of the record's frame in that segment


@dataclass(frozen=True)
class Record:
    id: RecordId
    payload: bytes
    # Written by a writer that is gone (another process that died, or an earlier run): it may have
    # been delivered before a crash, and its writer will add nothing more.
    replayed: bool


@dataclass(frozen=True)
class SpoolStatus:
    directory: str
    segments: int
    bytes: int
    pending_records: int  # not yet committed (counted up to the first corrupt frame of a segment)
    dropped: int  # by this Spool object
    live_writers: int
    drain_locked_by_other: bool


def encode_frame(payload: bytes) -> bytes:
    """A record as it sits in a segment."""
    length = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(length.to_bytes(4, "little")))
    return _HEADER.pack(MAGIC, length, crc) + payload


# --- reading segments ------------------------------------------------------------------------


def _pread(fd: int, n: int, pos: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        data = os.pread(fd, n, pos)
        if not data:
            break
        parts.append(data)
        n -= len(data)
        pos += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Window:
    """Positional reads of a segment up to a fixed size, buffered so small frames cost no syscall each."""

    def __init__(self, fd: int, size: int, chunk: int = _READ_CHUNK) -> None:
        self.fd = fd
        self.size = size
        self._chunk = chunk
        self._base = 0
        self._buf = b""

    def get(self, pos: int, n: int) -> bytes:
        end = min(pos + n, self.size)
        if end <= pos:
            return b""
        base = self._base
        if base <= pos and end <= base + len(self._buf):
            return self._buf[pos - base : end - base]
        self._buf = _pread(self.fd, min(max(end - pos, self._chunk), self.size - pos), pos)
        self._base = pos
        return self._buf[: end - pos]

    def find(self, needle: bytes, start: int) -> int:
        pos = start
        while pos < self.size:
            chunk = self.get(pos, self._chunk)
            found = chunk.find(needle)
            if found >= 0:
                return pos + found
            if len(chunk) < len(needle) or pos + len(chunk) >= self.size:
                return -1
            pos += len(chunk) - len(needle) + 1
        return -1


def _frame_at(win: _Window, pos: int) -> tuple[int, bytes]:
    """(_OK, payload), (_SHORT, b"") if the frame runs past the end, or (_BAD, b"")."""
    head = win.get(pos, HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        return _SHORT, b""
    magic, length, crc = _HEADER.unpack(head)
    if magic != MAGIC or length > MAX_PAYLOAD:
        return _BAD, b""
    if pos + HEADER_SIZE + length > win.size:
        return _SHORT, b""
    payload = win.get(pos + HEADER_SIZE, length)
    if len(payload) < length:  # truncated under us
        return _SHORT, b""
    if zlib.crc32(payload, zlib.crc32(head[4:8])) != crc:
        return _BAD, b""
    return _OK, payload


def _resync(win: _Window, start: int) -> int:
    """Offset of the next valid frame at or after start, or -1."""
    pos = start
    while True:
        pos = win.find(MAGIC, pos)
        if pos < 0 or _frame_at(win, pos)[0] == _OK:
            return pos
        pos += 1


# --- files and locks -------------------------------------------------------------------------


def _try_lock_shared(fd: int) -> bool:
    """True if nobody holds an exclusive flock on the file, i.e. its writer is done with it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _create_locked(path: str, flags: int) -> int:
    # Created under a temporary name and renamed once locked: a drainer must never see a live
    # writer's file unlocked, which would mean that its writer is gone.
    tmp = path + TMP_SUFFIX
    fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def _unlink_if_unlocked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not _try_lock_shared(fd):
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_of(segment: str) -> str | None:
    match = _SEGMENT_RE.match(segment)
    return match.group(1) if match else None


@dataclass(eq=False)
class _Segment:
    """The drainer's view of one segment."""

    name: str
    writer: str
    fd: int
    watermark: int = 0  # every frame below is committed, or skipped as unreadable
    done: set[int] = field(default_factory=set)  # committed frame offsets at or above the watermark
    ends: dict[int, int] = field(default_factory=dict)  # scanned frame offset -> next frame's offset
    scan_pos: int = 0
    finished: bool = False  # its writer let go of it: it will not grow
    size: int = 0
    dirty: bool = False


@dataclass(eq=False)
class _FrameIndex:
    """Frame offsets of a segment, found by walking headers; for status(), extended incrementally."""

    pos: int = 0
    offsets: list[int] = field(default_factory=list)


# --- fork handling ---------------------------------------------------------------------------

_live_spools: weakref.WeakSet[Spool] = weakref.WeakSet()
_held_over_fork: list[Spool] = []
# Connections found open in a child whose fork bypassed the hooks: kept, never closed, because
# closing them could release or disturb the parent's SQLite locks.
_orphaned_connections: list[sqlite3.Connection] = []


def _before_fork() -> None:
    for spool in list(_live_spools):
        spool._lock.acquire()  # no half-done append (or rotation) is copied into the child
        spool._db_lock.acquire()
        _held_over_fork.append(spool)
        # SQLite must not be open across a fork: a child's own connection would share the
        # parent's in-process lock bookkeeping. The parent reconnects on its next use.
        spool._close_db()


def _after_fork_in_parent() -> None:
    while _held_over_fork:
        spool = _held_over_fork.pop()
        spool._db_lock.release()
        spool._lock.release()


def _after_fork_in_child() -> None:
    _held_over_fork.clear()  # their locks are replaced below
    for spool in list(_live_spools):
        spool._reinit_after_fork()


# Once per interpreter: importlib.reload re-runs this module in the same namespace, and hooks
# registered twice would take each lock twice.
if "_fork_hooks_registered" not in globals():
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )
    _fork_hooks_registered = True


class Spool:
    """A durable queue of records in a directory; see the module docstring for the layout."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 8 << 20,
        fsync: bool = False,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self._dir = os.path.abspath(os.fspath(directory))
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        self._max_bytes = max_bytes
        # At most a quarter of the bound, so committed segments free space well before the bound is hit.
        self._segment_bytes = max(1, min(segment_bytes, max_bytes // 4))
        self._fsync = fsync
        self._closed = False
        self._init_state()
        _live_spools.add(self)

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the append side; held for a write and little else
        self._drain_mu = threading.RLock()  # the drain side
        self._db_lock = threading.Lock()
        # appending
        self._writer: str | None = None
        self._writer_fd: int | None = None
        self._seq = 0
        self._fd: int | None = None
        self._seg_size = 0
        self._dir_bytes = 0  # all segments, as of the last rescan, plus what this writer appended since
        self._appended = 0
        self._next_rescan = 0.0
        self._dropped = 0
        self._full_log = Throttle(_WARN_S)
        self._error_log = Throttle(_WARN_S)
        # draining
        self._drain_fd: int | None = None
        self._states: dict[str, _Segment] = {}
        self._saved: dict[str, tuple[int, set[int]]] = {}  # persisted progress of segments not yet opened
        self._handed: dict[str, set[int]] = {}  # handed out by this object, not committed
        self._deleted: set[str] = set()  # segments whose progress row is to be deleted
        self._writer_fds: dict[str, int] = {}
        self._dead_writers: set[str] = set()
        self._last_persist = 0.0
        self._next_maintain = 0.0
        self._corrupt = 0
        self._corrupt_log = Throttle(_WARN_S)
        self._commit_log = Throttle(_WARN_S)
        self._index: dict[str, _FrameIndex] = {}
        # SQLite
        self._conn: sqlite3.Connection | None = None
        self._last_prune = 0.0

    def _reinit_after_fork(self) -> None:
        # The child shares the parent's open files, and so their flocks: it closes its copies
        # (never LOCK_UN, which would release the parent's locks) and starts as a new writer.
        fds = [self._fd, self._writer_fd, self._drain_fd, *self._writer_fds.values()]
        fds += [state.fd for state in self._states.values()]
        if self._conn is not None:
            _orphaned_connections.append(self._conn)
        self._init_state()
        for fd in fds:
            _close_quietly(fd)

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # forked without the at-fork hooks (they cover os.fork)
            self._reinit_after_fork()

    # --- appending -----------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return self._dir

    @property
    def dropped(self) -> int:
        """Records this object could not append: over the bound, or an I/O error."""
        return self._dropped

    @property
    def corrupt_frames(self) -> int:
        """Unreadable regions (torn tails, corrupt frames) this object skipped while draining."""
        return self._corrupt

    def append(self, payload: bytes) -> bool:
        """Append one record; False (counted in ``dropped``, and logged) if it could not be."""
        try:
            if os.getpid() != self._pid:
                self._reinit_after_fork()
            if len(payload) > MAX_PAYLOAD:
                return self._drop(f"a record of {len(payload)} bytes is over the limit of {MAX_PAYLOAD}")
            frame = encode_frame(payload)  # the CRC is computed outside the lock
            if time.monotonic() >= self._next_rescan:
                self._rescan()
            with self._lock:
                if self._closed:
                    reason = "the spool is closed"
                elif self._dir_bytes + len(frame) <= self._max_bytes:
                    self._write(frame)
                    return True
                else:
                    # Let go of the current segment, so the drainer can delete it once it is
                    # committed: a writer keeping it open could pin the bound forever.
                    if self._seg_size:
                        self._close_segment()
                    self._dropped += 1
                    dropped = self._dropped
                    reason = ""
            if reason:
                return self._drop(reason)
            if self._full_log.ready():
                logger.warning(
                    "genai-mlflow spool %s is full (bound %d bytes): %d record(s) dropped so far",
                    self._dir,
                    self._max_bytes,
                    dropped,
                )
            return False
        except Exception as error:  # this runs inside span processors: never raise into the app
            return self._drop(f"{type(error).__name__}: {error}")

    def _drop(self, reason: str) -> bool:
        with self._lock:
            self._dropped += 1
            dropped = self._dropped
        if self._error_log.ready():
            logger.warning(
                "genai-mlflow spool %s could not append a record (%s): %d record(s) dropped so far",
                self._dir,
                reason,
                dropped,
            )
        return False

    def _write(self, frame: bytes) -> None:
        # Caller holds self._lock.
        if self._fd is None or (self._seg_size and self._seg_size + len(frame) > self._segment_bytes):
            self._open_segment()
        fd = self._fd
        assert fd is not None
        try:
            # One write of the whole frame to an O_APPEND file: in the page cache once it returns,
            # so it survives the process being killed.
            written = os.write(fd, frame)
            self._seg_size += written
            self._dir_bytes += written
            self._appended += written
            if written != len(frame):
                raise OSError(errno.EIO, f"short write: {written} of {len(frame)} bytes")
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            # A partly written frame must end a finished segment, where the drainer skips it.
            self._close_segment()
            raise

    def _open_segment(self) -> None:
        # Caller holds self._lock.
        self._close_segment()
        if self._writer_fd is None:
            writer = f"{self._pid}-{time.time_ns()}"
            self._writer_fd = _create_locked(os.path.join(self._dir, f"writer-{writer}.lock"), os.O_RDWR)
            self._writer = writer
        self._seq += 1
        name = f"seg-{time.time_ns():020d}-{self._writer}-{self._seq:06d}.log"
        self._fd = _create_locked(os.path.join(self._dir, name), os.O_WRONLY | os.O_APPEND)
        self._seg_size = 0
        self._next_rescan = 0.0  # a rotation is a good moment to measure the directory again
        if self._fsync:
            _fsync_dir(self._dir)

    def _close_segment(self) -> None:
        fd, self._fd = self._fd, None
        self._seg_size = 0
        _close_quietly(fd)  # releases its flock: the drainer now sees it finished

    def _rescan(self) -> None:
        self._next_rescan = time.monotonic() + _RESCAN_S  # first, so concurrent appenders do not all scan
        before = self._appended
        total = 0
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if _SEGMENT_RE.match(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        with self._lock:
            # Bytes appended here during the scan may be counted twice: too high is the safe side.
            self._dir_bytes = total + (self._appended - before)

    # --- draining ------------------------------------------------------------------------------

    def acquire_drain_lock(self) -> bool:
        """Non-blocking; True if this object now drains the directory (or already did)."""
        self._check_fork()
        with self._drain_mu:
            if self._drain_fd is not None:
                return True
            fd = os.open(
                os.path.join(self._dir, DRAIN_LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._saved = self._load_progress()
            except BaseException:
                os.close(fd)  # releases the lock
                raise
            self._drain_fd = fd
            self._next_maintain = 0.0
            return True

    def release_drain_lock(self) -> None:
        self._check_fork()
        with self._drain_mu:
            fd = self._drain_fd
            if fd is None:
                return
            try:
                self._persist()
            finally:
                self._drain_fd = None
                # Progress is re-read on the next acquire; what was handed out stays handed out.
                for state in self._states.values():
                    _close_quietly(state.fd)
                self._states.clear()
                for writer_fd in self._writer_fds.values():
                    _close_quietly(writer_fd)
                self._writer_fds.clear()
                self._saved = {}
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # so status() names no holder
                _close_quietly(fd)  # releases the flock

    def read(self, max_records: int = 1000) -> list[Record]:
        """Records not yet handed out by this object nor committed, oldest segment first."""
        self._check_fork()
        with self._drain_mu:
            if self._drain_fd is None:
                raise RuntimeError("Spool.read() needs the drain lock: call acquire_drain_lock() first")
            names = self._segment_names()
            now = time.monotonic()
            if now >= self._next_maintain:
                self._next_maintain = now + _MAINTAIN_S
                self._maintain(names)
            listed = set(names)
            for name in [n for n in self._states if n not in listed]:
                self._forget(name)
            out: list[Record] = []
            for name in names:
                if len(out) >= max_records:
                    break
                state = self._states.get(name) or self._open_state(name)
                if state is not None:
                    self._scan(state, out, max_records)
                    self._maybe_delete(state)
            self._persist()
            return out

    def commit(self, ids: Iterable[RecordId]) -> None:
        """These records are done, in any order; a finished segment all committed is deleted."""
        self._check_fork()
        with self._drain_mu:
            if self._drain_fd is None:
                if self._commit_log.ready():
                    logger.warning(
                        "genai-mlflow spool %s: commit() without the drain lock is ignored; "
                        "the records will be read again",
                        self._dir,
                    )
                return
            touched: dict[str, _Segment] = {}
            for record_id in ids:
                state = touched.get(record_id.segment) or self._states.get(record_id.segment)
                if state is None:
                    state = self._open_state(record_id.segment)
                    if state is None:
                        continue
                handed = self._handed.get(record_id.segment)
                if handed is not None:
                    handed.discard(record_id.offset)
                    if not handed:
                        del self._handed[record_id.segment]
                if record_id.offset >= state.watermark:
                    state.done.add(record_id.offset)
                touched[record_id.segment] = state
            for state in touched.values():
                state.dirty = True
                self._advance(state)
                self._maybe_delete(state)
            if touched and time.monotonic() - self._last_persist >= _PERSIST_S:
                self._persist()

    def _segment_names(self) -> list[str]:
        return sorted(name for name in os.listdir(self._dir) if _SEGMENT_RE.match(name))

    def _open_state(self, name: str) -> _Segment | None:
        writer = _writer_of(name)
        if writer is None:
            return None
        try:
            fd = os.open(os.path.join(self._dir, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        watermark, done = self._saved.pop(name, (0, set()))
        state = _Segment(name, writer, fd, watermark, {o for o in done if o >= watermark}, scan_pos=watermark)
        self._states[name] = state
        return state

    def _forget(self, name: str) -> None:
        state = self._states.pop(name, None)
        if state is not None:
            _close_quietly(state.fd)
        self._handed.pop(name, None)
        self._index.pop(name, None)

    def _scan(self, state: _Segment, out: list[Record], max_records: int) -> None:
        if not state.finished and _try_lock_shared(state.fd):
            state.finished = True
        size = os.fstat(state.fd).st_size  # after the lock test: a finished segment's size is final
        state.size = size
        replayed = state.finished and self._writer_gone(state.writer)
        handed = self._handed.get(state.name)
        win = _Window(state.fd, size)
        pos = state.scan_pos
        while pos < size and len(out) < max_records:
            status, payload = _frame_at(win, pos)
            if status == _OK:
                end = pos + HEADER_SIZE + len(payload)
                state.ends[pos] = end
                if pos not in state.done and (handed is None or pos not in handed):
                    out.append(Record(RecordId(state.name, pos), payload, replayed))
                    if handed is None:
                        handed = self._handed.setdefault(state.name, set())
                    handed.add(pos)
                pos = end
                continue
            if status == _SHORT and not state.finished:
                break  # its writer is still writing it
            nxt = _resync(win, pos + 1)
            if nxt < 0:
                if not state.finished:
                    break  # what follows may still be being written: look again next time
                nxt = size
            self._skip(state, pos, nxt)
            pos = nxt
        state.scan_pos = pos
        self._advance(state)

    def _skip(self, state: _Segment, start: int, end: int) -> None:
        state.ends[start] = end
        if start in state.done:  # skipped already, before a restart
            return
        state.done.add(start)
        state.dirty = True
        self._corrupt += 1
        if self._corrupt_log.ready():
            logger.warning(
                "genai-mlflow spool skipped %d unreadable bytes at offset %d of %s (%s); "
                "%d unreadable region(s) so far",
                end - start,
                start,
                state.name,
                "torn tail" if end == state.size else "corrupt frame",
                self._corrupt,
            )

    @staticmethod
    def _advance(state: _Segment) -> None:
        watermark = state.watermark
        while watermark in state.done and watermark in state.ends:
            state.done.discard(watermark)
            watermark = state.ends.pop(watermark)
        if watermark != state.watermark:
            state.watermark = watermark
            state.dirty = True

    def _maybe_delete(self, state: _Segment) -> None:
        if not state.finished or state.watermark < state.size:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._dir, state.name))
        self._forget(state.name)
        self._deleted.add(state.name)
        self._next_rescan = 0.0  # this process's appends see the freed space at once

    def _writer_gone(self, writer: str) -> bool:
        if writer in self._dead_writers:
            return True
        if writer == self._writer and self._writer_fd is not None:
            return False
        fd = self._writer_fds.get(writer)
        if fd is None:
            try:
                fd = os.open(os.path.join(self._dir, f"writer-{writer}.lock"), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._dead_writers.add(writer)
                return True
            self._writer_fds[writer] = fd
        if _try_lock_shared(fd):
            del self._writer_fds[writer]
            os.close(fd)
            self._dead_writers.add(writer)
            return True
        return False

    def _maintain(self, names: list[str]) -> None:
        """Clear what crashed processes left: stale temporary files, locks of gone writers whose
        segments are all deleted, progress of deleted segments."""
        writers = {_writer_of(name) for name in names}
        now = time.time()
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if entry.name.endswith(TMP_SUFFIX):
                    try:
                        stale = now - entry.stat().st_mtime > _STALE_TMP_S
                    except FileNotFoundError:
                        continue
                    if stale:
                        _unlink_if_unlocked(entry.path)
                    continue
                match = _WRITER_RE.match(entry.name)
                if match and match.group(1) not in writers and _unlink_if_unlocked(entry.path):
                    self._dead_writers.discard(match.group(1))
                    _close_quietly(self._writer_fds.pop(match.group(1), None))
        listed = set(names)
        for name in [n for n in self._saved if n not in listed]:
            del self._saved[name]
            self._deleted.add(name)

    # --- progress and ledger (SQLite) --------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        # Caller holds self._db_lock.
        if self._conn is not None:
            return self._conn
        path = os.path.join(self._dir, DB_NAME)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _close_db(self) -> None:
        # Caller holds self._db_lock.
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _load_progress(self) -> dict[str, tuple[int, set[int]]]:
        with self._db_lock:
            rows = self._db().execute("SELECT segment, watermark, done FROM progress").fetchall()
        return {str(segment): (int(watermark), set(json.loads(done))) for segment, watermark, done in rows}

    def _persist(self) -> None:
        # Caller holds self._drain_mu.
        dirty = [state for state in self._states.values() if state.dirty]
        deleted = list(self._deleted)
        if not dirty and not deleted:
            return
        rows = [
            (s.name, s.watermark, json.dumps(sorted(o for o in s.done if o >= s.watermark))) for s in dirty
        ]
        with self._db_lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO progress (segment, watermark, done) VALUES (?, ?, ?) ON CONFLICT (segment) "
                    "DO UPDATE SET watermark = excluded.watermark, done = excluded.done",
                    rows,
                )
                conn.executemany("DELETE FROM progress WHERE segment = ?", [(name,) for name in deleted])
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        for state in dirty:
            state.dirty = False
        self._deleted.difference_update(deleted)
        self._last_persist = time.monotonic()

    def ledger_get(self, key: str) -> str | None:
        self._check_fork()
        with self._db_lock:
            row = self._db().execute("SELECT value FROM ledger WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def ledger_put(self, key: str, value: str) -> None:
        """Durable once it returns (SQLite, WAL); entries older than 30 days are pruned now and then."""
        self._check_fork()
        now = time.time()
        with self._db_lock:
            conn = self._db()
            conn.execute(
                "INSERT INTO ledger (key, value, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                (key, value, now),
            )
            if now - self._last_prune >= _PRUNE_S:
                self._last_prune = now
                conn.execute("DELETE FROM ledger WHERE updated < ?", (now - _LEDGER_TTL_S,))

    # --- status and lifecycle ----------------------------------------------------------------

    def status(self) -> SpoolStatus:
        self._check_fork()
        with self._drain_mu:
            draining = self._drain_fd is not None
            if draining:
                progress = dict(self._saved)
                progress.update({name: (s.watermark, s.done) for name, s in self._states.items()})
            else:
                progress = self._load_progress()
            names = self._segment_names()
            listed = set(names)
            for name in [n for n in self._index if n not in listed]:
                del self._index[name]
            total = pending = 0
            for name in names:
                try:
                    fd = os.open(os.path.join(self._dir, name), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    size = os.fstat(fd).st_size
                    total += size
                    watermark, done = progress.get(name, (0, set()))
                    pending += self._pending_in(name, fd, size, watermark, done)
                finally:
                    os.close(fd)
        return SpoolStatus(
            directory=self._dir,
            segments=len(names),
            bytes=total,
            pending_records=pending,
            dropped=self._dropped,
            live_writers=self._live_writers(),
            drain_locked_by_other=not draining and self._drain_holder_alive(),
        )

    def _pending_in(self, name: str, fd: int, size: int, watermark: int, done: set[int]) -> int:
        index = self._index.setdefault(name, _FrameIndex())
        if index.pos < size:
            win = _Window(fd, size, _INDEX_CHUNK)
            pos = index.pos
            while True:  # headers only, no CRC: a count, not a delivery
                head = win.get(pos, HEADER_SIZE)
                if len(head) < HEADER_SIZE:
                    break
                magic, length, _ = _HEADER.unpack(head)
                end = pos + HEADER_SIZE + length
                if magic != MAGIC or length > MAX_PAYLOAD or end > size:
                    break
                index.offsets.append(pos)
                pos = end
            index.pos = pos
        offsets = index.offsets
        pending = len(offsets) - bisect.bisect_left(offsets, watermark)
        for offset in done:
            i = bisect.bisect_left(offsets, offset)
            if offset >= watermark and i < len(offsets) and offsets[i] == offset:
                pending -= 1
        return pending

    def _live_writers(self) -> int:
        live = 0
        with os.scandir(self._dir) as entries:
            for entry in entries:
                match = _WRITER_RE.match(entry.name)
                if not match:
                    continue
                if match.group(1) == self._writer and self._writer_fd is not None:
                    live += 1
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    live += not _try_lock_shared(fd)
                finally:
                    os.close(fd)  # drops the probe's shared lock
        return live

    def _drain_holder_alive(self) -> bool:
        # Read, not probed: probing the flock could make a real drainer's acquire fail.
        try:
            with open(os.path.join(self._dir, DRAIN_LOCK_NAME), encoding="ascii") as f:
                text = f.read().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return False
        return text.isdigit() and _pid_alive(int(text))

    def close(self) -> None:
        """Stop appending (later appends are dropped), persist progress, release the drain lock."""
        self._check_fork()
        with self._lock:
            self._closed = True
            self._close_segment()
            writer_fd, self._writer_fd = self._writer_fd, None
            writer = self._writer
        if writer_fd is not None:
            # Removed, then unlocked: either way a drainer sees this writer gone.
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._dir, f"writer-{writer}.lock"))
            _close_quietly(writer_fd)
        try:
            self.release_drain_lock()
        finally:
            with self._db_lock:
                self._close_db()
            _live_spools.discard(self)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
