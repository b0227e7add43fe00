"""Decide which adapter handles a model or a bare file, importing nothing to decide."""

from __future__ import annotations

import os
from pathlib import Path

from . import _registry
from .errors import ArtifactNotFoundError, PersistError, UnsupportedModelError


def detect(model: object) -> str:
    """Return the adapter name claiming the most specific class of `model`.

    Raises:
        mlpersist.errors.UnsupportedModelError: no adapter claims any class in its MRO.

    """
    if (name := _registry.claimed(type(model).__module__)) is not None:
        return name  # the model's own class: no other class of its MRO comes before it
    claims = _registry.claims()
    for cls in type(model).__mro__:  # XGBClassifier meets "xgboost" before sklearn's BaseEstimator
        if (name := claims.get(cls.__module__.partition(".")[0])) is not None:
            return name
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    raise UnsupportedModelError(
        f"no adapter claims {kind}; known adapters: {', '.join(sorted(_registry.specs))}. "
        "Install the one for its framework, or write one (docs/extending.md)")


def sniff(path: Path) -> tuple[str, str, str]:
    """Recognise a bare model file (or SavedModel directory) by content: return (adapter, format, payload name).

    Built-in adapters are asked first, importing nothing; then adapters registered without sniff
    rules (entry points, `register_adapter`) whose framework is installed, through the `sniff`
    and `suffixes` attributes of their class.

    Raises:
        mlpersist.errors.ArtifactNotFoundError: no adapter recognises the file.

    """
    if path.is_dir():
        for name, spec in sorted(_registry.specs.items()):
            for magic, fmt, payload_name in spec.sniff:
                if isinstance(magic, str) and magic.startswith("dir:") and (path / magic[4:]).is_file():
                    return name, fmt, payload_name
        raise ArtifactNotFoundError(f"{path} is a directory with no manifest.json, nor a model directory an adapter "
                                    "recognises (such as a TensorFlow SavedModel): not an mlpersist artifact, or its "
                                    "save did not finish; pass the artifact's directory, or a model file")
    with open(path, "rb") as f:
        head = f.read(64)
    _registry.claims()  # reads entry points once
    specs = sorted(_registry.specs.items())
    if (hit := _match(path, head, specs)) is not None:
        return hit
    late = [(name, _declared(name)) for name, spec in specs if not spec.sniff and _registry.installed(spec)]
    if (hit := _match(path, head, late)) is not None:
        return hit
    raise ArtifactNotFoundError(
        f"{path} is a file that no adapter recognises (first bytes {head[:8]!r}) and not an mlpersist "
        "artifact directory; pass the artifact's directory, or a model file of a known framework")


def _declared(name: str) -> _registry.AdapterSpec:
    """An adapter's spec completed with the sniff rules its class declares (imports the adapter)."""
    spec = _registry.specs[name]
    try:
        cls = type(_registry.get_adapter(name))
    except PersistError:
        return spec
    return spec.replace(sniff=tuple(getattr(cls, "sniff", ())), suffixes=tuple(getattr(cls, "suffixes", ())))


def _match(path: Path, head: bytes, specs: list[tuple[str, _registry.AdapterSpec]]) -> tuple[str, str, str] | None:
    members = _zip_members(path) if head.startswith(b"PK\x03\x04") else []
    rules = [(name, rule) for name, spec in specs for rule in spec.sniff]
    # strong rules first (probes, archives, long magics), then 1-2 byte magics that also start other formats
    # (a safetensors header length may begin with 0x78, zlib's first byte)
    rules.sort(key=lambda r: isinstance(r[1][0], bytes) and len(r[1][0]) < 3)
    for name, (magic, fmt, payload_name) in rules:
        if isinstance(magic, bytes):
            hit = head.startswith(magic)
        elif magic.startswith("zip:"):
            hit = any(m.endswith(magic[4:]) or m == magic[4:].lstrip("/") for m in members)
        elif magic.startswith("probe:"):
            hit = _PROBES[magic.partition(":")[2]](path, head)
        else:
            hit = False
        if hit:
            return name, fmt, payload_name
    for name, spec in specs:
        for suffix, fmt, payload_name in spec.suffixes:
            if path.name.lower().endswith(suffix) and head:
                return name, fmt, payload_name
    return None


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
