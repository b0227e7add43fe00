"""The public calls: save_any, load_any, inspect, verify."""

from __future__ import annotations

import os
import stat
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _registry, _storage
from ._dispatch import detect, sniff
from ._manifest import FORMAT_VERSION, FileEntry, Manifest, check_json_value
from ._payload import Payload
from ._policy import TrustPolicy
from .errors import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    IntegrityError,
    PersistError,
    SignatureError,
    UnsupportedModelError,
    VersionMismatchError,
    VersionMismatchWarning,
)

if TYPE_CHECKING:
    from ._signing import KeySource

_ENV_CACHE: dict[str, dict[str, Any]] = {}


def save_any(model: Any, path: str | os.PathLike[str], *, overwrite: bool = False, metadata: Any = None,
             format: str | None = None, **options: Any) -> Manifest:
    """Save `model` as an artifact directory at `path`, atomically.

    Args:
        model: a fitted model of any framework an adapter claims.
        path: the artifact directory to create.
        overwrite: replace an existing artifact (readers see the old or the new one, never a mix).
        metadata: JSON-able data stored in the manifest as is.
        format: one of the adapter's formats (`mlpersist adapters` lists them); default its first.
        **options: passed to the adapter (e.g. `compress=3` for joblib).

    Returns:
        The manifest written.

    Raises:
        mlpersist.errors.UnsupportedModelError: no adapter claims the model, or it cannot save it.
        mlpersist.errors.ArtifactExistsError: `path` exists and `overwrite` is false (it is left untouched).
        mlpersist.errors.MissingFrameworkError: the adapter's framework is not installed.

    """
    root = _local(path)
    check_json_value(metadata, "metadata")
    name = detect(model)
    spec = _registry.get_spec(name)
    assert spec is not None  # detect only returns registered names
    fmt = format or (spec.formats[0] if spec.formats else "default")
    if spec.formats and fmt not in spec.formats:
        raise PersistError(f"format {fmt!r} is not one the {name} adapter writes ({', '.join(spec.formats)})")
    adapter = _registry.get_adapter(name)
    staging = _storage.Staging(root, overwrite=overwrite)
    try:
        try:
            info = dict(adapter.save(model, staging.dir, format=fmt, **options))
        except (PersistError, OSError):
            raise
        except Exception as exc:
            raise UnsupportedModelError(f"the {name} adapter could not save {type(model).__qualname__} as "
                                        f"{fmt}: {type(exc).__name__}: {exc}") from exc
        info["adapter_format_version"] = adapter.format_version
        check_json_value(info, f"what the {name} adapter returned")
        cls = type(model)
        manifest = Manifest(
            format_version=FORMAT_VERSION, adapter=name, format=fmt, model_class=f"{cls.__module__}:{cls.__qualname__}",
            framework=spec.package, framework_version=_framework_version(spec) or "unknown",
            files=staging.seal(), environment=_environment(name, adapter, spec), created_at=_now(),
            mlpersist_version=_version("mlpersist") or "unknown", metadata=metadata, info=info)
        raw = manifest.to_json()
        staging.commit(raw)
    except BaseException:
        staging.abort()
        raise
    return Manifest.from_json(raw)


def load_any(path: str | os.PathLike[str], *, trusted: bool = False, allow: Iterable[str] = (),
             verify: bool = True, strict: bool = False, digest: str | None = None,
             public_key: KeySource | Iterable[KeySource] | None = None, **options: Any) -> Any:
    """Load the model saved at `path` (an artifact directory, or a bare joblib/pickle file).

    Args:
        path: the artifact directory, or a model file saved without mlpersist.
        trusted: lift the allow-list for pickle-based content (only for files you trust).
        allow: extra `"module.Name"` globals a pickle may import, for this call only.
        verify: check every file's digest before it is opened (sizes are always checked).
        strict: a framework version different from the recorded one is an error, not a warning.
        digest: the manifest digest you expect (`mlpersist inspect` prints it); for a bare file, its sha256.
        public_key: Ed25519 public key(s) (PEM path or bytes) of which one must have signed the manifest;
            default: the keys named by $MLPERSIST_PUBLIC_KEYS. A valid signature lifts the allow-list.
        **options: passed to the adapter.

    Returns:
        The model.

    Raises:
        mlpersist.errors.ArtifactNotFoundError: nothing loadable at `path`.
        mlpersist.errors.CorruptArtifactError: the manifest or a payload is malformed.
        mlpersist.errors.IntegrityError: a file differs from the manifest, or the pinned digest.
        mlpersist.errors.SignatureError: keys are configured and no valid signature by one of them exists.
        mlpersist.errors.UntrustedContentError: the payload would run code the policy does not allow.
        mlpersist.errors.MissingFrameworkError: the framework that wrote it is not installed.
        mlpersist.errors.VersionMismatchError: with `strict=True`, the framework versions differ.

    """
    from . import _signing  # only loads need it: keeps `import mlpersist` light

    root = _local(path)
    keys = _signing.load_public_keys(public_key)
    policy = TrustPolicy.of(trusted, allow)
    if root.is_file():
        return _load_bare(root, policy, digest=digest, signed_required=bool(keys), **options)
    try:
        opened = _storage.open_artifact(root, verify=verify, check_manifest=_signing.checker(digest, keys))
    except ArtifactNotFoundError:
        if (root / "saved_model.pb").is_file():  # looked at only when there is no manifest
            raise ArtifactNotFoundError(
                f"{root} is a TensorFlow SavedModel, not a Keras model file: Keras 3 cannot load it as a model. Load "
                "it for inference with keras.layers.TFSMLayer(path, call_endpoint='serving_default') (it runs the "
                "graph in the directory: only for files you trust), or re-save the original model with save_any"
            ) from None
        raise
    try:
        manifest = opened.manifest
        adapter = _adapter_for(manifest, strict=strict)
        if opened.signed:  # signed by a key the caller configured: the caller trusts its author
            policy = TrustPolicy(True, policy.allow)
        return adapter.load(Payload(opened.handles, policy, root), manifest.info, format=manifest.format, **options)
    finally:
        opened.close()


def inspect(path: str | os.PathLike[str]) -> Manifest:
    """Read the manifest only; import no framework.

    Raises:
        mlpersist.errors.ArtifactNotFoundError: no artifact at `path`.
        mlpersist.errors.CorruptArtifactError: the manifest is malformed.

    """
    root = _local(path)
    if root.is_file():
        manifest, f = _bare_manifest(root)
        f.close()
        return manifest
    return _storage.read_manifest(root)


def verify(path: str | os.PathLike[str], *, digest: str | None = None,
           public_key: KeySource | Iterable[KeySource] | None = None) -> None:
    """Check every payload file's size and digest, that no unlisted file is present, and pins/signature.

    Args:
        path: the artifact directory.
        digest: the manifest digest you expect.
        public_key: key(s) of which one must have signed it (default: $MLPERSIST_PUBLIC_KEYS).

    Raises:
        mlpersist.errors.IntegrityError: naming the first file that differs.
        mlpersist.errors.SignatureError: keys are configured and no valid signature by one of them exists.
        mlpersist.errors.ArtifactNotFoundError, mlpersist.errors.CorruptArtifactError: as for `inspect`.

    """
    from . import _signing

    check = _signing.checker(digest, _signing.load_public_keys(public_key))
    _storage.open_artifact(_local(path), verify=True, check_manifest=check).close()


def _adapter_for(manifest: Manifest, *, strict: bool) -> _registry.Adapter:
    spec = _registry.get_spec(manifest.adapter)
    if spec is None:
        raise CorruptArtifactError(
            f"the artifact was written by the adapter {manifest.adapter!r} ({manifest.framework} "
            f"{manifest.framework_version}), which is not registered here; install the package that provides it")
    if not _registry.installed(spec):
        raise _registry.missing_framework(spec, manifest.framework_version)
    here = _framework_version(spec)
    if here is not None and manifest.framework_version not in (here, "unknown"):
        message = (f"the artifact was saved with {spec.package} {manifest.framework_version} and is loaded with "
                   f"{here}; results may differ. To match: pip install '{spec.package}=="
                   f"{manifest.framework_version}'")
        if strict:
            raise VersionMismatchError(message)
        warnings.warn(message, VersionMismatchWarning, stacklevel=3)
    adapter = _registry.get_adapter(manifest.adapter)
    written = manifest.info.get("adapter_format_version", 1)
    if type(written) is not int or written > adapter.format_version:
        raise CorruptArtifactError(f"the {manifest.adapter} payload has format version {written!r}, newer than "
                                   f"this mlpersist reads ({adapter.format_version}); upgrade mlpersist")
    return adapter


def _bare_manifest(path: Path) -> tuple[Manifest, BinaryIO]:
    """Describe a bare model file as an artifact of one payload file, opened once."""
    name, fmt, payload_name = sniff(path)
    spec = _registry.get_spec(name)
    assert spec is not None
    f = open(path, "rb")  # noqa: SIM115 - handed to the caller, closed there
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CorruptArtifactError(f"{path} is not a regular file")
        entry = FileEntry(st.st_size, _storage.hash_fd(f.fileno(), st.st_size))
        manifest = Manifest(FORMAT_VERSION, name, fmt, "unknown:unknown", spec.package, "unknown",
                            {payload_name: entry}, {}, _now(), _version("mlpersist") or "unknown",
                            {"source": str(path)}, {"bare": True})
    except BaseException:
        f.close()
        raise
    return Manifest.from_json(manifest.to_json()), f


def _load_bare(path: Path, policy: TrustPolicy, *, digest: str | None, signed_required: bool,
               **options: Any) -> Any:
    if signed_required:
        raise SignatureError(str(path), "an artifact signed by a configured key",
                             "a bare file, which carries no signature (wrap it in an artifact and sign that)")
    manifest, f = _bare_manifest(path)
    try:
        (payload_name,) = manifest.files
        if digest is not None and manifest.files[payload_name].digest != digest:
            raise IntegrityError(str(path), f"pinned digest {digest}", manifest.files[payload_name].digest)
        adapter = _adapter_for(manifest, strict=False)
        return adapter.load(Payload({payload_name: f}, policy), manifest.info, format=manifest.format, **options)
    finally:
        f.close()


def _local(path: str | os.PathLike[str]) -> Path:
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text or "::" in text:
        raise PersistError(f"{text}: remote stores (fsspec URLs) are not supported yet; use a local path")
    if not text:
        raise PersistError("path is empty")
    return Path(os.path.abspath(text))


def _environment(name: str, adapter: Any, spec: _registry.AdapterSpec) -> Mapping[str, Any]:
    if name not in _ENV_CACHE:
        import platform

        deps = getattr(adapter, "dependencies", ())
        packages = {d: v for d in deps if (v := _version(d)) is not None}
        if (framework := _framework_version(spec)) is not None:
            packages[spec.package] = framework
        _ENV_CACHE[name] = {
            "python": platform.python_version(),
            "implementation": sys.implementation.name,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "packages": packages,
        }
    return _ENV_CACHE[name]


def _framework_version(spec: _registry.AdapterSpec) -> str | None:
    """The installed version of the adapter's framework, under any of its distribution names."""
    for dist in (spec.package, *spec.alt_packages):
        if (v := _version(dist)) is not None:
            return v
    return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

