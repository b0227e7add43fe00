"""Strict JSON in and out: what mlpersist reads from artifacts, and what it lets adapters and users record."""

from __future__ import annotations

import json
from typing import Any

from .errors import CorruptArtifactError, PersistError

MAX_BYTES = 16 * 1024 * 1024  # a manifest or signature larger than this is hostile or broken


def parse_json(raw: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, bounded size and depth."""
    if len(raw) > MAX_BYTES:
        raise CorruptArtifactError(f"{what}: {len(raw)} bytes, more than the {MAX_BYTES} allowed")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeError, huge ints are ValueErrors
        raise CorruptArtifactError(f"{what} is not valid JSON ({str(exc)[:120]}); "
                                   "the artifact is damaged: re-save or re-fetch it") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_json_value(value: Any, what: str) -> None:
    """Refuse metadata that would not survive a JSON round trip."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PersistError(f"{what} must be JSON-serialisable (dict, list, str, int, finite float, bool, None): "
                           f"{exc}") from None
    if json.loads(text) != value:
        raise PersistError(f"{what} does not survive a JSON round trip (tuple or non-str key?): "
                           "pass lists and str keys")
