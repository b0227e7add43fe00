"""Local artifact directories: verified, race-safe reads (writes: `_storage`)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from ._checked import hash_file
from ._digest import algorithm_of
from ._manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, RESERVED_NAMES, Manifest
from ._storage import _DIRECTORY, _NOFOLLOW, _OLD
from .errors import ArtifactNotFoundError, CorruptArtifactError, IntegrityError, PersistError, StorageError


class _Swapped(Exception):
    """The directory was replaced under us by a concurrent save: read again."""


class Opened:
    """A verified artifact: its manifest and one open handle per payload file."""

    def __init__(self, root: Path, manifest: Manifest, handles: Mapping[str, BinaryIO], signed: bool = False,
                 cleanup: Callable[[], None] | None = None) -> None:
        self.root, self.manifest, self.handles, self.signed = root, manifest, dict(handles), signed
        self._cleanup = cleanup

    def close(self) -> None:
        """Close every handle (and remove what was made to read them, for a remote artifact)."""
        for f in self.handles.values():
            f.close()
        if self._cleanup is not None:
            self._cleanup()


@contextlib.contextmanager
def local_reads(root: Path) -> Iterator[None]:
    """Report what the local disk refused while `root` was read as a StorageError (still the OSError, errno kept).

    A file this user may not read, or an I/O error. What mlpersist raises on purpose passes as it is.
    """
    try:
        yield
    except PersistError:
        raise
    except OSError as exc:
        name = exc.filename if exc.filename not in (None, str(root)) else None
        raise StorageError.of(exc, f"cannot read {root}{f': {name}' if name else ''}: {exc.strerror or exc}; check "
                                   "that this user may read it (and the disk, for an I/O error)") from exc


def read_manifest(root: Path) -> Manifest:
    """Read and validate only the manifest of the artifact at `root`."""
    with local_reads(root):
        dfd = _open_root(root)
        try:
            return Manifest.from_json(_read_small(dfd, MANIFEST_NAME))
        finally:
            os.close(dfd)


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


ManifestCheck = Callable[[Manifest, Callable[[str], bytes]], bool]


WholeFiles = Callable[[Manifest], Mapping[str, str]]  # payload name -> how it is kept whole
_ATTEMPTS = 20  # at most ~0.2 s of pauses in all


def open_artifact(root: Path, *, verify: bool, check_manifest: ManifestCheck | None = None,
                  whole: WholeFiles | None = None) -> Opened:
    """Open, check and hand over every payload file; retry if a concurrent save swaps it.

    `whole(manifest)` names the files to read whole into memory as they are hashed, whatever their
    size (`hash_file`); files under 16 MiB always are.
    """
    for attempt in range(_ATTEMPTS):
        try:
            with local_reads(root):
                return _open_once(root, verify=verify, check_manifest=check_manifest, whole=whole)
        except _Swapped:
            # replaced while we opened it: try again, after a short random pause that grows, so that
            # readers of a model saved in a loop do not keep meeting the writer's swap in step with it
            import random  # here: only readers that met a swap need it

            time.sleep(random.uniform(0, 0.001 * attempt))
        except ArtifactNotFoundError:
            if not _replacing(root):
                raise
            time.sleep(0.05)  # a non-atomic overwrite (no renameat2) is between its two renames
    raise CorruptArtifactError(f"{root} kept changing while it was read ({_ATTEMPTS} times: a writer saving in "
                               "a loop?); try again")


def _open_once(root: Path, *, verify: bool, check_manifest: ManifestCheck | None,
               whole: WholeFiles | None) -> Opened:
    dfd = _open_root(root)
    handles: dict[str, BinaryIO] = {}
    try:
        try:
            manifest = Manifest.from_json(_read_small(dfd, MANIFEST_NAME))
        except ArtifactNotFoundError:
            if _swapped(root, dfd):
                raise _Swapped from None
            raise
        signed = check_manifest is not None and check_manifest(
            manifest, lambda name: _read_small(dfd, name, missing_ok=True))
        for name, entry in manifest.files.items():
            try:
                fd = _open_in(dfd, name)
            except FileNotFoundError:
                if _swapped(root, dfd):
                    raise _Swapped from None
                raise IntegrityError(name, f"a file of {entry.size} bytes", "no such file") from None
            handles[name] = os.fdopen(fd, "rb")
            size = os.fstat(fd).st_size
            if size != entry.size:
                raise IntegrityError(name, f"{entry.size} bytes", f"{size} bytes")
        if verify:
            kept = whole(manifest) if whole is not None else {}
            for name, entry in manifest.files.items():  # small and kept files are then read from the bytes hashed
                digest, handles[name] = hash_file(handles[name], entry.size, algorithm_of(entry.digest),
                                                  whole=kept.get(name))
                if digest != entry.digest:
                    raise IntegrityError(name, entry.digest, digest)
            extra = sorted(set(_walk(dfd)) - set(manifest.files) - RESERVED_NAMES)
            if extra:
                raise IntegrityError(extra[0], "no such file (it is not in the manifest)",
                                     f"{len(extra)} unlisted file(s): {', '.join(extra[:5])}")
        return Opened(root, manifest, handles, signed)
    except BaseException:
        for handle in handles.values():
            handle.close()
        raise
    finally:
        os.close(dfd)


def _open_root(root: Path) -> int:
    try:
        return os.open(root, os.O_RDONLY | _DIRECTORY)
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"no artifact at {root}: the path does not exist") from None
    except NotADirectoryError:
        raise ArtifactNotFoundError(f"{root} is a file, not an artifact directory") from None


def _open_in(dfd: int, name: str) -> int:
    """Open `name` below `dfd` following no symlink anywhere; refuse anything not a plain file."""
    parts = name.split("/")
    fds = [dfd]
    try:
        for part in parts[:-1]:
            fds.append(_guard(lambda p=part: os.open(p, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=fds[-1]),
                              name))
        fd = _guard(lambda: os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=fds[-1]), name)
    finally:
        for extra in fds[1:]:
            os.close(extra)
    st = os.fstat(fd)
    if st.st_nlink == 0:  # unlinked since we opened it: a concurrent overwrite removed the old artifact
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "removed while opening", name)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"hard-linked ({st.st_nlink} links)"
        raise CorruptArtifactError(f"{name} is {kind}; an artifact holds plain files only: refusing to open it")
    return fd


def _guard(opener: object, name: str) -> int:
    try:
        return opener()  # type: ignore[operator,no-any-return]
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise CorruptArtifactError(f"{name} is or passes through a symlink; an artifact holds plain files only: "
                                       "refusing to open it") from None
        raise


def _read_small(dfd: int, name: str, *, missing_ok: bool = False) -> bytes:
    try:
        fd = _open_in(dfd, name)
    except FileNotFoundError:
        if missing_ok:
            return b""
        raise ArtifactNotFoundError(f"no {name} in the directory: it is not an mlpersist artifact, "
                                    "or its save did not finish") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptArtifactError(f"{name} is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def _walk(dfd: int) -> Iterator[str]:
    for dirpath, _dirs, files, _fd in os.fwalk(".", dir_fd=dfd):
        for name in files:
            yield os.path.normpath(os.path.join(dirpath, name)).replace(os.sep, "/")


def _replacing(root: Path) -> bool:
    """True while another process's non-atomic overwrite of `root` is under way."""
    head = f".{root.name}{_OLD}"
    with contextlib.suppress(OSError):
        return any(e.name.startswith(head) for e in os.scandir(root.parent))
    return False


def _swapped(root: Path, dfd: int) -> bool:
    try:
        return os.stat(root).st_ino != os.fstat(dfd).st_ino
    except FileNotFoundError:
        return True
