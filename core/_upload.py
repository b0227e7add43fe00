"""Saving to an object store: payload blobs first, the manifest in one PUT last, old blobs collected later.

The layout and the reading side are in `_remote`; docs/format.md gives the exact guarantee.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ._cache import Cache, pump
from ._manifest import MANIFEST_NAME, FileEntry, Manifest
from ._progress import Progress
from ._remote import BLOBS, Store, _current, _digests, _errors
from .errors import ArtifactExistsError

# A blob no manifest names is removed by a later save only when older than this: a save still uploading
# (or a reader still holding the manifest before) is far younger.
GC_GRACE_SECONDS = 3600.0


def save(store: Store, *, overwrite: bool, write_local: Callable[[Path], Manifest],
         progress: bool | None = None) -> Manifest:
    """Write the artifact locally with `write_local`, upload its payload, then its manifest in one PUT."""
    with _errors(store, "looking at the target"):
        store.fs.invalidate_cache()
        previous = _current(store)
        if previous is not None and not overwrite:
            raise ArtifactExistsError(f"{store.url} already holds an artifact; pass overwrite=True to replace it")
        if previous is None:
            _check_no_foreign_objects(store)
    cache = Cache()
    with tempfile.TemporaryDirectory(dir=cache.tmp, prefix="save-") as tmp:
        local = Path(tmp) / "artifact"
        manifest = write_local(local)
        raw = (local / MANIFEST_NAME).read_bytes()
        bar = Progress(f"upload {store.url}", sum(e.size for e in manifest.files.values()), progress)
        try:
            with _errors(store, "uploading the payload"):
                for name, entry in manifest.files.items():
                    _put_blob(store, local / name, entry, bar.update)
        finally:
            bar.close()
        with _errors(store, "writing the manifest"):
            _put_manifest(store, raw, overwrite=overwrite)
        for name, entry in manifest.files.items():  # a load of what was just saved downloads nothing
            with contextlib.suppress(OSError):
                cache.adopt(local / name, entry.digest).close()
    keep = set(_digests(manifest)) | set(_digests(previous))
    collect_garbage(store, keep)
    cache.evict(keep=_digests(manifest))
    return manifest


def _check_no_foreign_objects(store: Store) -> None:
    try:
        names = store.fs.ls(store.root, detail=False) if store.root else []
    except FileNotFoundError:
        return
    foreign = sorted(n for n in names if n.rstrip("/").rsplit("/", 1)[-1] != BLOBS)
    if foreign:
        raise ArtifactExistsError(f"{store.url} holds objects and no mlpersist manifest (e.g. {foreign[0]}); "
                                  "refusing to write into it, even with overwrite=True: choose another prefix")


def _put_blob(store: Store, file: Path, entry: FileEntry, update: Callable[[int], None]) -> None:
    """Upload one payload file under its digest (always: a fresh upload also renews its age for the GC)."""
    with open(file, "rb") as src, store.fs.open(store.blob(entry.digest), "wb") as dst:
        pump(src, dst, update)


def _put_manifest(store: Store, raw: bytes, *, overwrite: bool) -> None:
    """The commit: one PUT. Without overwrite, a conditional create where the store offers one."""
    key = store.key(MANIFEST_NAME)
    if overwrite:
        store.fs.pipe_file(key, raw)
        return
    try:
        with store.fs.open(key, "xb") as f:
            f.write(raw)
        return
    except FileExistsError:
        raise ArtifactExistsError(f"{store.url} appeared while saving (another writer?); nothing was replaced: "
                                  "pass overwrite=True to replace it") from None
    except (ValueError, NotImplementedError):
        pass  # no exclusive create here: check, then write (a racing writer may still win)
    if store.fs.exists(key):
        raise ArtifactExistsError(f"{store.url} appeared while saving (another writer?); nothing was replaced")
    store.fs.pipe_file(key, raw)


def collect_garbage(store: Store, keep: Iterable[str], grace: float | None = None) -> int:
    """Remove blobs that neither `keep` nor the current manifest names and that are older than `grace`.

    Best effort (a failure leaves garbage for the next save); returns how many blobs were removed.
    """
    grace = GC_GRACE_SECONDS if grace is None else grace
    kept = set(keep)
    try:
        store.fs.invalidate_cache()
        kept |= set(_digests(_current(store)))
        infos = store.fs.find(store.key(BLOBS), detail=True)
    except Exception:  # a store that cannot list: the garbage waits for the next save
        return 0
    now, removed = time.time(), 0
    for key, info in infos.items():
        algo, hexpart = key.rsplit("/", 2)[-2:]
        modified = _mtime(info)
        if f"{algo}:{hexpart}" in kept or modified is None or now - modified < grace:
            continue
        with contextlib.suppress(Exception):
            store.fs.rm_file(key)
            removed += 1
    return removed


def _mtime(info: Mapping[str, Any]) -> float | None:
    for field in ("LastModified", "mtime", "created", "last_modified"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None
