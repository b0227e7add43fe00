"""`mlpersist` command line: look into a model artifact without writing Python or importing its framework."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _api, _convert, _dispatch, _parts, _registry, _safepickle, _signing
from ._manifest import JSON_PART, Part
from .errors import IntegrityError, PersistError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 check failed, 2 usage or error)."""
    parser = argparse.ArgumentParser(prog="mlpersist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise an artifact's manifest (imports no framework)")
    p.add_argument("path", help=_PATH)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _storage_options(p)
    p = sub.add_parser("verify", help="check every file's size and digest; exit 1 if one differs")
    p.add_argument("path", help=_PATH)
    _storage_options(p)
    sub.add_parser("adapters", help="list adapters and whether their framework is installed")
    p = sub.add_parser("scan", help="list every global a pickle-based file would import, and whether the "
                                    "default policy allows it, without loading it; exit 1 if any is refused")
    p.add_argument("path", help="an artifact directory or a bare joblib/pickle file")
    p = sub.add_parser("keygen", help="create an Ed25519 key pair: KEY (private, mode 0600) and KEY.pub")
    p.add_argument("key", type=Path)
    p = sub.add_parser("sign", help="sign an artifact's manifest (writes manifest.sig)")
    p.add_argument("path", type=Path)
    p.add_argument("--key", required=True, type=Path, help="the private key made by `mlpersist keygen`")
    p = sub.add_parser("check", help="load the model and rerun the example stored at save (save_any(example=...)); "
                                     "exit 1 if an output differs beyond the tolerance")
    p.add_argument("path", help=_PATH)
    p.add_argument("--tolerance", type=float, default=None, help="largest difference allowed, relative to "
                   "max(1, |stored value|) (default 1e-5; 0 for bit for bit)")
    _trust_options(p)
    _storage_options(p)
    p = sub.add_parser("cache", help="show the download cache of remote artifacts (where, how full); --clear "
                                     "empties it")
    p.add_argument("--clear", action="store_true", help="remove every cached file (loads download them again)")
    p = sub.add_parser("requirements", help="print pinned requirement lines (pip install -r) for the environment "
                                            "that saved the model")
    p.add_argument("path", help=_PATH)
    _storage_options(p)
    p = sub.add_parser("convert", help="wrap a model file saved without mlpersist (joblib, pickle, .keras, .h5, "
                                       "SavedModel, .pt, safetensors, XGBoost, ...) into an artifact, after loading "
                                       "it once under the trust rules")
    p.add_argument("src")
    p.add_argument("dst", help=_PATH)
    p.add_argument("--overwrite", action="store_true", help="replace an artifact at DST")
    _trust_options(p)
    _storage_options(p)
    args = parser.parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args))
    except IntegrityError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except PersistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


_PATH = "an artifact directory, a model file, or an fsspec URL (s3://bucket/prefix, ...)"


def _storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE", dest="storage",
                   help="an fsspec option for a URL, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable; VALUE is "
                        "JSON if it parses as JSON); credentials come best from the environment (AWS_* ...)")


def _options(args: argparse.Namespace) -> dict[str, object] | None:
    """`-o key=value` pairs as storage_options (None when none were given)."""
    options: dict[str, object] = {}
    for item in args.storage:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PersistError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options or None


def _trust_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow", action="append", default=[], metavar="MODULE.NAME",
                   help="a global a pickle may import beyond the allow-list (repeatable)")
    p.add_argument("--trusted", action="store_true", help="lift the allow-list: only for files you trust")


def _inspect(args: argparse.Namespace) -> int:
    m = _api.inspect(args.path, storage_options=_options(args))
    if args.json:
        print(json.dumps({**m.to_dict(), "manifest_digest": m.digest}, indent=2, sort_keys=True))
        return 0
    total = sum(e.size for e in m.files.values())
    lines = [
        f"artifact      {args.path}",
        f"model         {m.model_class}",
        f"adapter       {m.adapter} (format {m.format})",
        f"framework     {m.framework} {m.framework_version}",
        f"saved         {m.created_at} with mlpersist {m.mlpersist_version}, python "
        f"{m.environment.get('python', '?')} on {m.environment.get('platform', '?')}",
        f"manifest      {m.digest}   (pin it: load_any(path, digest=...))",
        f"files         {len(m.files)}, {total} bytes",
    ]
    lines += [f"  {name}  {e.size} bytes  {e.digest}" for name, e in sorted(m.files.items())]
    for key, value in sorted(m.info.items()):
        text = json.dumps(value)
        lines.append(f"info.{key:<9} {text if len(text) < 100 else text[:97] + '...'}")
    if m.metadata is not None:
        lines.append(f"metadata      {json.dumps(m.metadata)[:200]}")
    if m.example is not None:
        lines.append(f"example       outputs {', '.join(m.example['outputs'])}: `mlpersist check` reruns them")
    if m.parts:
        lines.append("parts")
        lines += _part_lines(_parts.part_of(m), "  ")
    print("\n".join(lines))
    return 0


def _part_lines(part: Part, indent: str) -> list[str]:
    lines = []
    for key, sub in part.parts.items():
        if sub.adapter == JSON_PART:
            text = json.dumps(sub.value)
            lines.append(f"{indent}{key}: JSON {text if len(text) < 80 else text[:77] + '...'}")
            continue
        example = f", example: {', '.join(sub.example['outputs'])}" if sub.example is not None else ""
        lines.append(f"{indent}{key}: {sub.model_class} ({sub.adapter} {sub.format}, {sub.framework} "
                     f"{sub.framework_version}) in {sub.dir}/{example}")
        lines += _part_lines(sub, indent + "  ")
    return lines


def _check(args: argparse.Namespace) -> int:
    _, report, tolerance = _api.load_with_report(args.path, trusted=args.trusted, allow=args.allow,
                                                 check=True if args.tolerance is None else args.tolerance,
                                                 storage_options=_options(args))
    if not report:
        print(f"error: {args.path} was saved without example= (nothing to rerun); re-save it with "
              "save_any(model, path, example=X_small)", file=sys.stderr)
        return 2
    for diff in report:
        print(diff)
    bad = sum(not d.ok for d in report)
    print(f"{len(report) - bad} of {len(report)} output(s) within tolerance {tolerance:g}"
          + ("" if not bad else ": this environment answers differently; `mlpersist requirements PATH` prints "
             "the one that saved it"))
    return 1 if bad else 0


def _requirements(args: argparse.Namespace) -> int:
    print(_convert.requirements(_api.inspect(args.path, storage_options=_options(args)), args.path), end="")
    return 0


def _convert_cmd(args: argparse.Namespace) -> int:
    m = _convert.convert(args.src, args.dst, trusted=args.trusted, allow=args.allow, overwrite=args.overwrite,
                         storage_options=_options(args))
    print(f"converted {args.src} -> {args.dst}: {m.model_class} ({m.adapter} {m.format}), manifest {m.digest}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    _api.verify(args.path, storage_options=_options(args))
    print(f"OK: every file of {args.path} matches its manifest")
    return 0


def _adapters(args: argparse.Namespace) -> int:
    rows = [("adapter", "framework", "installed", "formats")]
    rows += [(a.name, a.framework, "yes" if a.installed else "no", ", ".join(a.formats) or "-")
             for a in _registry.list_adapters()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _scan(args: argparse.Namespace) -> int:
    root = Path(args.path)
    files = [root] if root.is_file() else [root / n for n in sorted(_api.inspect(root).files)]
    refused, floor = 0, set[str]()
    for f in files:
        try:
            _dispatch.sniff(f)
        except PersistError:
            print(f"{f}: not pickle-based, nothing to scan")
            continue
        with open(f, "rb") as handle:
            found = _safepickle.audit(handle, what=str(f), floor=floor)
        print(f"{f}: {len(found)} global(s)")
        for name, allowed in found:
            note = "  (deny-floor: no allow= admits it)" if name in floor else ""
            print(f"  {'allowed' if allowed else 'REFUSED'}  {name}{note}")
            refused += not allowed
    advice = ("" if not refused else ": only trusted=True loads it, and only if you trust the author" if floor
              else ": load with allow=[...] only if you trust the author")
    print(f"{refused} refused global(s){advice}")
    return 1 if refused else 0


def _keygen(args: argparse.Namespace) -> int:
    public = _signing.keygen(args.key)
    print(f"private key: {args.key} (keep it secret)\npublic key:  {public} (give it to whoever loads your models)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    _api.verify(args.path)  # never sign an artifact that does not match its own manifest
    _signing.sign(args.path, args.key)
    print(f"signed {args.path}: {args.path / 'manifest.sig'}")
    return 0


def _cache_cmd(args: argparse.Namespace) -> int:
    from . import _cache

    cache = _cache.Cache()
    if args.clear:
        cache.evict(limit=0)
    sizes = cache.usage()
    print(f"cache         {cache.root}  (MLPERSIST_CACHE_DIR)\n"
          f"holds         {len(sizes)} file(s), {sum(sizes)} bytes, of at most {_cache.max_bytes()} "
          "(MLPERSIST_CACHE_MAX_BYTES)")
    return 0


_COMMANDS = {"inspect": _inspect, "verify": _verify, "adapters": _adapters, "scan": _scan, "keygen": _keygen,
             "sign": _sign, "check": _check, "requirements": _requirements, "convert": _convert_cmd,
             "cache": _cache_cmd}
