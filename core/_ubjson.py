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
_INTEGERS, _SLOW = 1 << 16, 32  # see `_Reader.integers`
# an object entry as last read at its place in an object: its bytes from the key's length marker to its value's
# length or number, its key, the dtype of a typed numeric array (else None), the format of that length or number
# (None for an object), its kind (the value's marker: _ARRAY, _OBJECT, _S for a string, or a number's), and the
# length of those bytes
_Entry = tuple[bytes, str, Any, Any, int, int]


def loads(data: bytes | bytearray | memoryview, what: str, *, lazy: bool = False, runs: bool = True) -> Any:
    """Parse UBJSON (draft 12, with optimised containers); typed numeric arrays become numpy arrays.

    `lazy`: they become `TypedArray`s instead, whose numpy view is made when one is used (`len()` needs
    none; `joined` reads many at once): a 500-tree XGBoost model holds 7,000 arrays, of which its check
    reads 1,500. And a list's runs of like objects (the trees) are read as columns: such a list is a
    `_rows.Rows`, whose `values`, `lengths` and `joined` make no object per element (`runs=False`: a
    plain list, each object read the long way; the tests compare the two).

    Raises:
        mlpersist.errors.CorruptArtifactError: truncated, malformed, too deep, or trailing bytes.

    """
    from . import _gc

    with _gc.paused():  # thousands of dicts and arrays, no cycles
        reader = _Reader(bytes(data), what, lazy, runs)
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


def joined(arrays: list[Any]) -> Any:
    """The numpy concatenation of `arrays` (`TypedArray`s, or anything `numpy.asarray` reads).

    Lazy arrays of one dtype in one buffer (the node arrays of a model's trees) are joined as bytes,
    one slice of the buffer each, then read as one array: no numpy view per array.
    """
    np = _numpy()[0]
    if not arrays:
        return np.empty(0)
    first = arrays[0]
    if not all(type(a) is TypedArray and a.buf is first.buf and a.dtype == first.dtype for a in arrays):
        return np.concatenate([np.asarray(a) for a in arrays])
    size = first.dtype.itemsize
    with memoryview(first.buf) as view:
        data = b"".join([view[a.offset:a.offset + a.count * size] for a in arrays])
    return np.frombuffer(data, dtype=first.dtype)


class _Reader:
    def __init__(self, buf: bytes, what: str, lazy: bool = False, runs: bool = True) -> None:
        self.buf, self.pos, self.what = buf, 0, what
        self.typed: Any = TypedArray if lazy else None
        self.runs: Any = None
        self.rows: Any = None
        self.budget = 0  # templates left to try in the whole document
        if lazy and runs:
            from . import _rows, _runs

            self.runs, self.rows, self.budget = _runs, _rows.Rows, _runs.MAX_TEMPLATES
        self.shapes: dict[int, list[_Entry | None]] = {}  # by depth: the entries of the last object read there

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
        done = attempts = ran = slow = 0
        while True:
            m: int | None = None
            if n is None:
                m, pending = (pending if pending is not None else self.marker()), None
                if m == end:
                    return self.rows(out) if ran else out
            elif done == n:
                return self.rows(out) if ran else out
            if is_object:  # an object with one value type (XGBoost writes none): untyped ones go to object()
                assert typ is not None
                key = self.text(m)  # a key is a length (marker + integer), then UTF-8 bytes
                if key in out:
                    raise self.bad(f"duplicate key {key!r}")
                out[key] = self.value(typ, depth)
            else:
                m = typ if typ is not None else (m if m is not None else self.marker())
                if m == _OBJECT and self.plain_object(self.pos, depth):
                    start = self.pos - 1  # its marker, read just now: the first byte of a run's template
                    out.append(self.object(None, None, depth + 1))  # the trees
                    if (self.runs is not None and typ is None and attempts < self.runs.MAX_ATTEMPTS
                            and self.budget > 0 and self.pos < len(self.buf) and self.buf[self.pos] == _OBJECT):
                        attempts, self.budget = attempts + 1, self.budget - 1
                        run = self.run(start, None if n is None else n - done - 1)
                        if run is not None:
                            out.append(run)
                            done, ran = done + len(run), ran + 1
                elif m in _INTS and typ is None and self.runs is not None and not slow:
                    got = self.integers(m, None if n is None else n - done)
                    out += got
                    done += len(got) - 1
                    slow = _SLOW if len(got) < _SLOW else 0  # a short run: the next ones the long way
                else:
                    out.append(self.value(m, depth))
                    slow -= slow > 0
            done += 1

    def integers(self, m: int, left: int | None) -> list[int]:
        """The integer whose marker `m` was just read, and those after it with the same marker: at least one.

        An untyped list of integers (a 500-tree XGBoost model's `tree_info` and `iteration_indptr`, 0.3 ms
        the long way) is read a run of like integers at a time, in a few numpy calls, instead of one `value`
        call each. At most `left` (the list's count) and `_INTEGERS` at once; a first one cut short is read
        the long way, which raises the error. The markers are compared a window at a time, each window four
        times the last, and a run shorter than `_SLOW` makes the caller read the next `_SLOW` the long way:
        a crafted list of alternating widths reads in under twice its long-way time (300,000: 185 ms
        against 99). `tests/adapters/test_xgboost_runs.py` compares both ways on lists of mixed widths.
        """
        np, dtypes = _numpy()
        buf, start = self.buf, self.pos - 1
        dtype = dtypes[m]
        entry = np.dtype([("m", "u1"), ("v", dtype)])
        most = min((len(buf) - start) // entry.itemsize, _INTEGERS if left is None else min(left, _INTEGERS))
        if most < 1:
            return [self.value(m, 0)]  # cut short: the long way raises what is wrong (a number has no depth)
        k, window = 0, _SLOW  # compared a window at a time, each 4 times the last: the cost follows what is read
        while k < most:
            count = min(most - k, window)
            same = np.frombuffer(buf, dtype=entry, count=count, offset=start + k * entry.itemsize)["m"] == m
            if not same.all():
                k += int(np.argmin(same))
                break
            k, window = k + count, window * 4
        self.pos = start + k * entry.itemsize
        values: list[int] = np.frombuffer(buf, dtype=entry, count=k, offset=start)["v"].tolist()
        return values

    def run(self, start: int, limit: int | None) -> Any:
        """The siblings after the object at `start` that match it as a template (`_runs`), or None."""
        assert self.runs is not None
        run, self.pos = self.runs.read_after(self.buf, start, self.pos, limit)
        return run

    def object(self, n: int | None, pending: int | None, depth: int) -> dict[str, Any]:
        """The entries of an object without a value type, its first marker (if any) already read.

        The hot path of an XGBoost model (a 500-tree model is ~10,000 entries, most of them a typed
        numeric array): the key and a typed numeric array value are read here inline, the array as one
        numpy view. Any other value, no-op markers, and every malformed case go through the general
        methods, which raise the error.

        Sibling objects (the trees of a model) repeat each other's keys and types: an entry whose bytes,
        from its key's length marker to its value's length (or number), are those of the entry at the
        same place in the last object read at this depth has the same key and type, so only its length
        and data are read. Anything else (another key, type or width, no-ops, a duplicate, a length past
        the end) is read the long way, which raises the error.
        """
        buf, size, typed = self.buf, len(self.buf), self.typed
        dtypes: dict[int, Any] | None = None
        np: Any = None
        out: dict[str, Any] = {}
        shape = self.shapes.get(depth, ())
        seen: list[_Entry | None] = []
        k, expected = 0, len(shape)
        while n is None or k < n:
            pos = self.pos
            if pending is None and k < expected:
                known = shape[k]
                if known is not None and buf.startswith(known[0], pos) and known[1] not in out:
                    dtype, number = known[2], known[3]
                    at = pos + known[5]
                    if dtype is not None:  # a typed numeric array: its count, then its data
                        start = at + number.size
                        count = number.unpack_from(buf, at)[0] if start <= size else -1
                        stop = start + count * dtype.itemsize
                        if count >= 0 and stop <= size:
                            if typed is None and np is None:
                                np = _numpy()[0]
                            out[known[1]] = (typed(buf, dtype, count, start) if typed is not None
                                             else np.frombuffer(buf, dtype=dtype, count=count, offset=start))
                            self.pos = stop
                            seen.append(known)
                            k += 1
                            continue
                    elif self.known(known, at, out, depth):
                        seen.append(known)
                        k += 1
                        continue
            entry = pos if pending is None else -1  # where this entry's bytes begin, if they are all in buf
            if pending is not None:
                m, pending = pending, None
            elif pos < size and buf[pos] != _N:
                m, pos = buf[pos], pos + 1
            else:
                m = self.marker()  # no-ops, or the error
                pos, entry = self.pos, -1
            if n is None and m == _END[True]:
                self.pos = pos
                self.shapes[depth] = seen
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
                    seen.append((buf[entry:pos + 5], key, dtype, fmt[0], _ARRAY, pos + 5 - entry) if entry >= 0
                                else None)
                    k += 1
                    continue
            known = self.shape_of(entry, pos, key) if entry >= 0 else None
            if known is not None and self.known(known, entry + known[5], out, depth):
                seen.append(known)
                k += 1
                continue
            out[key] = self.value(self.marker(), depth)
            seen.append(None)
            k += 1
        self.shapes[depth] = seen
        return out

    def shape_of(self, entry: int, pos: int, key: str) -> _Entry | None:
        """What the long way learnt of an entry whose value starts at `pos`: its header bytes and kind."""
        buf, size = self.buf, len(self.buf)
        m = buf[pos] if pos < size else -1
        fmt = _INTS.get(m) or _FLOATS.get(m)
        if fmt is not None:
            return buf[entry:pos + 1], key, None, fmt[0], m, pos + 1 - entry
        if m in (_S, _H) and pos + 1 < size and buf[pos + 1] in _INTS:
            return buf[entry:pos + 2], key, None, _INTS[buf[pos + 1]][0], _S, pos + 2 - entry
        if m == _OBJECT:
            return buf[entry:pos + 1], key, None, None, _OBJECT, pos + 1 - entry
        return None

    def plain_object(self, at: int, depth: int) -> bool:
        """Whether an object met at `depth` (its marker read) starts at `at` with its first key or its end.

        Then `object` reads it from there as `value` would. A counted, typed or no-op start, or an object
        past the depth limit, is left to `value`, which reads or refuses it.
        """
        return depth < MAX_DEPTH and at < len(self.buf) and (self.buf[at] in _INTS or self.buf[at] == _END[True])

    def known(self, known: _Entry, at: int, out: dict[str, Any], depth: int) -> bool:
        """Read a number, string or object whose header ends at `at`, as `known` says; False if it cannot be."""
        buf, size = self.buf, len(self.buf)
        key, number, kind = known[1], known[3], known[4]
        if kind == _OBJECT:
            if not self.plain_object(at, depth):
                return False
            self.pos = at
            out[key] = self.object(None, None, depth + 1)
            return True
        end = at + number.size
        if end > size:
            return False
        value = number.unpack_from(buf, at)[0]
        if kind != _S:
            out[key], self.pos = value, end
            return True
        if value < 0 or end + value > size:
            return False
        try:
            out[key] = buf[end:end + value].decode("utf-8")
        except UnicodeDecodeError:
            return False
        self.pos = end + value
        return True
