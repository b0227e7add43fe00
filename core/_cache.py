"""The local download cache for remote artifacts: one file per payload digest, shared by processes, bounded."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from . import _digest
from ._checked import Checked, hash_file
from ._digest import algorithm_of, new
from .errors import IntegrityError, PersistError

DEFAULT_MAX_BYTES = 10 << 30
_CHUNK = 4 << 20
_STALE_TMP_SECONDS = 24 * 3600

Reader = Callable[[], BinaryIO]  # opens the remote object for reading


def pump(src: BinaryIO, dst: BinaryIO | None, update: Callable[[int], None],
         algo: str | None = None, keep: bytearray | None = None) -> tuple[int, str]:
    """Copy `src` to `dst` (None: only read it) in 4 MiB chunks, telling `update` each chunk's size.

    Every transfer to or from a store goes through here; with `algo`, the bytes are hashed on the way
    (no second read), and `keep` collects them. Returns the byte count and `<algo>:<hex>` (empty
    without `algo`).
    """
    h = new(algo) if algo else None
    got = 0
    while chunk := src.read(_CHUNK):
        if h is not None:
            h.update(chunk)
        if dst is not None:
            dst.write(chunk)
        if keep is not None:
            keep += chunk
        got += len(chunk)
        update(len(chunk))
    return got, f"{algo}:{h.hexdigest()}" if h is not None else ""


def cache_dir() -> Path:
    """$MLPERSIST_CACHE_DIR, else $XDG_CACHE_HOME/mlpersist, else ~/.cache/mlpersist."""
    env = os.environ.get("MLPERSIST_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlpersist"


def max_bytes() -> int:
    """$MLPERSIST_CACHE_MAX_BYTES (an integer), else 10 GiB."""
    env = os.environ.get("MLPERSIST_CACHE_MAX_BYTES", "")
    if not env:
        return DEFAULT_MAX_BYTES
    try:
        return max(0, int(env))
    except ValueError:
        raise PersistError(f"MLPERSIST_CACHE_MAX_BYTES={env!r} is not a whole number of bytes") from None


class Cache:
    """`<dir>/blobs/<algorithm>/<hex>`: a file whose content has that digest, written once, read by many.

    A blob appears by an atomic rename of a fully written and checked temporary file, so a reader sees
    the whole content or nothing; eviction unlinks, which leaves handles already open intact.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_dir()
        self.tmp = self.root / "tmp"
        try:
            self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PersistError(f"cannot create the download cache {self.root} ({exc.strerror}); set "
                               "MLPERSIST_CACHE_DIR to a writable directory") from None

    def path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        return self.root / "blobs" / algo / hexpart

    def open(self, digest: str, size: int, *, verify: bool, whole: str | None = None) -> BinaryIO | None:
        """The cached blob, opened, or None if absent (or damaged: then it is removed)."""
        path = self.path(digest)
        try:
            f: BinaryIO = open(path, "rb")  # noqa: SIM115 - handed to the caller
        except FileNotFoundError:
            return None
        st = os.fstat(f.fileno())
        found = digest
        if st.st_size == size and verify:  # a small or `whole` blob is then read from the bytes hashed
            found, f = hash_file(f, size, algorithm_of(digest), whole=whole)
        if st.st_size != size or found != digest:
            f.close()
            with contextlib.suppress(OSError):
                path.unlink()  # damaged on this disk: fetch it again
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # last use, for eviction
        return f

    def fetch(self, digest: str, size: int, reader: Reader, progress: Callable[[int], None]) -> BinaryIO:
        """Download a blob through `reader`, check its size and digest, store it, return it opened.

        A blob under 16 MiB is returned as the very bytes that were checked (kept in memory as they
        streamed), as a local small file is: a later write to the cached file cannot reach the load.
        """
        algo = algorithm_of(digest)
        kept = bytearray() if size < _digest.MAP_BYTES else None
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix=f"{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as out, reader() as src:
                got, found = pump(src, out, progress, algo, kept)
                out.flush()
                os.fsync(out.fileno())
            if got != size or found != digest:
                raise IntegrityError(digest, f"{size} bytes with digest {digest}", f"{got} bytes with digest {found}")
            f = self.adopt(Path(tmp_name), digest)
            return f if kept is None else Checked(kept, f)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def adopt(self, file: Path, digest: str) -> BinaryIO:
        """Move a checked local file into the cache as the blob of `digest`; return it opened."""
        path = self.path(digest)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(file, 0o444)
        f = open(file, "rb")  # noqa: SIM115 - open before the rename: eviction cannot take it from us
        try:
            os.replace(file, path)
        except BaseException:
            f.close()
            raise
        return f

    def evict(self, keep: Iterable[str] = (), limit: int | None = None) -> None:
        """Remove least recently used blobs until the cache holds at most `limit` bytes (never one in `keep`)."""
        limit = max_bytes() if limit is None else limit
        kept = {self.path(d) for d in keep}
        blobs: list[tuple[float, int, Path]] = []
        for entry in _scan(self.root / "blobs"):
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                blobs.append((st.st_mtime, st.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in blobs)
        for _, size, path in sorted(blobs):
            if total <= limit:
                break
            if path not in kept:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                total -= size
        now = time.time()
        for entry in _scan(self.tmp):  # downloads of processes killed long ago
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TMP_SECONDS:
                    os.unlink(entry.path)

    def size(self) -> int:
        """Bytes held in blobs."""
        return sum(self.usage())

    def usage(self) -> list[int]:
        """The size of every blob held."""
        sizes = []
        for entry in _scan(self.root / "blobs"):
            with contextlib.suppress(FileNotFoundError):
                sizes.append(entry.stat(follow_symlinks=False).st_size)
        return sizes


def _scan(root: Path) -> list[os.DirEntry[str]]:
    found: list[os.DirEntry[str]] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False):
                found.extend(_scan(Path(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                found.append(entry)
    return found
