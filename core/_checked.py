"""What loads is what was checked: a payload's bytes hashed once as they are read, then served from memory.

A file under 16 MiB is read into a `bytearray`; a larger one an adapter keeps whole is copied into
anonymous memory (`read_whole`: the model's own memory views it). Any other larger one is read where it
lies under a read lease (`_leases`: if someone opens it for writing before the framework is done,
`unchanged` raises and the load is done again without leases). Where no lease can be had, one a
framework opens by path (`read_by_path`) is copied into a sealed in-memory file, and only other large
files are read where they lie unguarded. So no write to the artifact after the check reaches what is
loaded, except into such a file where the kernel grants no lease.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _copies, _digest
from ._digest import CHUNK, algorithm, hash_fd, new, pread

if TYPE_CHECKING:
    import mmap

_LEASES = ContextVar("mlpersist_leases", default=True)  # False while a load is done again without leases


class LeaseBroken(Exception):
    """A file read under a lease was opened for writing before its framework was done: load again."""


@contextmanager
def no_leases() -> Iterator[None]:
    """Within it (this thread, this task), no file is read under a lease (see `hash_file`)."""
    token = _LEASES.set(False)
    try:
        yield
    finally:
        _LEASES.reset(token)


@contextmanager
def held_throughout(handles: Iterable[BinaryIO]) -> Iterator[None]:
    """Around a framework's reading of `handles`: whatever it did, raise `LeaseBroken` if a lease broke.

    A failure too: after a lease's break time (45 s) a writer gets in, and its bytes may be what failed.
    """
    try:
        yield
    finally:
        unchanged(handles)


def unchanged(handles: Iterable[BinaryIO]) -> None:
    """Raise `LeaseBroken` if a file read under a lease may have been written to since it was hashed."""
    for f in handles:
        if isinstance(f, Checked) and f.leased:
            from . import _leases  # imported already, by the lease's taking

            if not _leases.held(f.fileno()):
                raise LeaseBroken(f.name)


def hash_file(f: BinaryIO, size: int, algo: str | None = None, *, whole: str | None = None) -> tuple[str, BinaryIO]:
    """Return `<algo>:<hex>` of the first `size` bytes of `f`, and the handle to read them from afterwards.

    A file under 16 MiB, or any file with `whole="memory"`, is read once into memory, hashed there, and
    the handle returned (a `Checked`) serves exactly those bytes: a writer that changes the file after the
    check changes nothing that is loaded through it. `whole="memory"` is for an adapter that keeps
    the bytes as its model's memory (torch weights: an anonymous copy); `whole="file"` for a file a
    framework reads only by path (Keras), whose path `Checked.path()` gives.

    Any other large file (`whole="file"` included) is hashed where it lies under a read lease where one
    can be had (Linux), and read there through the `Checked` returned: call `unchanged` once the
    framework has read it. Where no lease can be had (or within `no_leases`), a `whole="file"` one is
    copied into a sealed in-memory file as it is hashed, and another is hashed where it lies (`hash_fd`)
    and `f` is returned.
    """
    algo = algo or algorithm()
    if size >= _digest.MAP_BYTES and whole != "memory" and _LEASES.get():
        from . import _leases  # here: only large files need it

        if _leases.take(f.fileno()):
            return hash_fd(f.fileno(), size, algo), Checked(None, f, named=os.dup(f.fileno()), leased=True)
    if size >= _digest.MAP_BYTES and not whole:
        return hash_fd(f.fileno(), size, algo), f
    if size >= _digest.MAP_BYTES:
        if whole == "file":
            named = _copies.named_copy(f.fileno(), size, algo)
            if named is not None:
                return named[0], Checked(None, f, named=named[1])
        private = _copies.private_copy(f.fileno(), size, algo)
        if private is not None:
            return private[0], Checked(private[1], f)
    h = new(algo, size)
    data = bytearray(size)  # writable: a framework may keep views of it as its tensors
    got = 0
    with memoryview(data) as view:
        while got < size:  # hash each chunk as it arrives, while it is in the CPU cache
            n = pread(f.fileno(), view[got:got + CHUNK * 4], got)
            if n <= 0:
                break  # shorter than declared: hashed as it is, the digest will not match
            h.update(view[got:got + n])
            got += n
    del data[got:]
    return f"{algo}:{h.hexdigest()}", Checked(data, f)


class _Memory(io.RawIOBase):
    """A read-only, seekable raw stream over bytes in memory (reads copy slices; the bytes are not copied)."""

    def __init__(self, data: bytearray | mmap.mmap) -> None:
        self._view, self._pos = memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as out:
            n = max(0, min(out.nbytes, len(self._view) - self._pos))
            out.cast("B")[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def readall(self) -> bytes:
        """The rest in one copy (`read()` of the whole file; RawIOBase's would take it 8 KiB at a time)."""
        out = bytes(self._view[self._pos:])
        self._pos += len(out)
        return out

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class Checked(io.BufferedReader):
    """The hashed bytes of a payload file, from memory or from the leased file; `fileno()`, `name`: the file's.

    It owns the file (and its sealed copy, if any): closing it (or dropping it) closes them too, and
    releases the file's lease, if it was read under one.
    """

    def __init__(self, data: bytearray | mmap.mmap | None, file: BinaryIO, named: int | None = None,
                 leased: bool = False) -> None:
        """`data`: a buffer or an anonymous copy; or None, and `named`: a sealed in-memory file read instead.

        With `leased`, `named` is a descriptor of the file itself, which holds a read lease.
        """
        if data is not None:
            raw: io.RawIOBase = _Memory(data)
        elif named is not None:
            raw = io.FileIO(named, "rb", closefd=False)
        else:
            raise ValueError("Checked needs the bytes or a sealed file holding them")
        super().__init__(raw, buffer_size=1 << 20)
        self.data, self.file, self._named, self.leased = data, file, named, leased

    def path(self) -> str | None:
        """A path that opens exactly these bytes, or None off Linux (or if no in-memory file can be made).

        It is the leased file itself, or a sealed in-memory file: the copy, or one made on first use from
        bytes held otherwise.
        """
        if self._named is None and self.data is not None:
            self._named = _copies.sealed_file(self.data)
        return None if self._named is None else f"/proc/self/fd/{self._named}"

    @property
    def name(self) -> str:
        return str(self.file.name)

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        super().close()
        self.file.close()
        if self._named is not None:
            os.close(self._named)
            self._named = None
