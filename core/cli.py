"""`mlpersist` command line: look into a model artifact without writing Python or importing its framework."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _api, _dispatch, _registry, _safepickle, _signing
from .errors import IntegrityError, PersistError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 check failed, 2 usage or error)."""
    parser = argparse.ArgumentParser(prog="mlpersist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise an artifact's manifest (imports no framework)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p = sub.add_parser("verify", help="check every file's size and digest; exit 1 if one differs")
    p.add_argument("path")
    sub.add_parser("adapters", help="list adapters and whether their framework is installed")
    p = sub.add_parser("scan", help="list every global a pickle-based file would import, and whether the "
                                    "default policy allows it, without loading it; exit 1 if any is refused")
    p.add_argument("path", help="an artifact directory or a bare joblib/pickle file")
    p = sub.add_parser("keygen", help="create an Ed25519 key pair: KEY (private, mode 0600) and KEY.pub")
    p.add_argument("key", type=Path)
    p = sub.add_parser("sign", help="sign an artifact's manifest (writes manifest.sig)")
    p.add_argument("path", type=Path)
    p.add_argument("--key", required=True, type=Path, help="the private key made by `mlpersist keygen`")
    args = parser.parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args))
    except IntegrityError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except PersistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _inspect(args: argparse.Namespace) -> int:
    m = _api.inspect(args.path)
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
    print("\n".join(lines))
    return 0


def _verify(args: argparse.Namespace) -> int:
    _api.verify(args.path)
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
    refused = 0
    for f in files:
        try:
            _dispatch.sniff(f)
        except PersistError:
            print(f"{f}: not pickle-based, nothing to scan")
            continue
        with open(f, "rb") as handle:
            found = _safepickle.audit(handle, what=str(f))
        print(f"{f}: {len(found)} global(s)")
        for name, allowed in found:
            print(f"  {'allowed' if allowed else 'REFUSED'}  {name}")
            refused += not allowed
    print(f"{refused} refused global(s)" + (": load with allow=[...] only if you trust the author" if refused else ""))
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


_COMMANDS = {"inspect": _inspect, "verify": _verify, "adapters": _adapters, "scan": _scan, "keygen": _keygen,
             "sign": _sign}
