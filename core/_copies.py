"""Copies of a payload file made as it is hashed: into anonymous memory, or into a sealed in-memory file.

Anonymous memory is for bytes the model keeps as its own memory (torch weights: tensors are views of
it); a sealed in-memory file (Linux memfd) is for frameworks that only open paths (Keras), which get
its `/proc/self/fd` path. Both are filled on other threads while the bytes are hashed in file order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._digest import WINDOW, new, pread

if TYPE_CHECKING:
    import mmap


_POPULATE_WRITE = 23  # madvise(2) MADV_POPULATE_WRITE, Linux 5.14+


def private_copy(fd: int, size: int, algo: str) -> tuple[str, mmap.mmap] | None:
    """A copy of the file in fresh anonymous memory (writable, tied to no file), and its digest.

    Nothing done to the file afterwards reaches the copy: not a write in place, not a truncation
    (which would discard even the copied-on-write pages of a private file mapping). Two threads each
    take a 64 MiB window in turn: have the kernel allocate its pages at once, read the file into them,
    then hash it once the previous window is hashed. Allocating fresh pages is most of the cost (more
    than the read and the hash together on a VM), so it runs on both cores, not on one fill thread.
    Not in 2 MiB pages (`MADV_HUGEPAGE`): a loop of 1 GB loads took 0.18 s each instead of 0.33 s, but
    the first load in a fresh process took 1.3-1.6 s instead of 0.35 s. On a VM that hands free memory
    back to its host (virtio-balloon free page reporting, as here), free blocks of 2 MiB and more are
    what it hands back, and exactly what huge pages are made of: each is faulted in again on the host.
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


def named_copy(fd: int, size: int, algo: str) -> tuple[str, int] | None:
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


def sealed_file(data: bytearray | mmap.mmap) -> int | None:
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
