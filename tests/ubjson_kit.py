"""An independent UBJSON encoder, and what comparing a parsed document with the one encoded needs."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

from mlp_testkit import require

INT_MARKERS = [(b"U", ">B", 0, 255), (b"i", ">b", -128, 127), (b"I", ">h", -(2**15), 2**15 - 1),
                (b"l", ">i", -(2**31), 2**31 - 1), (b"L", ">q", -(2**63), 2**63 - 1)]
ARRAY_MARKERS = {"uint8": b"U", "int8": b"i", "int16": b"I", "int32": b"l", "int64": b"L", "float32": b"d",
                  "float64": b"D"}


def _length(n: int, wide: str) -> bytes:
    """A length as XGBoost writes it ('L': int64), or in one ('U') or two ('I') bytes."""
    if wide == "L":
        return b"L" + struct.pack(">q", n)
    return b"I" + struct.pack(">h", n) if wide == "I" or n > 255 else b"U" + bytes([n])


def encode(v: Any, wide: str, counted: bool = False, noop: bool = False) -> bytes:
    """UBJSON draft 12 as XGBoost writes it, with lengths written as `wide` says; `counted` writes containers
    with a count (`#`) instead of an end marker, `noop` puts a no-op (`N`) before every key and value."""
    np = require("numpy")
    n = b"N" if noop else b""
    if v is None or isinstance(v, bool):
        return n + {None: b"Z", True: b"T", False: b"F"}[v]
    if isinstance(v, int):
        marker, fmt = next((m, f) for m, f, lo, hi in INT_MARKERS if lo <= v <= hi)
        return n + marker + struct.pack(fmt, v)
    if isinstance(v, float):
        return n + b"D" + struct.pack(">d", v)
    if isinstance(v, str):
        data = v.encode()
        return n + b"S" + _length(len(data), wide) + data
    if isinstance(v, np.ndarray):
        big_endian = v.astype(v.dtype.newbyteorder(">")).tobytes()
        return n + b"[$" + ARRAY_MARKERS[v.dtype.name] + b"#" + _length(len(v), wide) + big_endian
    head, tail = (b"#" + _length(len(v), wide), b"") if counted else (b"", None)
    if isinstance(v, list):
        return n + b"[" + head + b"".join(encode(x, wide, counted, noop) for x in v) + (b"]" if tail is None else tail)
    return n + b"{" + head + b"".join(n + _length(len(k.encode()), wide) + k.encode() + encode(x, wide, counted, noop)
                                      for k, x in v.items()) + (b"}" if tail is None else tail)


def same(a: Any, b: Any) -> bool:
    np = require("numpy")
    if isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
                and np.array_equal(a, b, equal_nan=b.dtype.kind == "f"))
    if isinstance(b, dict):
        return isinstance(a, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in b)
    if isinstance(b, list):
        return isinstance(a, list) and len(a) == len(b) and all(map(same, a, b))
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return bool(a == b) or both_nan


def read_arrays(value: Any) -> Any:
    """A lazily parsed document with every typed array read (numpy.asarray), as the XGBoost check does."""
    np = require("numpy")
    from mlpersist._ubjson import TypedArray

    if isinstance(value, TypedArray):
        array = np.asarray(value)
        assert len(value) == len(array)
        return array
    if isinstance(value, dict):
        return {k: read_arrays(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # a list, or the reader's `Rows`
        return [read_arrays(v) for v in value]
    return value
