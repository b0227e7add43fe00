"""A bounded Universal Binary JSON reader, so that payloads can be vetted before a native parser sees them."""

from __future__ import annotations

import struct
from typing import Any

from .errors import CorruptArtifactError

_INTS = {b"i": ">b", b"U": ">B", b"I": ">h", b"l": ">i", b"L": ">q"}
_FLOATS = {b"d": ">f", b"D": ">d"}
_NUMPY = {b"i": ">i1", b"U": "u1", b"I": ">i2", b"l": ">i4", b"L": ">i8", b"d": ">f4", b"D": ">f8"}
MAX_DEPTH = 64


def loads(data: bytes | bytearray | memoryview, what: str) -> Any:
    """Parse UBJSON (draft 12, with optimised containers); typed numeric arrays become numpy arrays.

    Raises:
        mlpersist.errors.CorruptArtifactError: truncated, malformed, too deep, or trailing bytes.

    """
    reader = _Reader(memoryview(data).cast("B"), what)
    value = reader.value(reader.marker(), 0)
    if reader.pos != len(reader.buf):
        raise reader.bad(f"{len(reader.buf) - reader.pos} trailing bytes")
    return value


class _Reader:
    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf, self.pos, self.what = buf, 0, what

    def bad(self, why: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{self.what}: not valid UBJSON at byte {self.pos} ({why}); the file is damaged "
                                    "or crafted")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.bad(f"needs {n} bytes, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def marker(self) -> bytes:
        m = bytes(self.take(1))
        while m == b"N":  # no-op
            m = bytes(self.take(1))
        return m

    def count(self, m: bytes | None = None) -> int:
        m = m or self.marker()
        if m not in _INTS:
            raise self.bad(f"length marker {m!r}")
        (n,) = struct.unpack(_INTS[m], self.take(struct.calcsize(_INTS[m])))
        if n < 0 or n > len(self.buf) - self.pos:  # every element takes at least one byte
            raise self.bad(f"declared length {n} exceeds the data")
        return int(n)

    def value(self, m: bytes, depth: int) -> Any:
        if m in _INTS:
            return struct.unpack(_INTS[m], self.take(struct.calcsize(_INTS[m])))[0]
        if m in _FLOATS:
            return struct.unpack(_FLOATS[m], self.take(struct.calcsize(_FLOATS[m])))[0]
        if m in (b"S", b"H"):
            return self.text()
        if m == b"C":
            return bytes(self.take(1)).decode("latin-1")
        if m in (b"T", b"F", b"Z"):
            return {b"T": True, b"F": False, b"Z": None}[m]
        if m in (b"[", b"{"):
            if depth >= MAX_DEPTH:
                raise self.bad(f"nested deeper than {MAX_DEPTH}")
            return self.container(m == b"{", depth + 1)
        raise self.bad(f"unknown marker {m!r}")

    def text(self, m: bytes | None = None) -> str:
        try:
            return bytes(self.take(self.count(m))).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad("string is not UTF-8") from None

    def container(self, is_object: bool, depth: int) -> Any:
        typ: bytes | None = None
        n: int | None = None
        pending: bytes | None = self.marker()
        if pending == b"$":
            typ = self.marker()
            if self.marker() != b"#":
                raise self.bad("typed container without a count")
            n, pending = self.count(), None
        elif pending == b"#":
            n, pending = self.count(), None
        if typ is not None and not is_object and typ in _NUMPY:
            import numpy as np  # typed numeric arrays: one vectorised read

            assert n is not None
            dtype = np.dtype(_NUMPY[typ])
            return np.frombuffer(self.take(n * dtype.itemsize), dtype=dtype).astype(dtype.newbyteorder("="))
        end = b"}" if is_object else b"]"
        out: Any = {} if is_object else []
        done = 0
        while True:
            m: bytes | None = None
            if n is None:
                m, pending = (pending if pending is not None else self.marker()), None
                if m == end:
                    return out
            elif done == n:
                return out
            if is_object:
                key = self.text(m)  # a key is a length (marker + integer), then UTF-8 bytes
                if key in out:
                    raise self.bad(f"duplicate key {key!r}")
                out[key] = self.value(typ or self.marker(), depth)
            else:
                out.append(self.value(typ or m or self.marker(), depth))
            done += 1
