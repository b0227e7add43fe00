"""Local artifact directories: atomic, durable writes; verified, race-safe reads."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ._checked import hash_file
from ._digest import algorithm, algorithm_of, hash_fd
from ._manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, RESERVED_NAMES, FileEntry, Manifest, check_name
from .errors import ArtifactExistsError, ArtifactNotFoundError, CorruptArtifactError, IntegrityError, PersistError

_TMP = ".mlpersist-tmp-"
_OLD = ".mlpersist-old-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_OVERLAP_BYTES = 1 << 20


def _rmtree(path: Path | str) -> None:
    """Remove a tree, ignoring errors (shutil is imported here: it brings zlib, bz2 and lzma)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# The I/O seam: fault-injection tests patch these names, never the frameworks.
fsync = os.fsync
rename = os.rename
write = os.write


# --- writing ---------------------------------------------------------------------------------------

class Staging:
    """A fresh directory beside `target` where one save is written before it is committed."""

    def __init__(self, target: Path, *, overwrite: bool) -> None:
        self.target, self.overwrite = target, overwrite
        check_target(target, overwrite=overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        self.dir = target.with_name(f".{target.name}{_TMP}{_host()}-{os.getpid()}-{os.urandom(6).hex()}")
        os.mkdir(self.dir, 0o777)  # the umask applies, as for any directory the user makes

    def seal(self) -> dict[str, FileEntry]:
        """Fsync and digest every file the adapter wrote; refuse anything but regular files.

        The fsync of each file of 1 MiB or more runs on a second thread while this one hashes it (both
        release the GIL): the disk flush and the digest overlap instead of adding up. Small files are
        flushed inline: a thread would cost more than it saves.
        """
        from concurrent.futures import Future, ThreadPoolExecutor

        algo = algorithm()
        entries: dict[str, FileEntry] = {}
        fds: list[int] = []
        syncs: list[Future[None]] = []
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="mlpersist-fsync") as pool:  # no thread until a submit
                for dirpath, dirnames, filenames, dfd in os.fwalk(self.dir):
                    for name in dirnames:
                        if stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                            raise PersistError(f"the adapter wrote a symlink {name!r}; artifacts hold regular "
                                               "files only")
                    for name in filenames:
                        rel = os.path.relpath(os.path.join(dirpath, name), self.dir).replace(os.sep, "/")
                        check_name(rel)
                        fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dfd)
                        fds.append(fd)
                        st = os.fstat(fd)
                        if not stat.S_ISREG(st.st_mode):
                            raise PersistError(f"the adapter wrote {rel!r}, which is not a regular file")
                        if st.st_size >= _OVERLAP_BYTES:
                            syncs.append(pool.submit(fsync, fd))
                        else:
                            fsync(fd)
                        entries[rel] = FileEntry(st.st_size, hash_fd(fd, st.st_size, algo))
                    if dirpath != str(self.dir):  # the root's entries are flushed by commit, with the manifest's
                        fsync(dfd)
                for done in syncs:
                    done.result()  # an fsync error (ENOSPC, EIO) fails the save here
        finally:
            for fd in fds:
                os.close(fd)
        return entries

    def commit(self, manifest: bytes) -> None:
        """Write the manifest last, then move the whole directory into place in one step."""
        fd = os.open(self.dir / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(manifest)
            while view:
                view = view[write(fd, view):]
            fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.dir)
        if self.overwrite and _is_artifact(self.target):
            old = exchange(self.dir, self.target)  # self.dir now holds the previous artifact
            try:
                _fsync_dir(self.target.parent)
            finally:
                _rmtree(old)
        else:
            if not rename_noreplace(self.dir, self.target):
                raise ArtifactExistsError(f"{self.target} appeared while saving (another writer?); "
                                          "nothing was replaced: pass overwrite=True to replace it")
            _fsync_dir(self.target.parent)

    def abort(self) -> None:
        """Remove everything this save wrote; the target is untouched."""
        _rmtree(self.dir)


def check_target(target: Path, *, overwrite: bool) -> None:
    """Raise ArtifactExistsError unless `target` may receive a new artifact."""
    if not os.path.lexists(target):
        return
    if _is_empty_dir(target):
        return  # nothing to lose: a directory made for the artifact
    if not _is_artifact(target):
        raise ArtifactExistsError(f"{target} exists and is not an mlpersist artifact; refusing to replace it "
                                  "even with overwrite=True: remove it or choose another path")
    if not overwrite:
        raise ArtifactExistsError(f"{target} already holds an artifact; pass overwrite=True to replace it")


def clean_stale(target: Path) -> None:
    """Remove temporaries of earlier saves to `target` whose process on this host is gone."""
    heads = tuple(f".{target.name}{prefix}{_host()}-" for prefix in (_TMP, _OLD))
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:  # one pass over the parent
        for entry in entries:
            if entry.name.startswith(heads):
                head = next(h for h in heads if entry.name.startswith(h))
                pid = entry.name[len(head):].partition("-")[0]
                if pid.isdigit() and not _alive(int(pid)):
                    _rmtree(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _host() -> str:
    import socket

    return "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


def _is_artifact(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST_NAME).is_file()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@functools.cache
def libc_function(name: str, argtypes: tuple[Any, ...]) -> Any:
    """A function of the C library, looked up once (ctypes); None off Linux or where the library lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the system or filesystem does not offer it."""
    import ctypes

    fn = libc_function("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))
    if fn is None:
        return False
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Move `src` to `dst` unless `dst` holds something; True on success."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return True
    except FileExistsError:
        if not _is_empty_dir(dst):
            return False
    try:
        rename(src, dst)  # POSIX rename replaces only an empty directory
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def exchange(new: Path, target: Path) -> Path:
    """Swap `new` into `target` atomically; return where the previous artifact now lies."""
    if _renameat2(new, target, _RENAME_EXCHANGE):
        return new
    # No atomic exchange here (not Linux, or the filesystem lacks it): two renames, with a
    # window in which `target` is absent; readers retry, and the old copy is kept until the end.
    old = target.with_name(f".{target.name}{_OLD}{_host()}-{os.getpid()}-{os.urandom(4).hex()}")
    rename(target, old)
    try:
        rename(new, target)
    except BaseException:
        rename(old, target)
        raise
    return old


# --- reading ---------------------------------------------------------------------------------------

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


def read_manifest(root: Path) -> Manifest:
    """Read and validate only the manifest of the artifact at `root`."""
    dfd = _open_root(root)
    try:
        return Manifest.from_json(_read_small(dfd, MANIFEST_NAME))
    finally:
        os.close(dfd)


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
