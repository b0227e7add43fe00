"""Wrap a model saved without mlpersist into a full artifact; print the environment an artifact needs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import _environment, _location, _parts, _registry
from ._api import write_artifact
from ._dispatch import sniff
from ._manifest import MANIFEST_NAME, Manifest, Part
from ._payload import Payload
from ._policy import TrustPolicy
from .errors import PersistError


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, trusted: bool = False,
            allow: Iterable[str] = (), overwrite: bool = False, metadata: Any = None,
            storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Copy the bare model `src` (a local file) verbatim into a new artifact at `dst`, after loading the copy once.

    The copy is loaded under the same trust rules as `load_any(src, trusted=..., allow=...)`: a file
    that would be refused there is refused here, and nothing is written at `dst`. The manifest records
    the class that loaded, and the framework and environment of this machine, which loaded it.

    Raises:
        mlpersist.errors.PersistError: `src` is already an artifact, or any error `load_any` would raise.

    """
    source, where = _location.local(src, "convert's source"), _location.where(dst, storage_options)
    if source.is_dir() and (source / MANIFEST_NAME).exists():
        raise PersistError(f"{source} is already an mlpersist artifact: nothing to convert (`mlpersist verify` "
                           "checks it; save_any(load_any(...)) re-saves it)")
    name, fmt, payload_name = sniff(source)
    spec = _registry.get_spec(name)
    assert spec is not None
    part = Part(name, "", fmt, "unknown:unknown", spec.package, "unknown")
    adapter = _parts.adapter_for(part, strict=False)
    policy = TrustPolicy.of(trusted, allow)

    def fill(dest: Path) -> Part:
        copy = dest / payload_name
        if source.is_dir():
            shutil.copytree(source, copy, symlinks=True)  # a symlink in it is refused when sealed
            model = adapter.load(Payload({}, policy, dirs={payload_name: copy}), {"bare": True}, format=fmt)
        else:
            shutil.copyfile(source, copy)
            with open(copy, "rb") as f:
                model = adapter.load(Payload({payload_name: f}, policy, labels={payload_name: str(source)}),
                                     {"bare": True}, format=fmt)
        cls = type(model)
        info = {"adapter_format_version": adapter.format_version, "bare": True, "converted_from": source.name}
        return Part(name, "", fmt, f"{cls.__module__}:{cls.__qualname__}", spec.package,
                    _environment.framework_version(spec) or "unknown", info)

    if not isinstance(where, Path):
        from . import _upload

        return _upload.save(where, overwrite=overwrite, write_local=lambda root: write_artifact(
            root, overwrite=False, metadata=metadata, fill=fill))
    return write_artifact(where, overwrite=overwrite, metadata=metadata, fill=fill)


def requirements(manifest: Manifest, path: str) -> str:
    """Pinned requirement lines for the environment that saved the artifact, ready for `pip install -r`."""
    env = manifest.environment
    packages = dict(env.get("packages") or {}) if isinstance(env.get("packages"), dict) else {}
    lines = [f"# requirements of {path}, saved {manifest.created_at}",
             f"# python {env.get('python', 'unknown')} ({env.get('implementation', '?')}) on "
             f"{env.get('platform', 'unknown')}"]
    # a bare file records no environment: name its framework, unpinned
    names = set() if packages else {p.framework for p in _parts.walk(_parts.part_of(manifest))} - {"mlpersist", ""}
    for dist in sorted(names, key=str.lower):
        lines.append(f"{dist}  # version unknown: saved without mlpersist")
    for dist, version in sorted(packages.items(), key=lambda kv: kv[0].lower()):
        if isinstance(version, str) and _is_plain(dist) and _is_plain(version):
            public, _, local = version.partition("+")  # 2.13.0+cpu: a local build; ==2.13.0 matches it
            lines.append(f"{dist}=={public}" + (f"  # built as {version}" if local else ""))
    if manifest.mlpersist_version != "unknown" and _is_plain(manifest.mlpersist_version):
        lines.append(f"mlpersist>={manifest.mlpersist_version}")
    return "\n".join(lines) + "\n"


def _is_plain(text: str) -> bool:
    """A distribution name or version that cannot smuggle a pip option or a second line."""
    return 0 < len(text) <= 100 and all(c.isalnum() or c in "._-+!" for c in text)
