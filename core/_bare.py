"""Model files and directories saved without mlpersist: described as one-payload artifacts, then loaded."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from . import _environment, _parts, _registry
from ._checked import hash_file, held_throughout
from ._digest import HEX_LENGTHS, algorithm_of
from ._dispatch import sniff
from ._manifest import FORMAT_VERSION, FileEntry, Manifest, Part
from ._payload import Payload
from ._policy import TrustPolicy
from ._reading import local_reads
from .errors import CorruptArtifactError, IntegrityError, PersistError, SignatureError


def bare_manifest(path: Path, source: str | None = None, pinned: str | None = None,
                   whole: Callable[[str], Mapping[str, str]] | None = None) -> tuple[Manifest, BinaryIO]:
    """Describe a bare model file as an artifact of one payload file, opened once (hashed as `pinned` is).

    `whole(adapter)`: the payload names that adapter keeps whole (`_parts.whole_names`), asked by loads
    only, since it imports the adapter (`inspect` imports no framework).
    """
    algo = algorithm_of(pinned) if pinned else None
    if algo is not None and algo not in HEX_LENGTHS:
        raise PersistError(f"digest={pinned!r}: a bare file's pinned digest is one of "
                           f"{', '.join(a + ':<hex>' for a in sorted(HEX_LENGTHS))}")
    with local_reads(path):
        name, fmt, payload_name = sniff(path)
        f: BinaryIO = open(path, "rb")  # noqa: SIM115 - handed to the caller, closed there
    spec = _registry.get_spec(name)
    assert spec is not None
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CorruptArtifactError(f"{path} is not a regular file")
        # a small file, or one its adapter keeps whole, is then read from the bytes hashed
        with local_reads(path):
            digest, f = hash_file(f, st.st_size, algo, whole=whole(name).get(payload_name) if whole else None)
        entry = FileEntry(st.st_size, digest)
        manifest = Manifest(FORMAT_VERSION, name, fmt, "unknown:unknown", spec.package, "unknown",
                            {payload_name: entry}, {}, _environment.created_at(), _environment.mlpersist_version(),
                            {"source": source or str(path)}, {"bare": True})
    except BaseException:
        f.close()
        raise
    return Manifest.from_json(manifest.to_json()), f


def load_file(path: Path, policy: TrustPolicy, *, digest: str | None, signed_required: bool, mmap: bool,
              **options: Any) -> Any:
    """Load a bare model file under `policy` (a pinned `digest` must match; no signature can)."""
    if signed_required:
        raise SignatureError(str(path), "an artifact signed by a configured key",
                             "a bare file, which carries no signature (wrap it in an artifact and sign that)")
    manifest, f = bare_manifest(path, pinned=digest, whole=None if mmap else _parts.whole_names)
    try:
        (payload_name,) = manifest.files
        if digest is not None and manifest.files[payload_name].digest != digest:
            raise IntegrityError(str(path), f"pinned digest {digest}", manifest.files[payload_name].digest)
        adapter = _parts.adapter_for(_parts.part_of(manifest), strict=False)
        with held_throughout([f]):  # a file read under a lease, opened for writing meanwhile: load again
            return adapter.load(Payload({payload_name: f}, policy, labels={payload_name: str(path)}), manifest.info,
                                format=manifest.format, **options)
    finally:
        f.close()


def load_dir(root: Path, policy: TrustPolicy, *, signed_required: bool, **options: Any) -> Any:
    """A model directory saved without mlpersist (a TensorFlow SavedModel): recognised, then trust rules."""
    name, fmt, payload_name = sniff(root)
    if signed_required:
        raise SignatureError(str(root), "an artifact signed by a configured key",
                             "a bare directory, which carries no signature (wrap it with mlpersist convert and sign)")
    spec = _registry.get_spec(name)
    assert spec is not None
    adapter = _parts.adapter_for(Part(name, "", fmt, "unknown:unknown", spec.package, "unknown"), strict=False)
    return adapter.load(Payload({}, policy, dirs={payload_name: root}), {"bare": True}, format=fmt, **options)
