"""A bounded Universal Binary JSON reader, so that payloads can be vetted before a native parser sees them."""

from __future__ import annotations

import functools
import struct
from typing import Any

from .errors import CorruptArtifactError

# markers as the integers `bytes[i]` gives: no one-byte slices on the hot path
_INTS = {ord(k): (struct.Struct(f), struct.calcsize(f)) for k, f in
         {"i": ">b", "U": ">B", "I": ">h", "l": ">i", "L": ">q"}.items()}
_FLOATS = {ord(k): (struct.Struct(f), struct.calcsize(f)) for k, f in {"d": ">f", "D": ">d"}.items()}
_NUMPY = {ord(k): f for k, f in {"i": ">i1", "U": "u1", "I": ">i2", "l": ">i4", "L": ">i8", "d": ">f4",
                                 "D": ">f8"}.items()}
_CONSTANTS = {ord("T"): True, ord("F"): False, ord("Z"): None}
_N, _S, _H, _C, _ARRAY, _OBJECT, _TYPE, _COUNT = (ord(c) for c in "NSHC[{$#")
_END = {False: ord("]"), True: ord("}")}
MAX_DEPTH = 64


def loads(data: bytes | bytearray | memoryview, what: str, *, lazy: bool = False) -> Any:
    """Parse UBJSON (draft 12, with optimised containers); typed numeric arrays become numpy arrays.

    `lazy`: they become `TypedArray`s instead, whose numpy view is made when one is used (`len()` needs
    none): a 500-tree XGBoost model holds 7,000 arrays, of which its check reads 1,500.

    Raises:
        mlpersist.errors.CorruptArtifactError: truncated, malformed, too deep, or trailing bytes.

    """
    from . import _gc

    with _gc.paused():  # thousands of dicts and arrays, no cycles
        reader = _Reader(bytes(data), what, lazy)
        value = reader.value(reader.marker(), 0)
        if reader.pos != len(reader.buf):
            raise reader.bad(f"{len(reader.buf) - reader.pos} trailing bytes")
        return value


@functools.cache
def _numpy() -> tuple[Any, dict[int, Any]]:
    """The numpy module and the dtype of each typed-array marker: made once, with the first array."""
    import numpy as np

    return np, {m: np.dtype(f) for m, f in _NUMPY.items()}


class TypedArray:
    """`count` numbers of `dtype` at `offset` in `buf`, in the file's byte order; `numpy.asarray` reads them."""

    __slots__ = ("buf", "count", "dtype", "offset")

    def __init__(self, buf: bytes, dtype: Any, count: int, offset: int) -> None:
        self.buf, self.dtype, self.count, self.offset = buf, dtype, count, offset

    def __len__(self) -> int:
        return self.count

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        np = _numpy()[0]
        view = np.frombuffer(self.buf, dtype=self.dtype, count=self.count, offset=self.offset)
        return view if dtype is None else view.astype(dtype)


class _Reader:
    def __init__(self, buf: bytes, what: str, lazy: bool = False) -> None:
        self.buf, self.pos, self.what = buf, 0, what
        self.typed: Any = TypedArray if lazy else None

    def bad(self, why: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{self.what}: not valid UBJSON at byte {self.pos} ({why}); the file is damaged "
                                    "or crafted")

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n < 0 or pos + n > len(self.buf):
            raise self.bad(f"needs {n} bytes, {len(self.buf) - pos} left")
        self.pos = pos + n
        return self.buf[pos:pos + n]

    def marker(self) -> int:
        buf, pos = self.buf, self.pos
        while pos < len(buf) and buf[pos] == _N:  # no-op
            pos += 1
        if pos >= len(buf):
            self.pos = pos
            raise self.bad("needs 1 bytes, 0 left")
        self.pos = pos + 1
        return buf[pos]

    def number(self, fmt: tuple[struct.Struct, int]) -> Any:
        st, size = fmt
        pos = self.pos
        if pos + size > len(self.buf):
            raise self.bad(f"needs {size} bytes, {len(self.buf) - pos} left")
        self.pos = pos + size
        return st.unpack_from(self.buf, pos)[0]

    def count(self, m: int | None = None) -> int:
        m = self.marker() if m is None else m
        fmt = _INTS.get(m)
        if fmt is None:
            raise self.bad(f"length marker {bytes([m])!r}")
        n = self.number(fmt)
        if n < 0 or n > len(self.buf) - self.pos:  # every element takes at least one byte
            raise self.bad(f"declared length {n} exceeds the data")
        return int(n)

    def value(self, m: int, depth: int) -> Any:
        fmt = _INTS.get(m) or _FLOATS.get(m)
        if fmt is not None:
            return self.number(fmt)
        if m in (_S, _H):
            return self.text()
        if m == _C:
            return self.take(1).decode("latin-1")
        if m in _CONSTANTS:
            return _CONSTANTS[m]
        if m in (_ARRAY, _OBJECT):
            if depth >= MAX_DEPTH:
                raise self.bad(f"nested deeper than {MAX_DEPTH}")
            return self.container(m == _OBJECT, depth + 1)
        raise self.bad(f"unknown marker {bytes([m])!r}")

    def text(self, m: int | None = None) -> str:
        try:
            return self.take(self.count(m)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad("string is not UTF-8") from None

    def array(self, typ: int, n: int) -> Any:
        """`n` numbers of type `typ` at the read position, as a numpy view of the buffer (no copy).

        Kept in the file's byte order: numpy compares and converts big-endian arrays as they are.
        """
        np, dtypes = _numpy()
        dtype = dtypes[typ]
        start = self.pos
        if n < 0 or start + n * dtype.itemsize > len(self.buf):
            raise self.bad(f"declared length {n} exceeds the data")
        self.pos = start + n * dtype.itemsize
        if self.typed is not None:
            return self.typed(self.buf, dtype, n, start)
        return np.frombuffer(self.buf, dtype=dtype, count=n, offset=start)

    def container(self, is_object: bool, depth: int) -> Any:
        typ: int | None = None
        n: int | None = None
        pending: int | None = self.marker()
        if pending == _TYPE:
            typ = self.marker()
            if self.marker() != _COUNT:
                raise self.bad("typed container without a count")
            n, pending = self.count(), None
        elif pending == _COUNT:
            n, pending = self.count(), None
        if typ is not None and not is_object and typ in _NUMPY:
            assert n is not None
            return self.array(typ, n)  # typed numeric arrays: one vectorised read
        if is_object and typ is None:
            return self.object(n, pending, depth)
        end = _END[is_object]
        out: Any = {} if is_object else []
        done = 0
        while True:
            m: int | None = None
            if n is None:
                m, pending = (pending if pending is not None else self.marker()), None
                if m == end:
                    return out
            elif done == n:
                return out
            if is_object:  # an object with one value type (XGBoost writes none): untyped ones go to object()
                assert typ is not None
                key = self.text(m)  # a key is a length (marker + integer), then UTF-8 bytes
                if key in out:
                    raise self.bad(f"duplicate key {key!r}")
                out[key] = self.value(typ, depth)
            else:
                out.append(self.value(typ if typ is not None else (m if m is not None else self.marker()), depth))
            done += 1

    def object(self, n: int | None, pending: int | None, depth: int) -> dict[str, Any]:
        """The entries of an object without a value type, its first marker (if any) already read.

        The hot path of an XGBoost model (a 500-tree model is ~10,000 entries, most of them a typed
        numeric array): the key and a typed numeric array value are read here inline, the array as one
        numpy view. Any other value, no-op markers, and every malformed case go through the general
        methods, which raise the error.
        """
        buf, size, typed = self.buf, len(self.buf), self.typed
        dtypes: dict[int, Any] | None = None
        out: dict[str, Any] = {}
        while n is None or len(out) < n:
            pos = self.pos
            if pending is not None:
                m, pending = pending, None
            elif pos < size and buf[pos] != _N:
                m, pos = buf[pos], pos + 1
            else:
                m = self.marker()  # no-ops, or the error
                pos = self.pos
            if n is None and m == _END[True]:
                self.pos = pos
                return out
            fmt = _INTS.get(m)  # the key: a length (marker + integer), then UTF-8 bytes
            start = pos + fmt[1] if fmt is not None else size + 1
            stop = start + fmt[0].unpack_from(buf, pos)[0] if fmt is not None and start <= size else -1
            self.pos = pos
            if not start <= stop <= size:
                key = self.text(m)  # raises what is wrong
            else:
                try:
                    key = buf[start:stop].decode("utf-8")
                except UnicodeDecodeError:
                    raise self.bad("string is not UTF-8") from None
                self.pos = pos = stop
            if key in out:
                raise self.bad(f"duplicate key {key!r}")
            if pos + 5 <= size and buf[pos] == _ARRAY and buf[pos + 1] == _TYPE and depth < MAX_DEPTH:
                if dtypes is None:
                    np, dtypes = _numpy()
                dtype, fmt = dtypes.get(buf[pos + 2]), _INTS.get(buf[pos + 4])
                if dtype is not None and fmt is not None and buf[pos + 3] == _COUNT and pos + 5 + fmt[1] <= size:
                    count = fmt[0].unpack_from(buf, pos + 5)[0]
                    start = pos + 5 + fmt[1]
                    stop = start + count * dtype.itemsize
                    if count < 0 or stop > size:
                        self.pos = start
                        raise self.bad(f"declared length {count} exceeds the data")
                    self.pos = stop
                    out[key] = (typed(buf, dtype, count, start) if typed is not None
                                else np.frombuffer(buf, dtype=dtype, count=count, offset=start))
                    continue
            out[key] = self.value(self.marker(), depth)
        return out
