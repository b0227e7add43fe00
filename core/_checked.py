"""What loads is what was checked: a payload's bytes hashed once as they are read, then served from memory.

A file under 16 MiB is read into a `bytearray`; a larger one an adapter keeps whole is copied into
anonymous memory (`read_whole`: the model's own memory views it) or into a sealed in-memory file
(`read_by_path`: a framework opens its path). Either way no write to the artifact after the check
reaches what is loaded.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _digest
from ._digest import CHUNK, WINDOW, algorithm, hash_fd, new, pread

if TYPE_CHECKING:
    import mmap


def hash_file(f: BinaryIO, size: int, algo: str | None = None, *, whole: str | None = None) -> tuple[str, BinaryIO]:
    """Return `<algo>:<hex>` of the first `size` bytes of `f`, and the handle to read them from afterwards.

    A file under 16 MiB, or any file with `whole`, is read once into memory, hashed there, and the
    handle returned (a `Checked`) serves exactly those bytes: a writer that changes the file after the
    check changes nothing that is loaded through it. `whole="memory"` is for an adapter that keeps
    the bytes as its model's memory (torch weights: an anonymous copy); `whole="file"` for a file a
    framework reads only by path (Keras: a sealed in-memory file, whose path `Checked.path()` gives).
    Another large file is hashed where it lies (`hash_fd`) and `f` is returned.
    """
    algo = algo or algorithm()
    if size >= _digest.MAP_BYTES and not whole:
        return hash_fd(f.fileno(), size, algo), f
    if size >= _digest.MAP_BYTES:
        if whole == "file":
            named = _named_copy(f.fileno(), size, algo)
            if named is not None:
                return named[0], Checked(None, f, named=named[1])
        private = _private_copy(f.fileno(), size, algo)
        if private is not None:
            return private[0], Checked(private[1], f)
    h = new(algo)
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


_POPULATE_WRITE = 23  # madvise(2) MADV_POPULATE_WRITE, Linux 5.14+


def _private_copy(fd: int, size: int, algo: str) -> tuple[str, mmap.mmap] | None:
    """A copy of the file in fresh anonymous memory (writable, tied to no file), and its digest.

    Nothing done to the file afterwards reaches the copy: not a write in place, not a truncation
    (which would discard even the copied-on-write pages of a private file mapping). Two threads each
    take a 64 MiB window in turn: have the kernel allocate its pages at once, read the file into them,
    then hash it once the previous window is hashed. Allocating fresh pages is most of the cost (more
    than the read and the hash together on a VM), so it runs on both cores, not on one fill thread.
    None off Linux, or if the file is shorter than `size`: the caller reads it the plain way.
    """
    if not sys.platform.startswith("linux"):
        return None
    import mmap

    try:
        copy = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError):
        return None
    step, populate = WINDOW * 4, _populator(copy)

    def fill(view: memoryview, offset: int) -> bool:
        length = min(step, size - offset)
        populate(offset, length)  # all pages at once, not one fault each; a no-op where it cannot
        got = 0
        while got < length:
            n = pread(fd, view[offset + got:offset + length], offset + got)
            if n <= 0:
                return False  # shorter than declared
            got += n
        return True

    h = new(algo)
    with memoryview(copy) as view:
        whole = _pipelined(size, step, lambda offset: fill(view, offset),
                           lambda offset, length: h.update(view[offset:offset + length]), in_order=False)
    if whole:
        return f"{algo}:{h.hexdigest()}", copy
    copy.close()
    return None


def _populator(copy: mmap.mmap) -> Callable[[int, int], None]:
    """`populate(offset, length)`: allocate that range of `copy`'s pages now, without holding the GIL.

    `mmap.madvise` holds the GIL through the whole call (tens of ms per window), which would stop the
    other thread between its reads and hashes; libc's `madvise` through ctypes releases it. Where
    ctypes or MADV_POPULATE_WRITE (Linux 5.14) is missing, the reads fault the pages in instead.
    """
    from ._storage import libc_function

    try:
        import ctypes

        madvise = libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
        cell = ctypes.c_char.from_buffer(copy)
        base = ctypes.addressof(cell)
        del cell  # no export left on `copy`: it can still be closed
    except (ImportError, TypeError, ValueError):
        madvise = None
    if madvise is None:
        return lambda offset, length: None
    works = [True]

    def populate(offset: int, length: int) -> None:
        if works[0] and madvise(base + offset, length, _POPULATE_WRITE) != 0:
            works[0] = False  # an older kernel: the reads fault the pages in instead

    return populate


def _pipelined(size: int, step: int, fill: Callable[[int], bool], hashed: Callable[[int, int], object], *,
               in_order: bool = True) -> bool:
    """Fill `size` bytes `step` at a time on other threads, and hash each window in order once filled.

    `in_order`: the fills run one at a time, one window ahead of the hashing on this thread (a copy
    whose position follows the offset); otherwise two threads each fill a window, then hash it after
    the previous one. The fills and the hash release the GIL, so they run side by side. False if a fill
    came up short (the file is shorter than declared).
    """
    from concurrent.futures import ThreadPoolExecutor

    if in_order:
        with ThreadPoolExecutor(1, thread_name_prefix="mlpersist-copy") as pool:
            ahead = pool.submit(fill, 0)
            for offset in range(0, size, step):
                if not ahead.result():
                    return False
                if offset + step < size:
                    ahead = pool.submit(fill, offset + step)  # fill the next window while this one is hashed
                hashed(offset, min(step, size - offset))
        return True
    import threading

    offsets = range(0, size, step)
    hashed_up_to = [threading.Event() for _ in offsets]  # [i] is set once window i is hashed, or abandoned
    failed = [False]

    def window(i: int) -> None:
        try:
            ok = not failed[0] and fill(offsets[i])
            if i:
                hashed_up_to[i - 1].wait()
            if ok and not failed[0]:
                hashed(offsets[i], min(step, size - offsets[i]))
            else:
                failed[0] = True
        except BaseException:
            failed[0] = True
            raise
        finally:
            hashed_up_to[i].set()

    with ThreadPoolExecutor(2, thread_name_prefix="mlpersist-copy") as pool:
        for done in [pool.submit(window, i) for i in range(len(offsets))]:
            done.result()  # an OSError of a read fails the copy here
    return not failed[0]


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

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def _named_copy(fd: int, size: int, algo: str) -> tuple[str, int] | None:
    """The digest of the file, and a copy of it in a sealed in-memory file (memfd), made as it is hashed.

    For frameworks that read only by path: `/proc/self/fd/N` of the copy opens exactly the bytes that
    were hashed, and its seals refuse any write, even through that path. A second thread copies the
    next 64 MiB in the kernel (sendfile) while this one hashes the previous 64 MiB from a read-only
    mapping of the copy, unmapped as soon as it is hashed (the copy is not kept in this process's RSS).
    None off Linux, or if the file is shorter than `size`: the caller copies it the other way.
    """
    import mmap

    named = _memfd()
    if named is None:
        return None
    step = WINDOW * 4

    def fill(offset: int) -> bool:  # in order, one at a time: the copy's own position follows `offset`
        length, got = min(step, size - offset), 0
        while got < length:
            n = os.sendfile(named, fd, offset + got, length - got)
            if n <= 0:
                return False  # shorter than declared
            got += n
        return True

    h = new(algo)

    def hashed(offset: int, length: int) -> None:
        # private and read-only: sees the copy's pages, and leaves no shared mapping to block the seal
        with mmap.mmap(named, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=offset) as window, \
                memoryview(window) as view:
            h.update(view)

    try:
        os.ftruncate(named, size)
        if _pipelined(size, step, fill, hashed):
            _seal(named)
            os.lseek(named, 0, os.SEEK_SET)  # sendfile left the copy's position at its end
            return f"{algo}:{h.hexdigest()}", named
    except (OSError, ValueError):
        pass
    os.close(named)
    return None


def _memfd() -> int | None:
    """A new, empty in-memory file that can be sealed, or None where none can be made (off Linux, no memory)."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        return os.memfd_create("mlpersist-checked", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return None


def _seal(named: int) -> None:
    import fcntl

    fcntl.fcntl(named, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)


def _sealed_file(data: bytearray | mmap.mmap) -> int | None:
    """A sealed in-memory file holding `data`, or None where none can be made (off Linux, out of memory)."""
    named = _memfd()
    if named is None:
        return None
    try:
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                done += os.write(named, view[done:])
        _seal(named)
    except BaseException as exc:
        os.close(named)
        if isinstance(exc, OSError):
            return None
        raise
    return named


class Checked(io.BufferedReader):
    """The hashed bytes of a payload file, served from memory; `fileno()` and `name` are the file's.

    It owns the file (and its sealed copy, if any): closing it (or dropping it) closes them too.
    """

    def __init__(self, data: bytearray | mmap.mmap | None, file: BinaryIO, named: int | None = None) -> None:
        """`data`: a buffer or an anonymous copy; or None, and `named`: a sealed in-memory file read instead."""
        if data is not None:
            raw: io.RawIOBase = _Memory(data)
        elif named is not None:
            raw = io.FileIO(named, "rb", closefd=False)
        else:
            raise ValueError("Checked needs the bytes or a sealed file holding them")
        super().__init__(raw, buffer_size=1 << 20)
        self.data, self.file, self._named = data, file, named

    def path(self) -> str | None:
        """A path that opens exactly these bytes, or None off Linux (or if no in-memory file can be made).

        It is a sealed in-memory file: the copy itself, or one made on first use from bytes held otherwise.
        """
        if self._named is None and self.data is not None:
            self._named = _sealed_file(self.data)
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
