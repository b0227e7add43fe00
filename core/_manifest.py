"""The manifest: parse once, validate everything, before any payload is touched."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ._digest import HEX_LENGTHS
from ._record import Record
from ._strictjson import MAX_BYTES, parse_json
from .errors import CorruptArtifactError

# Bump runbook: add a reader for the old version next to _from_v1 (keep it, with a test on a
# file of that version), change FORMAT_VERSION, document the change in docs/format.md.
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
MAX_MANIFEST_BYTES = MAX_BYTES  # the bound parse_json enforces
MAX_FILES = 10_000
MAX_FILE_SIZE = 1 << 50  # 1 PiB: anything larger is a hostile or broken manifest
REQUIRED = ("format_version", "adapter", "format", "class", "framework", "files", "environment",
            "created_at", "mlpersist_version")


class FileEntry(Record):
    """Size in bytes and `"<algorithm>:<hex>"` digest of one payload file."""

    size: int
    digest: str

    def __init__(self, size: int, digest: str) -> None:
        self._init(size=size, digest=digest)


_EMPTY: Mapping[str, Any] = MappingProxyType({})


class Manifest(Record):
    """The parsed, validated `manifest.json` of an artifact."""

    _unequal = ("raw",)
    format_version: int
    adapter: str
    format: str
    model_class: str
    framework: str
    framework_version: str
    files: Mapping[str, FileEntry]
    environment: Mapping[str, Any]
    created_at: str
    mlpersist_version: str
    metadata: Any
    info: Mapping[str, Any]
    raw: bytes  # the exact bytes parsed (what `digest` hashes)
    example: Mapping[str, Any] | None  # the stored example input and outputs (save_any(example=...))
    parts: Mapping[str, Part]  # a bundle's entries (adapter "bundle")

    # positional, in field order, as the dataclass this replaced was called
    def __init__(  # noqa: PLR0917
        self, format_version: int, adapter: str, format: str, model_class: str, framework: str,
        framework_version: str, files: Mapping[str, FileEntry], environment: Mapping[str, Any],
        created_at: str, mlpersist_version: str, metadata: Any = None, info: Mapping[str, Any] = _EMPTY,
        raw: bytes = b"", example: Mapping[str, Any] | None = None,
        parts: Mapping[str, Part] = _EMPTY) -> None:
        self._init(format_version=format_version, adapter=adapter, format=format, model_class=model_class,
                   framework=framework, framework_version=framework_version, files=files, environment=environment,
                   created_at=created_at, mlpersist_version=mlpersist_version, metadata=metadata, info=info,
                   raw=raw, example=example, parts=parts)

    @property
    def digest(self) -> str:
        """The digest of the manifest's exact bytes: pin it with `load_any(path, digest=...)`."""
        import hashlib  # here, not at import: OpenSSL's loading is a few ms of `import mlpersist`

        return "sha256:" + hashlib.sha256(self.raw).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON document this manifest is written as."""
        return {
            "format_version": self.format_version,
            "adapter": self.adapter,
            "format": self.format,
            "class": self.model_class,
            "framework": {"name": self.framework, "version": self.framework_version},
            "files": {n: {"size": e.size, "digest": e.digest} for n, e in sorted(self.files.items())},
            "environment": dict(self.environment),
            "created_at": self.created_at,
            "mlpersist_version": self.mlpersist_version,
            "metadata": self.metadata,
            "info": dict(self.info),
            **({"example": self.example} if self.example is not None else {}),
            **({"parts": {k: p.to_dict() for k, p in self.parts.items()}} if self.adapter == BUNDLE else {}),
        }

    def to_json(self) -> bytes:
        """Serialise canonically: sorted keys, ASCII, no NaN."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False)
                + "\n").encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and validate manifest bytes.

        Raises:
            mlpersist.errors.CorruptArtifactError: naming the first bad field.

        """
        doc = parse_json(raw, MANIFEST_NAME)
        if not isinstance(doc, dict):
            raise _bad("the top level", "a JSON object", type(doc).__name__)
        missing = [k for k in REQUIRED if k not in doc]
        if missing:
            raise CorruptArtifactError(f"{MANIFEST_NAME}: missing field(s) {', '.join(missing)}; "
                                       "the artifact is incomplete or not an mlpersist artifact")
        version = doc["format_version"]
        if type(version) is not int:
            raise _bad("format_version", "an integer", repr(version))
        if version not in SUPPORTED_VERSIONS:
            raise CorruptArtifactError(
                f"{MANIFEST_NAME}: format_version {version} is not one this mlpersist reads "
                f"({', '.join(map(str, sorted(SUPPORTED_VERSIONS)))}); "
                + ("upgrade mlpersist" if version > FORMAT_VERSION else "the file is damaged"))
        return _from_v1(doc, raw)


def _from_v1(doc: dict[str, Any], raw: bytes) -> Manifest:
    fw = doc["framework"]
    if not isinstance(fw, dict) or not isinstance(fw.get("name"), str) or not isinstance(fw.get("version"), str):
        raise _bad("framework", '{"name": str, "version": str}', repr(fw)[:80])
    for key in ("adapter", "format", "class", "created_at", "mlpersist_version"):
        if not isinstance(doc[key], str) or not doc[key]:
            raise _bad(key, "a non-empty string", repr(doc[key])[:80])
    if not _is_identifier(doc["adapter"]):
        raise _bad("adapter", "an adapter name (letters, digits, _ and -)", repr(doc["adapter"])[:80])
    for key in ("environment", "info"):
        if not isinstance(doc.get(key, {}), dict):
            raise _bad(key, "a JSON object", type(doc[key]).__name__)
    files = parse_files(doc["files"])
    part = _part(doc, "", files, "")
    return Manifest(
        format_version=doc["format_version"], adapter=doc["adapter"], format=doc["format"],
        model_class=doc["class"], framework=fw["name"], framework_version=fw["version"],
        files=files, environment=MappingProxyType(doc["environment"]),
        created_at=doc["created_at"], mlpersist_version=doc["mlpersist_version"],
        metadata=doc.get("metadata"), info=part.info, raw=raw, example=part.example, parts=part.parts)


class Part(Record):
    """One entry of a bundle: a model its adapter saved under `dir`, a nested bundle, or a JSON value.

    `adapter` is "bundle" for a nested bundle and "json" for a value kept in the manifest itself.
    """

    adapter: str
    dir: str
    format: str
    model_class: str
    framework: str
    framework_version: str
    info: Mapping[str, Any]
    example: Mapping[str, Any] | None
    parts: Mapping[str, Part]
    value: Any

    # positional, in field order, as the dataclass this replaced was called
    def __init__(  # noqa: PLR0917
        self, adapter: str, dir: str = "", format: str = "", model_class: str = "", framework: str = "",
        framework_version: str = "", info: Mapping[str, Any] = _EMPTY,
        example: Mapping[str, Any] | None = None, parts: Mapping[str, Part] = _EMPTY,
        value: Any = None) -> None:
        self._init(adapter=adapter, dir=dir, format=format, model_class=model_class, framework=framework,
                   framework_version=framework_version, info=info, example=example, parts=parts, value=value)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object this part is written as."""
        if self.adapter == JSON_PART:
            return {"value": self.value}
        out: dict[str, Any] = {"dir": self.dir, "adapter": self.adapter, "format": self.format,
                               "class": self.model_class, "info": dict(self.info),
                               "framework": {"name": self.framework, "version": self.framework_version}}
        if self.example is not None:
            out["example"] = self.example
        if self.adapter == BUNDLE:
            out["parts"] = {k: p.to_dict() for k, p in self.parts.items()}
        return out


BUNDLE = "bundle"  # the core's own adapter name for a mapping of parts
JSON_PART = "json"
MAX_PARTS = 1_000
MAX_DEPTH = 16


def _part(doc: dict[str, Any], where: str, files: Mapping[str, FileEntry], prefix: str, depth: int = 0) -> Part:
    """Validate what a manifest (or one bundle part) says beyond the top-level fields."""
    info = doc.get("info", {})
    if not isinstance(info, dict):
        raise _bad(f"{where}info", "a JSON object", type(info).__name__)
    example = doc.get("example")
    if example is not None:
        _check_example(example, f"{where}example", files, prefix)
    parts: dict[str, Part] = {}
    if doc["adapter"] == BUNDLE:
        raw_parts = doc.get("parts")
        if not isinstance(raw_parts, dict) or len(raw_parts) > MAX_PARTS or depth >= MAX_DEPTH:
            raise _bad(f"{where}parts", f"a JSON object of at most {MAX_PARTS} parts, nested at most "
                       f"{MAX_DEPTH} deep", repr(raw_parts)[:80])
        for key, sub in raw_parts.items():
            parts[key] = _sub_part(sub, f"{where}parts[{key!r}].", files, prefix, depth)
        dirs = [p.dir for p in parts.values() if p.dir]
        if len(set(dirs)) != len(dirs):
            raise _bad(f"{where}parts", "parts in distinct directories", "two parts sharing one")
        stray = [n for n in files if n.startswith(prefix) and not any(n.startswith(d + "/") for d in dirs)]
        if stray:
            raise _bad(f"{where}parts", "every file inside one part's directory", f"{stray[0]!r} in none")
    return Part(doc["adapter"], info=MappingProxyType(info), example=example, parts=MappingProxyType(parts))


def _sub_part(sub: Any, where: str, files: Mapping[str, FileEntry], prefix: str, depth: int) -> Part:
    if isinstance(sub, dict) and set(sub) == {"value"}:
        return Part(JSON_PART, value=sub["value"])
    keys = {"dir", "adapter", "format", "class", "framework", "info"}
    if not isinstance(sub, dict) or not keys <= set(sub):
        raise _bad(where.rstrip("."), f"{{'value': ...}} or an object with {', '.join(sorted(keys))}",
                   repr(sub)[:80])
    for key in ("dir", "adapter", "format", "class"):
        if not isinstance(sub[key], str) or not sub[key]:
            raise _bad(f"{where}{key}", "a non-empty string", repr(sub[key])[:80])
    if not _is_identifier(sub["adapter"]):
        raise _bad(f"{where}adapter", "an adapter name", repr(sub["adapter"])[:80])
    fw = sub["framework"]
    if not isinstance(fw, dict) or not isinstance(fw.get("name"), str) or not isinstance(fw.get("version"), str):
        raise _bad(f"{where}framework", '{"name": str, "version": str}', repr(fw)[:80])
    check_name(sub["dir"])
    if not sub["dir"].startswith(prefix) or "/" in sub["dir"][len(prefix):]:
        raise _bad(f"{where}dir", f"one directory directly under {prefix or 'the artifact'}", repr(sub["dir"]))
    inner = _part(sub, where, files, sub["dir"] + "/", depth + 1)
    return Part(sub["adapter"], sub["dir"], sub["format"], sub["class"], fw["name"], fw["version"], inner.info,
                inner.example, inner.parts)


def _check_example(example: Any, where: str, files: Mapping[str, FileEntry], prefix: str) -> None:
    """An example names its stored input files and one output file per method, all listed in `files`."""
    ok = isinstance(example, dict) and isinstance(example.get("inputs"), list) \
        and isinstance(example.get("outputs"), dict) and example["outputs"]
    if not ok:
        raise _bad(where, '{"inputs": [...], "outputs": {name: file}}', repr(example)[:80])
    named = [c.get("file") for i in example["inputs"] if isinstance(i, dict)
             for c in ([i] if "file" in i else i.get("columns", []) if isinstance(i.get("columns"), list) else [])
             if isinstance(c, dict)]
    if len(named) < len(example["inputs"]):
        raise _bad(f"{where}.inputs", "objects naming their files", repr(example["inputs"])[:80])
    for name in [*named, *example["outputs"].values()]:
        if not isinstance(name, str) or prefix + name not in files:
            raise _bad(where, "files listed in the manifest", repr(name)[:80])


def parse_files(files: Any) -> Mapping[str, FileEntry]:
    """Validate the `files` map: canonical names, integer sizes, known digests."""
    if not isinstance(files, dict):
        raise _bad("files", "a JSON object", type(files).__name__)
    if len(files) > MAX_FILES:
        raise _bad("files", f"at most {MAX_FILES} entries", str(len(files)))
    out: dict[str, FileEntry] = {}
    folded: dict[str, str] = {}
    for name, entry in files.items():
        check_name(name)
        key = name.casefold()
        if key in folded:
            raise _bad(f"files[{name!r}]", "names distinct without regard to case", f"also {folded[key]!r}")
        folded[key] = name
        if not isinstance(entry, dict):
            raise _bad(f"files[{name!r}]", '{"size": int, "digest": str}', repr(entry)[:80])
        size, digest = entry.get("size"), entry.get("digest")
        if type(size) is not int or not 0 <= size <= MAX_FILE_SIZE:
            raise _bad(f"files[{name!r}].size", f"an integer from 0 to {MAX_FILE_SIZE}", repr(size)[:40])
        check_digest(digest, f"files[{name!r}].digest")
        out[name] = FileEntry(size, str(digest))
    return MappingProxyType(out)


def check_name(name: Any) -> None:
    """Refuse any file name that is not a canonical relative POSIX path inside the artifact."""
    ok = isinstance(name, str) and 0 < len(name) <= 1024 and "\\" not in name and ":" not in name
    if ok:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            ok = False
    if ok:
        parts = name.split("/")
        ok = (all(p not in ("", ".", "..") for p in parts) and name == unicodedata.normalize("NFC", name)
              and not any(ord(c) < 32 or ord(c) == 127 for c in name) and name not in RESERVED_NAMES)
    if not ok:
        raise CorruptArtifactError(
            f"{MANIFEST_NAME}: file name {name!r} is not a relative path inside the artifact "
            "(absolute, '..', '.', empty part, backslash, ':', control character or reserved name); "
            "refusing to open anything from this artifact")


def check_digest(digest: Any, where: str) -> None:
    """Refuse a digest that is not `<known algorithm>:<lower-case hex of the right length>`."""
    algo, _, hexpart = digest.partition(":") if isinstance(digest, str) else ("", "", "")
    if (HEX_LENGTHS.get(algo) != len(hexpart)
            or any(c not in "0123456789abcdef" for c in hexpart)):
        raise _bad(where, f"one of {', '.join(a + ':<hex>' for a in HEX_LENGTHS)}", repr(digest)[:80])


def _is_identifier(s: str) -> bool:
    return len(s) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in s)


def _bad(where: str, expected: str, found: str) -> CorruptArtifactError:
    return CorruptArtifactError(f"{MANIFEST_NAME}: {where} should be {expected}, found {found}; "
                                "the artifact is damaged or was not written by mlpersist")
