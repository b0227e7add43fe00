"""The public calls: save_any, load_any, inspect, verify."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _parts, _reading, _registry, _storage
from ._checked import hash_file
from ._digest import HEX_LENGTHS, algorithm_of
from ._dispatch import detect, sniff
from ._manifest import FORMAT_VERSION, MANIFEST_NAME, FileEntry, Manifest, Part, check_json_value
from ._payload import Payload
from ._policy import TrustPolicy
from .errors import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    IntegrityError,
    PersistError,
    SignatureError,
)

if TYPE_CHECKING:
    from . import _example
    from ._remote import Store
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
        mlpersist.errors.StorageError: a remote store refused or failed (credentials, missing bucket, network).

    """
    where = _where(path, storage_options)
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
    staging = _storage.Staging(root, overwrite=overwrite)
    try:
        part = fill(staging.dir)
        manifest = Manifest(
            format_version=FORMAT_VERSION, adapter=part.adapter, format=part.format, model_class=part.model_class,
            framework=part.framework, framework_version=part.framework_version, files=staging.seal(),
            environment=_parts.environment(_parts.adapters_in(part)), created_at=_now(),
            mlpersist_version=_parts.mlpersist_version(), metadata=metadata, info=part.info, example=part.example,
            parts=part.parts)
        raw = manifest.to_json()
        staging.commit(raw)
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
        mlpersist.errors.VersionMismatchError: with `strict=True`, the framework versions differ.
        mlpersist.errors.CheckFailedError: with `check`, an output differs beyond the tolerance.
        mlpersist.errors.StorageError: a remote store refused or failed (credentials, network).

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
    from . import _signing  # only loads need it: keeps `import mlpersist` light

    tolerance = _tolerance(check)
    where = _where(path, storage_options)
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
                return _load_bare(local, policy, digest=digest, signed_required=bool(keys), mmap=mmap,
                                  **options), [], tolerance
        return _load_opened(opened, policy, strict, tolerance, options)
    root = where
    if root.is_file():
        model = _load_bare(root, policy, digest=digest, signed_required=bool(keys), mmap=mmap, **options)
        return model, [], tolerance
    try:
        opened = _reading.open_artifact(root, verify=verify, check_manifest=_signing.checker(digest, keys),
                                        whole=whole)
    except ArtifactNotFoundError:
        if not root.is_dir() or (root / MANIFEST_NAME).exists():
            raise
        return _load_bare_dir(root, policy, signed_required=bool(keys), **options), [], tolerance
    return _load_opened(opened, policy, strict, tolerance, options)


def _load_opened(opened: _reading.Opened, policy: TrustPolicy, strict: bool, tolerance: float | None,
                 options: dict[str, Any]) -> tuple[Any, list[_example.Diff], float | None]:
    try:
        if opened.signed:  # signed by a key the caller configured: the caller trusts its author
            policy = TrustPolicy(True, policy.allow)
        ctx = _parts.LoadContext(opened.root, policy, strict, tolerance)
        model = _parts.load_part(_parts.part_of(opened.manifest), opened.handles, ctx, dict(options))
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

    """
    root = _where(path, storage_options)
    if not isinstance(root, Path):
        from . import _remote

        try:
            return _remote.read_manifest(root)
        except ArtifactNotFoundError:
            with _remote.bare_file(root) as local:
                if local is None:
                    raise
                manifest, f = _bare_manifest(local, source=root.url)
                f.close()
                return manifest
    if root.is_file():
        manifest, f = _bare_manifest(root)
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
    where = _where(path, storage_options)
    if not isinstance(where, Path):
        from . import _remote

        _remote.verify_remote(where, check_manifest=check)
    else:
        _reading.open_artifact(where, verify=True, check_manifest=check).close()


def _bare_manifest(path: Path, source: str | None = None, pinned: str | None = None,
                   whole: Callable[[str], Mapping[str, str]] | None = None) -> tuple[Manifest, BinaryIO]:
    """Describe a bare model file as an artifact of one payload file, opened once (hashed as `pinned` is).

    `whole(adapter)`: the payload names that adapter keeps whole (`_parts.whole_names`), asked by loads
    only, since it imports the adapter (`inspect` imports no framework).
    """
    algo = algorithm_of(pinned) if pinned else None
    if algo is not None and algo not in HEX_LENGTHS:
        raise PersistError(f"digest={pinned!r}: a bare file's pinned digest is one of "
                           f"{', '.join(a + ':<hex>' for a in sorted(HEX_LENGTHS))}")
    name, fmt, payload_name = sniff(path)
    spec = _registry.get_spec(name)
    assert spec is not None
    f: BinaryIO = open(path, "rb")  # noqa: SIM115 - handed to the caller, closed there
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CorruptArtifactError(f"{path} is not a regular file")
        # a small file, or one its adapter keeps whole, is then read from the bytes hashed
        digest, f = hash_file(f, st.st_size, algo, whole=whole(name).get(payload_name) if whole else None)
        entry = FileEntry(st.st_size, digest)
        manifest = Manifest(FORMAT_VERSION, name, fmt, "unknown:unknown", spec.package, "unknown",
                            {payload_name: entry}, {}, _now(), _parts.mlpersist_version(),
                            {"source": source or str(path)}, {"bare": True})
    except BaseException:
        f.close()
        raise
    return Manifest.from_json(manifest.to_json()), f


def _load_bare(path: Path, policy: TrustPolicy, *, digest: str | None, signed_required: bool, mmap: bool,
               **options: Any) -> Any:
    if signed_required:
        raise SignatureError(str(path), "an artifact signed by a configured key",
                             "a bare file, which carries no signature (wrap it in an artifact and sign that)")
    manifest, f = _bare_manifest(path, pinned=digest, whole=None if mmap else _parts.whole_names)
    try:
        (payload_name,) = manifest.files
        if digest is not None and manifest.files[payload_name].digest != digest:
            raise IntegrityError(str(path), f"pinned digest {digest}", manifest.files[payload_name].digest)
        adapter = _parts.adapter_for(_parts.part_of(manifest), strict=False)
        return adapter.load(Payload({payload_name: f}, policy), manifest.info, format=manifest.format, **options)
    finally:
        f.close()


def _load_bare_dir(root: Path, policy: TrustPolicy, *, signed_required: bool, **options: Any) -> Any:
    """A model directory saved without mlpersist (a TensorFlow SavedModel): recognised, then trust rules."""
    name, fmt, payload_name = sniff(root)
    if signed_required:
        raise SignatureError(str(root), "an artifact signed by a configured key",
                             "a bare directory, which carries no signature (wrap it with mlpersist convert and sign)")
    spec = _registry.get_spec(name)
    assert spec is not None
    adapter = _parts.adapter_for(Part(name, "", fmt, "unknown:unknown", spec.package, "unknown"), strict=False)
    return adapter.load(Payload({}, policy, dirs={payload_name: root}), {"bare": True}, format=fmt, **options)


def _where(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> Path | Store:
    """A local artifact path, or the store of an fsspec URL."""
    text = _text(path)
    if _is_url(text):
        from . import _remote

        return _remote.open_store(text, storage_options)
    if storage_options:
        raise PersistError(f"{text}: storage_options= applies to URLs (s3://..., memory://...), not local paths")
    return _local(text)


def _local(path: str | os.PathLike[str], what: str = "") -> Path:
    text = _text(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif _is_url(text):
        raise PersistError(f"{text}: {what or 'this call'} takes a local path; URLs are for save_any, load_any, "
                           "inspect and verify")
    if not text:
        raise PersistError("path is empty")
    return Path(os.path.abspath(text))


def _is_url(text: str) -> bool:
    """A URL fsspec must open (`file://` is a local path: it keeps the local, rename-based commit)."""
    return ("://" in text or "::" in text) and not text.startswith("file://")


def _text(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    return os.fsdecode(text) if isinstance(text, bytes) else text


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

