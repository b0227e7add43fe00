"""Ed25519 signatures over the exact bytes of manifest.json, and caller-pinned manifest digests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ._manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from ._strictjson import parse_json
from .errors import IntegrityError, MissingFrameworkError, PersistError, SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEYS_ENV = "MLPERSIST_PUBLIC_KEYS"  # os.pathsep-separated paths of PEM public keys to require
KeySource = Union[str, bytes, os.PathLike[str], "Ed25519PublicKey"]


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError as exc:
        raise MissingFrameworkError("signatures need the cryptography package; run: pip install "
                                    "'mlpersist[sign]'") from exc
    return serialization, ed25519


def keygen(private_path: Path) -> Path:
    """Write a new Ed25519 private key (mode 0600) and its public key beside it (`.pub`)."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return public_path


def sign(root: Path, private_key: str | os.PathLike[str] | Ed25519PrivateKey) -> None:
    """Sign the artifact's manifest bytes; write manifest.sig atomically."""
    serialization, ed25519 = _crypto()
    key = private_key
    if isinstance(key, (str, os.PathLike)):
        loaded = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        if not isinstance(loaded, ed25519.Ed25519PrivateKey):
            raise PersistError(f"{key} is not an Ed25519 private key (make one with `mlpersist keygen`)")
        key = loaded
    manifest = (root / MANIFEST_NAME).read_bytes()
    Manifest.from_json(manifest)  # never sign something that does not parse
    doc = {"algorithm": "ed25519", "key_id": key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(manifest)).decode("ascii")}
    tmp = root / f".{SIGNATURE_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, sort_keys=True) + "\n")
    os.replace(tmp, root / SIGNATURE_NAME)


def key_id(public: Ed25519PublicKey) -> str:
    """`sha256:<hex>` of the raw public key: names the key in signatures and messages."""
    serialization, _ = _crypto()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load_public_keys(keys: KeySource | Iterable[KeySource] | None) -> list[Ed25519PublicKey]:
    """The caller's keys, else those named by $MLPERSIST_PUBLIC_KEYS, else none."""
    if keys is None:
        env = os.environ.get(KEYS_ENV, "")
        keys = [p for p in env.split(os.pathsep) if p]
        if not keys:
            return []
    if isinstance(keys, (str, bytes, os.PathLike)) or not isinstance(keys, Iterable):
        keys = [keys]
    serialization, ed25519 = _crypto()
    out = []
    for k in keys:
        if isinstance(k, ed25519.Ed25519PublicKey):
            out.append(k)
            continue
        if not isinstance(k, (bytes, str, os.PathLike)):
            raise PersistError(f"public key {k!r} should be a PEM path, PEM bytes or an Ed25519PublicKey")
        loaded = serialization.load_pem_public_key(k if isinstance(k, bytes) else Path(k).read_bytes())
        if not isinstance(loaded, ed25519.Ed25519PublicKey):
            raise PersistError(f"public key {k!r} is not Ed25519")
        out.append(loaded)
    return out


def checker(digest: str | None, keys: list[Ed25519PublicKey]) -> Callable[[Manifest, Callable[[str], bytes]], bool]:
    """Return the check run on the manifest before any payload is opened; it returns True when signed."""

    def check(manifest: Manifest, read: Callable[[str], bytes]) -> bool:
        if digest is not None and manifest.digest != digest:
            raise IntegrityError(MANIFEST_NAME, f"pinned digest {digest}", manifest.digest)
        if not keys:
            return False
        raw = read(SIGNATURE_NAME)
        if not raw:
            raise SignatureError(SIGNATURE_NAME, "a signature by a configured key", "no manifest.sig")
        doc = parse_json(raw, SIGNATURE_NAME)
        sig = doc.get("signature") if isinstance(doc, dict) else None
        try:
            signature = base64.b64decode(sig if isinstance(sig, str) else "", validate=True)
        except ValueError:
            signature = b""
        for key in keys:
            try:
                key.verify(signature, manifest.raw)
                return True
            except Exception:  # cryptography's InvalidSignature; any key may be the signer
                continue
        named = doc.get("key_id") if isinstance(doc, dict) else None
        raise SignatureError(SIGNATURE_NAME, f"a valid signature by one of {', '.join(key_id(k) for k in keys)}",
                             f"no valid signature (signature names key {named})")

    return check
