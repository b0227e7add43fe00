"""Artifacts in object stores (any fsspec URL): payload under content-addressed keys, the manifest written last.

An object store has no atomic rename, so a remote artifact is laid out for one atomic PUT instead:

    <url>/manifest.json                  the same bytes as a local artifact's; written last, in one request
    <url>/blobs/<algo>/<hex>             each payload file, under the digest the manifest gives it (blake3/…)

Blobs are never modified, only added and (by a later save, once unreferenced and old) removed, so a
manifest that a reader can see names only blobs that are there, whichever save wrote it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from ._cache import Cache, pump
from ._checked import Checked, hash_file
from ._digest import algorithm_of
from ._manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, RESERVED_NAMES, FileEntry, Manifest
from ._progress import Progress
from ._reading import ManifestCheck, Opened, WholeFiles
from ._record import Record
from .errors import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    IntegrityError,
    MissingFrameworkError,
    PersistError,
    StorageError,
)

BLOBS = "blobs"


class Store(Record):
    """One artifact location in one fsspec filesystem."""

    fs: Any
    root: str
    url: str

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self._init(fs=fs, root=root, url=url)

    def key(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    def blob(self, digest: str) -> str:
        algo, _, hexpart = digest.partition(":")
        return self.key(f"{BLOBS}/{algo}/{hexpart}")


def open_store(url: str, storage_options: Mapping[str, Any] | None) -> Store:
    """Resolve `url` with fsspec (credentials and endpoint from `storage_options` or the environment)."""
    try:
        import fsspec
    except ImportError:
        raise MissingFrameworkError(f"{url} is a remote URL, which needs fsspec: pip install 'mlpersist[s3]' "
                                    "(fsspec and s3fs; add gcsfs for gs://, adlfs for az://)") from None
    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:  # fsspec knows the protocol, its package is missing: the message names it
        raise MissingFrameworkError(f"{url}: {exc} (for s3://: pip install 'mlpersist[s3]')") from None
    except (ValueError, TypeError) as exc:
        raise PersistError(f"{url}: fsspec cannot open it ({exc}); check the protocol and storage_options") from None
    return Store(fs, str(root).rstrip("/"), url)


@contextlib.contextmanager
def _errors(store: Store, doing: str, *, missing: str | None = None) -> Iterator[None]:
    """Turn what a store raises into typed errors that say what to do."""
    try:
        yield
    except PersistError:
        raise
    except PermissionError as exc:
        raise StorageError(f"{store.url}: access denied while {doing} ({exc}); check the credentials: "
                           "storage_options= (key=, secret=, ...) or the AWS_*/cloud environment variables") from None
    except FileNotFoundError as exc:
        if missing is not None:
            raise ArtifactNotFoundError(f"no artifact at {store.url}: {missing} ({exc})") from None
        raise StorageError(f"{store.url}: not found while {doing} ({exc}); does the bucket exist? "
                           "mlpersist does not create buckets") from None
    except Exception as exc:  # network and client errors of any fsspec backend
        if "Credentials" in type(exc).__name__:  # botocore's NoCredentialsError, PartialCredentialsError
            raise StorageError(f"{store.url}: no usable credentials while {doing} ({exc}); pass them in "
                               "storage_options= (key=, secret=) or set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY") from None
        raise StorageError(f"{store.url}: the store failed while {doing}: {type(exc).__name__}: {exc}") from None


def _read_small(store: Store, name: str, *, missing_ok: bool = False) -> bytes:
    try:
        with _errors(store, f"reading {name}", missing=f"no {name} (not an artifact, or its save did not finish)"):
            # cat_file is one plain GET: no listing cache, so a manifest replaced a moment ago is seen whole
            data: bytes = store.fs.cat_file(store.key(name), start=0, end=MAX_MANIFEST_BYTES + 1)
    except ArtifactNotFoundError:
        if missing_ok:
            return b""
        raise
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptArtifactError(f"{store.url}/{name} is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def read_manifest(store: Store) -> Manifest:
    """Read and validate only the manifest."""
    return Manifest.from_json(_read_small(store, MANIFEST_NAME))


def _current(store: Store) -> Manifest | None:
    raw = _read_small(store, MANIFEST_NAME, missing_ok=True)
    return Manifest.from_json(raw) if raw else None


def _digests(manifest: Manifest | None) -> list[str]:
    return [e.digest for e in manifest.files.values()] if manifest is not None else []


# --- reading ---------------------------------------------------------------------------------------

class _Gone(PersistError):
    """A blob the manifest names is not in the store: the artifact may have been replaced meanwhile."""


def open_remote(store: Store, *, verify: bool, check_manifest: ManifestCheck | None = None,
                progress: bool | None = None, whole: WholeFiles | None = None) -> Opened:
    """Read the manifest, take each payload file from the cache or download it into the cache, checked.

    The files `whole(manifest)` names are read whole into memory as they are checked (`hash_file`), so
    the adapter gets the bytes that were checked.
    """
    cache = Cache()
    for _ in range(5):
        with _errors(store, "reading the manifest"):
            store.fs.invalidate_cache()  # s3fs remembers sizes and ETags: a listing from before is stale
        raw = _read_small(store, MANIFEST_NAME)
        manifest = Manifest.from_json(raw)
        signed = check_manifest is not None and check_manifest(
            manifest, lambda name: _read_small(store, name, missing_ok=True))
        try:
            kept = whole(manifest) if whole is not None else {}
            handles = _fetch(store, cache, manifest, verify=verify, progress=progress, kept=kept)
        except _Gone as gone:
            if _read_small(store, MANIFEST_NAME, missing_ok=True) != raw:
                continue  # replaced while we read: load the new one
            entry = manifest.files[str(gone)]
            raise IntegrityError(str(gone), f"a blob of {entry.size} bytes", "no such object in the store") from None
        view = Path(tempfile.mkdtemp(dir=cache.tmp, prefix="view-"))
        for name, entry in manifest.files.items():  # a tree of the payload names, for formats read by path
            (view / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(cache.path(entry.digest), view / name)
        return Opened(view, manifest, handles, signed, cleanup=partial(shutil.rmtree, view, True))
    raise CorruptArtifactError(f"{store.url} kept changing while it was read (a writer saving in a loop?); try again")


def _fetch(store: Store, cache: Cache, manifest: Manifest, *, verify: bool, progress: bool | None,
           kept: Mapping[str, str] | None = None) -> dict[str, BinaryIO]:
    """Every payload file opened from the cache (checked there with `verify`) or downloaded into it.

    A file under 16 MiB, and a `kept` one, is served from the bytes hashed: checked as it is read whole
    from the cache, or, when just downloaded, kept in memory as it streamed and was checked (a large
    `kept` one is read whole from the cache and checked once more).
    """
    handles: dict[str, BinaryIO] = {}
    kept = kept or {}
    try:
        missing = {}
        for name, entry in manifest.files.items():
            f = cache.open(entry.digest, entry.size, verify=verify, whole=kept.get(name))
            if f is None:
                missing[name] = entry
            else:
                handles[name] = f
        bar = Progress(f"download {store.url}", sum(e.size for e in missing.values()), progress)
        try:
            for name, entry in missing.items():
                handles[name] = _download(store, cache, name, entry, bar.update)
                if verify and name in kept and not isinstance(handles[name], Checked):  # large: read it whole
                    digest, handles[name] = hash_file(handles[name], entry.size, algorithm_of(entry.digest),
                                                      whole=kept[name])
                    if digest != entry.digest:  # changed on this disk since the download's check
                        raise IntegrityError(name, entry.digest, digest)
        finally:
            bar.close()
        if missing:  # the cache grew: trim it (a load served from the cache leaves it as it was)
            cache.evict(keep=_digests(manifest))
        return handles
    except BaseException:
        for f in handles.values():
            f.close()
        raise


def _download(store: Store, cache: Cache, name: str, entry: FileEntry, update: Callable[[int], None]) -> BinaryIO:
    def reader() -> BinaryIO:
        return store.fs.open(store.blob(entry.digest), "rb")  # type: ignore[no-any-return]

    with _errors(store, f"downloading {name}"):
        try:
            return cache.fetch(entry.digest, entry.size, reader, update)
        except FileNotFoundError:
            raise _Gone(name) from None
        except IntegrityError as exc:
            raise IntegrityError(name, exc.expected, exc.found) from None


@contextlib.contextmanager
def bare_file(store: Store, progress: bool | None = None) -> Iterator[Path | None]:
    """The object at the URL, downloaded under its own name to a temporary directory, if it is a file.

    That is a model saved without mlpersist; None when the URL names nothing or a prefix.
    """
    with _errors(store, "looking for a model file"):
        found = bool(store.root) and bool(store.fs.isfile(store.root))
        size = int(store.fs.size(store.root)) if found else 0
    if not found:
        yield None
        return
    with tempfile.TemporaryDirectory(dir=Cache().tmp, prefix="bare-") as tmp:
        local = Path(tmp) / store.root.rsplit("/", 1)[-1]  # the name: some formats are known by their suffix
        bar = Progress(f"download {store.url}", size, progress)
        try:
            with _errors(store, "downloading the model file"), store.fs.open(store.root, "rb") as src, \
                    open(local, "wb") as out:
                pump(src, out, bar.update)
        finally:
            bar.close()
        yield local


def verify_remote(store: Store, *, check_manifest: ManifestCheck | None = None) -> None:
    """Download and hash every blob (bypassing the cache), and refuse objects the manifest does not list."""
    with _errors(store, "reading the manifest"):
        store.fs.invalidate_cache()
    manifest = read_manifest(store)
    if check_manifest is not None:
        check_manifest(manifest, lambda name: _read_small(store, name, missing_ok=True))
    for name, entry in manifest.files.items():
        with _errors(store, f"downloading {name}"):
            try:
                with store.fs.open(store.blob(entry.digest), "rb") as src:  # hashed as it arrives, never stored
                    size, digest = pump(src, None, lambda n: None, algorithm_of(entry.digest))
            except FileNotFoundError:
                raise IntegrityError(name, f"a blob of {entry.size} bytes", "no such object in the store") from None
        if (size, digest) != (entry.size, entry.digest):
            raise IntegrityError(name, f"{entry.size} bytes, {entry.digest}", f"{size} bytes, {digest}")
    with _errors(store, "listing the artifact"):
        names = store.fs.ls(store.root, detail=False)
    extra = sorted(n for n in (n.rstrip("/").rsplit("/", 1)[-1] for n in names)
                   if n != BLOBS and n not in RESERVED_NAMES)
    if extra:
        raise IntegrityError(extra[0], "no such object (it is not in the manifest)",
                             f"{len(extra)} unlisted object(s): {', '.join(extra[:5])}")
