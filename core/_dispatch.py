"""Decide which adapter handles a model or a bare file, importing nothing to decide."""

from __future__ import annotations

import os
from pathlib import Path

from . import _registry
from .errors import ArtifactNotFoundError, UnsupportedModelError


def detect(model: object) -> str:
    """Return the adapter name claiming the most specific class of `model`.

    Raises:
        mlpersist.errors.UnsupportedModelError: no adapter claims any class in its MRO.

    """
    claims = _registry.claims()
    for cls in type(model).__mro__:  # XGBClassifier meets "xgboost" before sklearn's BaseEstimator
        if (name := claims.get(cls.__module__.partition(".")[0])) is not None:
            return name
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    raise UnsupportedModelError(
        f"no adapter claims {kind}; known adapters: {', '.join(sorted(_registry.specs))}. "
        "Install the one for its framework, or write one (docs/extending.md)")


def sniff(path: Path) -> tuple[str, str, str]:
    """Recognise a bare model file by content: return (adapter, format, payload name).

    Raises:
        mlpersist.errors.ArtifactNotFoundError: no adapter recognises the file.

    """
    with open(path, "rb") as f:
        head = f.read(16)
    _registry.claims()  # reads entry points once
    specs = sorted(_registry.specs.items())
    members = _zip_members(path) if head.startswith(b"PK\x03\x04") else []
    for name, spec in specs:
        for magic, fmt, payload_name in spec.sniff:
            if isinstance(magic, bytes):
                hit = head.startswith(magic)
            elif magic.startswith("zip:"):
                hit = any(m.endswith(magic[4:]) or m == magic[4:].lstrip("/") for m in members)
            else:
                hit = _PROBES[magic.partition(":")[2]](path, head)
            if hit:
                return name, fmt, payload_name
    for name, spec in specs:
        for suffix, fmt, payload_name in spec.suffixes:
            if path.name.lower().endswith(suffix) and head:
                return name, fmt, payload_name
    raise ArtifactNotFoundError(
        f"{path} is a file that no adapter recognises (first bytes {head[:8]!r}) and not an mlpersist "
        "artifact directory; pass the artifact's directory, or a joblib/pickle file")


def _zip_members(path: Path) -> list[str]:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()[:10_000]
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def _is_safetensors(path: Path, head: bytes) -> bool:
    """An 8-byte little-endian header length, then that many bytes of JSON object inside the file."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    import json
    import struct

    (n,) = struct.unpack("<Q", head[:8])
    if n > min(os.path.getsize(path) - 8, 100 * 1024 * 1024):
        return False
    with open(path, "rb") as f:
        f.seek(8)
        try:
            return isinstance(json.loads(f.read(n)), dict)
        except ValueError:
            return False


_PROBES = {"safetensors": _is_safetensors}
