"""Payload digests: BLAKE3 for what mlpersist writes (SHA-256 on request), both read.

Hashing is the largest cost the layer adds to a large save or load, so the algorithm and the way a
file is read matter. BLAKE3 is a cryptographic hash (128-bit collision resistance, like SHA-256's
practical margin) built as a tree: it runs on every core and on SIMD lanes, about 2x SHA-256 (with
SHA-NI) on one core and 4x on two here. `$MLPERSIST_DIGEST=sha256` writes SHA-256 instead, for
settings that require a FIPS-approved algorithm. The manifest's own digest (what `digest=` pins)
stays SHA-256.
"""

from __future__ import annotations

import os
from typing import Protocol

from .errors import PersistError

HEX_LENGTHS = {"sha256": 64, "blake3": 64}  # algorithm -> hex length: the digests a manifest may hold
DEFAULT = "blake3"
CHUNK = 4 << 20
MAP_BYTES = 16 << 20  # from this size a file is hashed from read-only mappings, on every core
WINDOW = 16 << 20  # mapped at a time (a multiple of every page size); as fast as 64 MiB here, a quarter the RSS
# Below this, BLAKE3 hashes on the calling thread: splitting saves at most 0.4 ms there, and its threads
# wait for cores that another library's OpenMP threads spin on after a parallel call (a 0.6 MB file took
# 3.3 ms instead of 0.17 after an XGBoost load).
THREADED_BYTES = 4 << 20


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def algorithm() -> str:
    """The algorithm new artifacts are written with: $MLPERSIST_DIGEST, else BLAKE3."""
    algo = os.environ.get("MLPERSIST_DIGEST") or DEFAULT
    if algo not in HEX_LENGTHS:
        raise PersistError(f"MLPERSIST_DIGEST={algo!r} is not a digest mlpersist writes; use one of "
                           f"{', '.join(sorted(HEX_LENGTHS))} (or unset it for {DEFAULT})")
    return algo


def new(algo: str, size: int | None = None) -> Hasher:
    """A fresh hasher for `algo` (one of HEX_LENGTHS) of `size` bytes (None: not known).

    BLAKE3 uses every core on large updates, unless `size` is under THREADED_BYTES.
    """
    if algo == "blake3":
        try:
            from blake3 import blake3
        except ImportError:
            raise PersistError("this artifact's digests are BLAKE3, and the blake3 package (a dependency of "
                               "mlpersist) is not installed: pip install blake3") from None
        return blake3(max_threads=1 if size is not None and size < THREADED_BYTES else blake3.AUTO)
    import hashlib

    return hashlib.new(algo)


def hash_fd(fd: int, size: int, algo: str | None = None) -> str:
    """Return `<algo>:<hex>` of the first `size` bytes of `fd` (default algorithm: `algorithm()`).

    A large file is hashed from read-only mappings of its pages, 16 MiB at a time (no copy; BLAKE3
    splits each window over every core; mapped pages count in RSS, so the window bounds that); a small
    one in 4 MiB chunks read into one reused buffer. Either way the hasher releases the
    GIL, so another thread (an fsync, a download) runs meanwhile. After the call nothing stays mapped.
    """
    algo = algo or algorithm()
    h = new(algo, size)
    if size >= MAP_BYTES and algo == "blake3":
        try:
            update_mapped(h, fd, 0, size)
            return f"{algo}:{h.hexdigest()}"
        except (ValueError, OSError):  # shorter than declared, or not mappable: read it instead
            h = new(algo, size)
    buf = memoryview(bytearray(min(CHUNK, max(size, 1))))
    offset = 0
    while offset < size:
        want = buf[: min(len(buf), size - offset)]
        n = pread(fd, want, offset)
        if n <= 0:
            break  # shorter than declared: the digest will not match
        h.update(want[:n])
        offset += n
    return f"{algo}:{h.hexdigest()}"


def update_mapped(h: Hasher, fd: int, start: int, end: int) -> None:
    """Feed bytes `start` to `end` of `fd` to `h` from read-only mappings, one 16 MiB window at a time.

    No copy, and RSS grows by one window at most; nothing stays mapped after the call. Raises what
    `mmap` raises (ValueError, OSError) for a file shorter than `end` or one that cannot be mapped.
    """
    import mmap

    for at in range(start, end, WINDOW):
        base = at - at % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
        stop = min(at + WINDOW, end)
        with mmap.mmap(fd, stop - base, offset=base, access=mmap.ACCESS_READ) as mapped, \
                memoryview(mapped) as view, view[at - base:] as piece:
            h.update(piece)


def algorithm_of(digest: str) -> str:
    """The algorithm part of `<algo>:<hex>`."""
    return digest.partition(":")[0]


def pread(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` from `offset` of `fd`, without a copy where the platform has preadv; bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)
