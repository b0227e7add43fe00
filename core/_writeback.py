"""Follow a large file as it is written: hash what is written and start its disk write, on a second thread.

A durable save of a large file costs, after the write itself, a digest of every byte and an fsync. Done
after the write (as `_storage.Staging.seal` does for any file), they add up to half the write again (1 GB:
0.3 s of BLAKE3, and the disk's flush). A writer that wraps its file in `Writeback` and writes through it
(or calls `written` after each write) has both done during the write: each finished 4 MiB is hashed from
the page cache on a second thread while the writer writes the next (the write and the hash release the
GIL, and run on two cores), and each finished 8 MiB is handed to the disk at once (Linux
`sync_file_range`), so the fsync at the end (still done, by the core) waits for the tail only.

Both sizes set what is left after the last write: the hash of the last piece, and the disk write of what
was not yet handed to it. With 16 and 64 MiB the 200 MB Keras save took 224-231 ms here, with 4 and 8 MiB
205-215 ms (model.save: 191-196 ms; the same runs). Smaller ones (2 and 4 MiB) gained Keras nothing beyond
the noise, and the 1 GB torch save varied too much between runs here to choose by (289-773 ms with the old
sizes, 295-365 ms with these): the benchmark reports it.

The digest is of the file's own bytes, read back after they were written, exactly as `seal` would read
them. The core uses it only for the file it was made of, unchanged since (same device, inode, size and
mtime and ctime); any other file, or this one after a change, is hashed by `seal` as before. Outside a save
(`_storage.following` not active) only the early disk write is done.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _digest
from ._storage import FOLLOWED, libc_function

if TYPE_CHECKING:
    import threading
    from queue import SimpleQueue
    from types import TracebackType

STEP = 8 << 20  # handed to the disk at a time: the fsync after the last write waits for less than this
PIECE = 4 << 20  # hashed at a time: the hash of the last piece is all that is left after the last write
_REPLY = "crc"
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


def _sync_file_range() -> Any:
    import ctypes

    return libc_function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))


class Writeback:
    """Follows one file being written from its first byte; see the module docstring.

    Use as a context manager around the writes, inside the `with open(..., "x+b")`: write through `write`,
    or call `written` after each write to the file. The file must be open for reading too (the hash reads
    it back); if it is not, it is only sent to the disk early, and the core hashes it.
    """

    def __init__(self, f: BinaryIO) -> None:
        from queue import SimpleQueue  # with the first large save only: keeps `import mlpersist` light

        self._f, self._sync = f, _sync_file_range()
        self._followed = FOLLOWED.get() if f.readable() else None
        self._algo = _digest.algorithm() if self._followed is not None else ""
        self._queued = 0  # bytes handed to the thread
        # a range to follow; bytes to add to the CRC; _REPLY: put the CRC in _crcs and start a new one
        self._jobs: SimpleQueue[tuple[int, int] | memoryview | str | None] = SimpleQueue()
        self._crcs: SimpleQueue[int] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._hasher: _digest.Hasher | None = None
        self._hashed = self._synced = 0

    def __enter__(self) -> Writeback:
        return self

    def written(self) -> None:
        """Call after each write: hands every complete piece (`PIECE`) written since the last call to the thread."""
        if self._followed is None and self._sync is None:
            return
        end = self._f.tell()
        if end - self._queued >= PIECE:
            self._f.flush()
            self._hand(end)

    def write(self, data: Any) -> int:
        """Write `data` to the file in pieces of at most `PIECE`, each handed on (`written`) once written.

        One large buffer (a tensor; the 200 MB of weights zipfile writes at once where Keras's own writer
        makes the archive) is then hashed while it is written, not after it. `write_crc` for a zip member.
        """
        with memoryview(data) as view, view.cast("B") as flat:
            for start in range(0, len(flat), PIECE):
                self._f.write(flat[start:start + PIECE])
                self.written()
            return len(flat)

    def write_crc(self, data: Any) -> int:
        """`write` `data`, and return its CRC-32, half of it taken on the thread (for `ZipOut`).

        zipfile makes a pass over a member's bytes for its CRC before it writes them: 29 ms for Keras's
        200 MB of weights, on the writing thread, before 40-47 ms of writes. Here the thread takes the CRC
        of the first half, piece by piece beside the writes and before each piece's hash (from the page
        cache, ~45 ms in all); the writer takes the second half's after writing each piece; `crc32_combine`
        joins the two. Measured on that save: write_crc 65-70 ms, against 74 with the whole CRC on the
        thread and ~75 for zipfile's way; the thread taking 60 or 50% of the CRC made no difference
        beyond the noise, 40 or 70-80% was slower. Data under a piece is written and CRC'd here.
        """
        with memoryview(data) as view, view.cast("B") as flat:
            if len(flat) < PIECE:
                self._f.write(flat)
                self.written()
                return zlib.crc32(flat)
            half = len(flat) // 2 // PIECE * PIECE or PIECE
            crc = 0
            for start in range(0, len(flat), PIECE):
                piece = flat[start:start + PIECE]
                self._f.write(piece)
                self._start()
                if start < half:
                    self._jobs.put(piece)
                else:
                    crc = zlib.crc32(piece, crc)
                self.written()
            self._jobs.put(_REPLY)
            return crc32_combine(self._crcs.get(), crc, len(flat) - half)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._thread is None:
            return  # under a piece (or nothing to do here): the core hashes it as any file
        if kind is None:
            self._f.flush()
            self._hand(self._f.tell())
        self._jobs.put(None)
        self._thread.join()
        if kind is None and self._followed is not None and self._failed is None and self._hasher is not None:
            st = os.fstat(self._f.fileno())
            if st.st_size == self._hashed:
                self._followed[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, self._algo,
                                                          f"{self._algo}:{self._hasher.hexdigest()}")

    def _start(self) -> None:
        if self._thread is None:
            import threading

            self._thread = threading.Thread(target=self._run, name="mlpersist-writeback", daemon=True)
            self._thread.start()

    def _hand(self, end: int) -> None:
        self._start()
        if end > self._queued:
            self._jobs.put((self._queued, end))
            self._queued = end

    def _run(self) -> None:
        fd = self._f.fileno()
        crc = 0
        while (job := self._jobs.get()) is not None:
            if isinstance(job, memoryview):  # done even after a failure: the writer waits for the CRC
                crc = zlib.crc32(job, crc)
                continue
            if isinstance(job, str):  # _REPLY
                self._crcs.put(crc)
                crc = 0
                continue
            if self._failed is not None:
                continue  # drain: the writer waits for the None
            try:
                self._follow(fd, *job)
            except Exception as exc:  # an unmappable file: the core hashes it instead
                self._failed = exc

    def _follow(self, fd: int, start: int, end: int) -> None:
        if self._followed is not None:
            if self._hasher is None:
                self._hasher = _digest.new(self._algo, 0)  # one core: the writer has the other
            _digest.update_mapped(self._hasher, fd, start, end)
            self._hashed = end
        if self._sync is not None and end - self._synced >= STEP:  # the tail is left to the core's fsync
            self._sync(fd, self._synced, end - self._synced, _SYNC_FILE_RANGE_WRITE)  # best effort
            self._synced = end


class Stream(io.RawIOBase):
    """A forward-only file object over a file a `Writeback` follows, for a writer that takes a file object.

    Each write goes through `Writeback.write`, a piece at a time. It cannot seek: zipfile then writes a data
    descriptor after each member instead of going back to its header, so no byte changes after it was hashed.
    """

    def __init__(self, f: BinaryIO, following: Writeback) -> None:
        super().__init__()
        self._f, self._following = f, following
        self.name = f.name

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        raise io.UnsupportedOperation("a forward-only stream")

    def tell(self) -> int:
        return self._f.tell()

    def write(self, data: Any) -> int:
        return self._following.write(data)

    def flush(self) -> None:
        self._f.flush()


def supported() -> bool:
    """Whether this system starts writeback early (else `Writeback` only hashes)."""
    return _sync_file_range() is not None


_CRC_POLY = 0xEDB88320  # CRC-32's polynomial, bits reversed: zlib's arithmetic, modulo it


def _multiply(a: int, b: int) -> int:
    """Multiply a and b modulo the CRC-32 polynomial (zlib's multmodp)."""
    m, p = 1 << 31, 0
    while m:
        if a & m:
            p ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return p


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B from A's CRC, B's CRC and B's length (zlib's crc32_combine, not in Python's zlib)."""
    power, x = 1 << 31, 1 << 30  # x^0, then x^(2^k) for k = 0, 1, ... as length2 * 8's bits are read
    n = length2 * 8
    while n:
        if n & 1:
            power = _multiply(x, power)
        n >>= 1
        x = _multiply(x, x)
    return _multiply(power, crc1) ^ crc2
