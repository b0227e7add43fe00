"""Start the disk write of a large file while it is still being written (Linux `sync_file_range`).

A save is durable only once its files are fsynced, and for a large file the fsync is most of the
save: the disk writes what the page cache took in a fraction of the time. A writer that calls
`Writeback.written` as it goes has the kernel start writing each finished 64 MiB at once, so the disk
works during the write instead of after it, and the fsync at the end (still done, by the core) waits
for the tail only. Elsewhere (no `sync_file_range`) it does nothing.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from ._storage import libc_function

STEP = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


def _sync_file_range() -> Any:
    import ctypes

    return libc_function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))


class Writeback:
    """Follows one file being written; see the module docstring."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self._fn, self._started = f, _sync_file_range(), 0

    def written(self) -> None:
        """Call after each write: starts the disk write of every complete 64 MiB written since the last call."""
        if self._fn is None:
            return
        end = self._f.tell()
        if end - self._started >= STEP:
            self._f.flush()
            self._fn(self._f.fileno(), self._started, end - self._started, _SYNC_FILE_RANGE_WRITE)  # best effort
            self._started = end


def supported() -> bool:
    """Whether this system starts writeback early (else `Writeback` does nothing)."""
    return _sync_file_range() is not None
