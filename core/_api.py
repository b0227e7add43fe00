"""The public calls: save_any, load_any, inspect, verify."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _bare, _checked, _environment, _location, _parts, _reading, _storage
from ._dispatch import detect
from ._manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, Part
from ._policy import TrustPolicy
from ._strictjson import check_json_value
from .errors import ArtifactNotFoundError, CorruptArtifactError, PersistError, StorageError

if TYPE_CHECKING:
    from . import _example
    from ._signing import KeySource


def save_any(model: Any, path: str | os.PathLike[str], *, overwrite: bool = False, metadata: Any = None,
             format: str | None = None, example: Any = None, storage_options: Mapping[str, Any] | None = None,
             progress: bool | None = None, **options: Any) -> Manifest:
    """Save `model` as an artifact directory at `path` (local, or any fsspec URL), atomically.

    Args:
        model: a fitted model of any framework an adapter claims, or a bundle: a dict whose values are
            models, plain JSON values or nested dicts (each model saved by its own adapter).
        path: the artifact directory to create, or an fsspec URL (`s3://bucket/churn/v3`, `memory://x`).
        overwrite: replace an existing artifact (readers see the old or the new one, never a mix).
        metadata: JSON-able data stored in the manifest as is.
        format: one of the adapter's formats (`mlpersist adapters` lists them); default its first.
        example: a small input (array, DataFrame, tensor; a tuple for several arguments) stored with the
            model's outputs on it, for `load_any(check=True)` and `mlpersist check`; for a bundle, a dict
            from part key to that part's example.
        storage_options: for a URL, passed to fsspec (credentials, `endpoint_url`, ...); default: the
            protocol's own environment variables and config.
        progress: a progress bar on stderr for an upload; default: on a terminal, above 16 MiB.
        **options: passed to the adapter (e.g. `compress=3` for joblib); for a bundle,
            `parts={key: {option: value}}`.

    Returns:
        The manifest written.

    Raises:
        mlpersist.errors.UnsupportedModelError: no adapter claims the model, or it cannot save it.
        mlpersist.errors.ArtifactExistsError: `path` exists and `overwrite` is false (it is left untouched).
        mlpersist.errors.MissingFrameworkError: the adapter's framework (or fsspec, for a URL) is not installed.
        mlpersist.errors.StorageError: a remote store refused or failed (credentials, missing bucket, network),
            or the local disk did (full, read-only, a file where a directory must be).

    """
    where = _location.where(path, storage_options)
    check_json_value(metadata, "metadata")
    if type(model) is not dict:
        detect(model)  # refuse an unsupported model before touching the disk or the network

    def write(root: Path, overwrite: bool = overwrite) -> Manifest:
        return write_artifact(root, overwrite=overwrite, metadata=metadata, fill=lambda dest: _parts.save_part(
            model, dest, fmt=format, options=dict(options), example=example))

    if not isinstance(where, Path):
        from . import _upload  # with the first URL only: keeps `import mlpersist` light

        return _upload.save(where, overwrite=overwrite, write_local=lambda root: write(root, False),
                            progress=progress)
    return write(where)


def write_artifact(root: Path, *, overwrite: bool, metadata: Any, fill: Callable[[Path], Part]) -> Manifest:
    """Stage an artifact beside `root`, let `fill` write its payload and describe it, seal and commit it.

    On any failure (or interruption) the staging directory is removed and `root` is untouched.
    """
    try:
        staging = _storage.Staging(root, overwrite=overwrite)
    except OSError as exc:
        if isinstance(exc, PersistError):
            raise
        raise StorageError.of(exc, f"cannot save to {root}: {exc.filename or root}: {exc.strerror or exc}; "
                                   "choose a path under a directory you can write to") from None
    try:
        with _storage.following() as followed:  # the digests large writers make as they write
            part = fill(staging.dir)
        manifest = Manifest(
            format_version=FORMAT_VERSION, adapter=part.adapter, format=part.format, model_class=part.model_class,
            framework=part.framework, framework_version=part.framework_version, files=staging.seal(followed),
            environment=_environment.environment(_parts.adapters_in(part)), created_at=_environment.created_at(),
            mlpersist_version=_environment.mlpersist_version(), metadata=metadata, info=part.info, example=part.example,
            parts=part.parts)
        raw = manifest.to_json()
        staging.commit(raw)
    except OSError as exc:
        staging.abort()
        if isinstance(exc, PersistError):
            raise
        state = ("the new artifact is in place, but the disk did not confirm it is durable: save again" if
                 staging.committed else "nothing was replaced and no temporary file is left: free space or fix "
                 "the disk, then save again")
        raise StorageError.of(exc, f"saving to {root} failed ({exc.strerror or exc}); {state}") from exc
    except BaseException:
        staging.abort()
        raise
    return Manifest.from_json(raw)


def load_any(path: str | os.PathLike[str], *, trusted: bool = False, allow: Iterable[str] = (),
             verify: bool = True, strict: bool = False, digest: str | None = None,
             public_key: KeySource | Iterable[KeySource] | None = None, check: bool | float = False,
             storage_options: Mapping[str, Any] | None = None, progress: bool | None = None, mmap: bool = False,
             **options: Any) -> Any:
    """Load the model saved at `path` (an artifact directory, or a model file saved without mlpersist).

    Args:
        path: the artifact directory (local, or any fsspec URL), or a model file saved without mlpersist.
        trusted: lift the allow-list for pickle-based content (only for files you trust).
        allow: extra `"module.Name"` globals a pickle may import, for this call only.
        verify: check every file's digest before it is opened (sizes are always checked).
        strict: a framework version different from the recorded one is an error, not a warning.
        digest: the manifest digest you expect (`mlpersist inspect` prints it); for a bare file, its
            `blake3:<hex>` or `sha256:<hex>` (`b3sum` / `sha256sum` of the file).
        public_key: Ed25519 public key(s) (PEM path or bytes) of which one must have signed the manifest;
            default: the keys named by $MLPERSIST_PUBLIC_KEYS. A valid signature lifts the allow-list.
        check: rerun the example stored at save (`example=`) and compare the outputs: True for the default
            tolerance (1e-5, relative to max(1, |stored value|)), or a float tolerance (0.0: bit for bit).
        storage_options: for a URL, passed to fsspec (credentials, `endpoint_url`, ...).
        progress: a progress bar on stderr for a download; default: on a terminal, above 16 MiB.
        mmap: map the large files an adapter otherwise copies into memory as it checks them (torch
            weights) instead: faster, and the pages stay page cache the kernel can reclaim, but the model
            then follows the file: a later write to it changes the weights, a truncation crashes the
            process (SIGBUS). Only for files nothing modifies while they are in use.
        **options: passed to the adapter; for a bundle, `parts={key: {option: value}}`.

    Returns:
        The model (for a bundle, a dict with the same keys).

    Raises:
        mlpersist.errors.ArtifactNotFoundError: nothing loadable at `path`.
        mlpersist.errors.CorruptArtifactError: the manifest or a payload is malformed.
        mlpersist.errors.IntegrityError: a file differs from the manifest, or the pinned digest.
        mlpersist.errors.SignatureError: keys are configured and no valid signature by one of them exists.
        mlpersist.errors.UntrustedContentError: the payload would run code the policy does not allow.
        mlpersist.errors.MissingFrameworkError: the framework that wrote it is not installed.
        mlpersist.errors.VersionMismatchError: with `strict=True`, the framework versions differ; without, the
            installed version would misread the artifact, or cannot read it while the saving versions differ.
        mlpersist.errors.CheckFailedError: with `check`, an output differs beyond the tolerance.
        mlpersist.errors.StorageError: a remote store refused or failed (credentials, network), or a local
            file cannot be read (this user may not, or an I/O error).

    """
    model, report, tolerance = load_with_report(path, trusted=trusted, allow=allow, verify=verify, strict=strict,
                                                digest=digest, public_key=public_key, check=check,
                                                storage_options=storage_options, progress=progress, mmap=mmap,
                                                **options)
    if tolerance is not None:
        if not report:
            raise PersistError(f"{path}: check=True, but it was saved without example= (nothing to rerun); "
                               "re-save it with save_any(model, path, example=X_small)")
        from . import _example

        _example.raise_on_failure(report, tolerance, os.fspath(path))
    return model


def load_with_report(path: str | os.PathLike[str], *, trusted: bool = False, allow: Iterable[str] = (),
                     verify: bool = True, strict: bool = False, digest: str | None = None,
                     public_key: KeySource | Iterable[KeySource] | None = None, check: bool | float = False,
                     storage_options: Mapping[str, Any] | None = None, progress: bool | None = None,
                     mmap: bool = False, **options: Any) -> tuple[Any, list[_example.Diff], float | None]:
    """`load_any`, returning also the comparison of each stored example output and the tolerance used."""
    def attempt() -> tuple[Any, list[_example.Diff], float | None]:
        return _load_with_report(path, trusted=trusted, allow=allow, verify=verify, strict=strict, digest=digest,
                                 public_key=public_key, check=check, storage_options=storage_options,
                                 progress=progress, mmap=mmap, **options)

    try:
        return attempt()
    except _checked.LeaseBroken:  # a large file read where it lies was opened for writing meanwhile
        with _checked.no_leases():  # again: copies of the files read by path, which must still match
            return attempt()


def _load_with_report(path: str | os.PathLike[str], *, trusted: bool, allow: Iterable[str], verify: bool,
                      strict: bool, digest: str | None, public_key: KeySource | Iterable[KeySource] | None,
                      check: bool | float, storage_options: Mapping[str, Any] | None, progress: bool | None,
                      mmap: bool, **options: Any) -> tuple[Any, list[_example.Diff], float | None]:
    from . import _signing  # only loads need it: keeps `import mlpersist` light

    tolerance = _tolerance(check)
    where = _location.where(path, storage_options)
    keys = _signing.load_public_keys(public_key)
    policy = TrustPolicy.of(trusted, allow)
    whole = None if mmap else _parts.read_whole
    if not isinstance(where, Path):
        from . import _remote

        try:
            opened = _remote.open_remote(where, verify=verify, check_manifest=_signing.checker(digest, keys),
                                         progress=progress, whole=whole)
        except ArtifactNotFoundError:
            with _remote.bare_file(where, progress) as local:  # a model file saved without mlpersist, at a URL
                if local is None:
                    raise
                return _bare.load_file(local, policy, digest=digest, signed_required=bool(keys), mmap=mmap,
                                  **options), [], tolerance
        return _load_opened(opened, policy, strict, tolerance, options)
    root = where
    if root.is_file():
        model = _bare.load_file(root, policy, digest=digest, signed_required=bool(keys), mmap=mmap, **options)
        return model, [], tolerance
    try:
        opened = _reading.open_artifact(root, verify=verify, check_manifest=_signing.checker(digest, keys),
                                        whole=whole)
    except ArtifactNotFoundError:
        if not root.is_dir() or (root / MANIFEST_NAME).exists():
            raise
        return _bare.load_dir(root, policy, signed_required=bool(keys), **options), [], tolerance
    return _load_opened(opened, policy, strict, tolerance, options)


def _load_opened(opened: _reading.Opened, policy: TrustPolicy, strict: bool, tolerance: float | None,
                 options: dict[str, Any]) -> tuple[Any, list[_example.Diff], float | None]:
    try:
        if opened.signed:  # signed by a key the caller configured: the caller trusts its author
            policy = TrustPolicy(True, policy.allow)
        ctx = _parts.LoadContext(opened.root, policy, strict, tolerance)
        try:
            model = _parts.load_part(_parts.part_of(opened.manifest), opened.handles, ctx, dict(options))
        except CorruptArtifactError as exc:
            mismatch = _environment.unreadable_here(exc, opened.manifest.environment)
            if mismatch is None:
                raise
            raise mismatch from exc
        return model, ctx.report, tolerance
    finally:
        opened.close()


def _tolerance(check: bool | float) -> float | None:
    if check is False or check is None:
        return None
    if check is True:
        from ._example import DEFAULT_TOLERANCE

        return DEFAULT_TOLERANCE
    if isinstance(check, (int, float)) and check >= 0:
        return float(check)
    raise PersistError(f"check= takes True, False or a tolerance >= 0, not {check!r}")


def inspect(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read the manifest only; import no framework.

    Raises:
        mlpersist.errors.ArtifactNotFoundError: no artifact at `path`.
        mlpersist.errors.CorruptArtifactError: the manifest is malformed.
        mlpersist.errors.StorageError: the manifest (or its store) cannot be read.

    """
    root = _location.where(path, storage_options)
    if not isinstance(root, Path):
        from . import _remote

        try:
            return _remote.read_manifest(root)
        except ArtifactNotFoundError:
            with _remote.bare_file(root) as local:
                if local is None:
                    raise
                manifest, f = _bare.bare_manifest(local, source=root.url)
                f.close()
                return manifest
    if root.is_file():
        manifest, f = _bare.bare_manifest(root)
        f.close()
        return manifest
    return _reading.read_manifest(root)


def verify(path: str | os.PathLike[str], *, digest: str | None = None,
           public_key: KeySource | Iterable[KeySource] | None = None,
           storage_options: Mapping[str, Any] | None = None) -> None:
    """Check every payload file's size and digest, that no unlisted file is present, and pins/signature.

    Args:
        path: the artifact directory, or its URL (every blob is downloaded and hashed, bypassing the cache).
        digest: the manifest digest you expect.
        public_key: key(s) of which one must have signed it (default: $MLPERSIST_PUBLIC_KEYS).
        storage_options: for a URL, passed to fsspec.

    Raises:
        mlpersist.errors.IntegrityError: naming the first file that differs.
        mlpersist.errors.SignatureError: keys are configured and no valid signature by one of them exists.
        mlpersist.errors.ArtifactNotFoundError, mlpersist.errors.CorruptArtifactError: as for `inspect`.

    """
    from . import _signing

    check = _signing.checker(digest, _signing.load_public_keys(public_key))
    where = _location.where(path, storage_options)
    with _checked.no_leases():  # nothing is handed to a framework: no writer need wait for the hashing
        if not isinstance(where, Path):
            from . import _remote

            _remote.verify_remote(where, check_manifest=check)
        else:
            _reading.open_artifact(where, verify=True, check_manifest=check).close()
