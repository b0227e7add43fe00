"""Sibling objects read as columns: the trees of an XGBoost model, read and checked in a few numpy calls.

A 500-tree model is 500 objects with the same keys in the same order, most of their values typed
arrays of node values. Read entry by entry (`_ubjson._Reader.object`) that is 10,000 entries and
7,000 array objects, 5.7 ms. Once one such object has been read the long way, its bytes are a
template: the same bytes (keys, markers, constant strings and counts) in the same places, and in
between a few variable parts, each of a length known from one number, the object's lead count (its
first array's length: a tree's node count), or from nothing at all:

- an array whose count is the lead count (`lead`), or the template's own count (its count bytes are
  part of the template);
- a number (the tree's id), whatever its value;
- a string: the template's own (part of the template), or the decimal digits of the lead count (a
  tree's `num_nodes`).

So each sibling's length is a function of its lead count alone: the siblings' starts are found by
reading one count each, and every one of their template bytes and counts is then compared in a few
numpy calls. The siblings that match, in order, are kept as a `Run`: their columns, no object per
entry (a list holding runs is a `_rows.Rows`). The first that does not is read the long way, which
refuses what is wrong, and may be the template of the next run. A sibling that matches is, byte for
byte, the template with other array data, numbers, and lead count: the long way would read it to the
same entries (`tests/adapters/test_xgboost_runs.py` reads changed models and generated lists both
ways, and requires the same).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from ._ubjson import _CONSTANTS, _FLOATS, _INTS, _NUMPY, TypedArray, _numpy

_OPEN, _CLOSE, _ARRAY, _TYPE, _COUNT, _S = (ord(c) for c in "{}[$#S")
# Templates tried per list, and in a whole document: each costs ~0.1 ms of numpy calls, which a document
# of many short lists would otherwise pay once per list. An XGBoost model tries 2 or 3.
MAX_ATTEMPTS, MAX_TEMPLATES = 8, 32
# Siblings compared at once: 8 at first, twice as many after each chunk that matched whole, up to 256 or
# 2**20 words and counts (8 MiB per index array). A run that ends has then compared at most 8 siblings
# more than it kept, or as many as it kept: a crafted list costs at most a few times its long-way read.
_FIRST_CHUNK, _CHUNK, _CELLS = 8, 256, 1 << 20
_TEMPLATE_DEPTH = 8  # nested objects in a template; deeper ones are read the long way


class _Field(NamedTuple):
    """A value of the objects of a run, at `path`, placed at `a + b * lead + d * digits(lead)` from their start.

    `kind`: "A" a typed array (`dtype`; `length` its count, or -1 for the lead count), "V" a number
    (`dtype`), "S" a string (`text`, or None for the lead count's digits), "C" a constant (`text` holds
    it), "O" an object (its entries are the fields after it whose path extends its own).
    """

    kind: str
    path: tuple[str, ...]
    dtype: Any = None
    length: int = 0
    text: Any = None
    a: int = 0
    b: int = 0
    d: int = 0


class _Template:
    """What every object of a run shares with the one read the long way: see the module's docstring."""

    def __init__(self) -> None:
        self.zones: list[tuple[int, int, int, int]] = []  # (a, b, d, length) of each stretch of the template's bytes
        self.leads: list[tuple[int, int, int, Any]] = []  # (a, b, d, dtype) of each count that is the lead count
        self.digits: list[tuple[int, int, int, Any]] = []  # the same, of the length of a string of its digits
        self.fields: list[_Field] = []
        self.a = self.b = self.d = 0
        self.lead: int | None = None  # the template's own lead count
        self.lead_at: tuple[int, struct.Struct] | None = None
        self.words: list[tuple[Any, Any, Any, Any, Any]] = []  # see `plan`
        self.counts: list[tuple[Any, bool, Any, Any, Any]] = []  # the count slots by type: (dtype, digits?, a, b, d)

    def take(self, data: bytes) -> None:
        """The next bytes are the template's own."""
        if self.zones and self.zones[-1][0] + self.zones[-1][3] == self.a and self.zones[-1][1:3] == (self.b, self.d):
            a, b, d, length = self.zones.pop()
            self.zones.append((a, b, d, length + len(data)))
        else:
            self.zones.append((self.a, self.b, self.d, len(data)))
        self.a += len(data)

    def plan(self, buf: bytes, start: int) -> None:
        """Cover the template's own bytes with words of 8, 4, 2 and 1 bytes, each inside one stretch.

        `words` holds, per width: the words' places (a, b, d arrays) and their values in the template
        object at `start`; a sibling matches where each of its words has that value.
        """
        np = _numpy()[0]
        assert self.lead is not None
        places: dict[int, list[tuple[int, int, int]]] = {8: [], 4: [], 2: [], 1: []}
        for a, b, d, length in self.zones:
            for width in (8, 4, 2, 1):
                if length >= width:  # words at 0, width, 2 width, ... and one ending at the stretch's end
                    places[width] += [(a + o, b, d) for o in [*range(0, length - width + 1, width), length - width]]
                    break
        groups: dict[tuple[Any, bool], list[tuple[int, int, int]]] = {}
        for slots, of_digits in ((self.leads, False), (self.digits, True)):
            for a, b, d, dtype in slots:
                groups.setdefault((dtype, of_digits), []).append((a, b, d))
        for (dtype, of_digits), at in groups.items():
            ca, cb, cd = (np.asarray(v, dtype=np.int64) for v in zip(*at, strict=True))
            self.counts.append((dtype, of_digits, ca, cb, cd))
        lead, digits = self.lead, len(str(self.lead))
        for width, at in places.items():
            if at:
                wa, wb, wd = (np.asarray(v, dtype=np.int64) for v in zip(*at, strict=True))
                self.words.append((width, wa, wb, wd, words(buf, width)[start + wa + lead * wb + digits * wd]))

    def array(self, path: tuple[str, ...], dtype: Any, count_format: tuple[struct.Struct, int], count: int,
              count_bytes: bytes) -> None:
        if self.lead is None:
            self.lead, self.lead_at = count, (self.a, count_format[0])
        if count == self.lead:  # a count per sibling, checked to be its lead count
            self.leads.append((self.a, self.b, self.d, _numpy()[0].dtype(count_format[0].format)))
            self.a += count_format[1]
            self.fields.append(_Field("A", path, dtype, -1, None, self.a, self.b, self.d))
            self.b += dtype.itemsize
        else:
            self.take(count_bytes)
            self.fields.append(_Field("A", path, dtype, count, None, self.a, self.b, self.d))
            self.a += count * dtype.itemsize

    def string(self, path: tuple[str, ...], length_format: tuple[struct.Struct, int], text: str,
               encoded: bytes) -> None:
        """`encoded`: the string's length bytes, then its UTF-8 bytes."""
        if self.lead is not None and text == str(self.lead):
            self.digits.append((self.a, self.b, self.d, _numpy()[0].dtype(length_format[0].format)))
            self.a += length_format[1]
            self.fields.append(_Field("S", path, None, 0, None, self.a, self.b, self.d))
            self.d += 1
        else:
            self.take(encoded)
            self.fields.append(_Field("S", path, text=text))


def template(buf: bytes, start: int, end: int) -> _Template | None:
    """The template of the object at `buf[start:end]` (its `{` to its `}`), read the long way already.

    None if it holds anything but keys, typed numeric arrays, numbers, strings, constants and plain
    objects, or no array: its siblings are read the long way.
    """
    tpl = _Template()
    try:
        if _walk(buf, start, end, tpl, path=(), depth=0) != end or tpl.lead_at is None:
            return None
        tpl.plan(buf, start)
    except (IndexError, struct.error, UnicodeDecodeError):  # not as the long way read it: leave it to that
        return None
    return tpl


def _walk(buf: bytes, p: int, end: int, tpl: _Template, *, path: tuple[str, ...], depth: int) -> int | None:
    """Add the object at `p` (its `{`) to `tpl`; where it ends, or None."""
    if buf[p] != _OPEN or depth > _TEMPLATE_DEPTH:
        return None
    tpl.take(buf[p:p + 1])
    p += 1
    while p < end:
        m = buf[p]
        if m == _CLOSE:
            tpl.take(buf[p:p + 1])
            return p + 1
        fmt = _INTS.get(m)
        key_end = _sized(buf, p + 1, fmt, end)
        if fmt is None or key_end is None:
            return None
        key = (*path, buf[p + 1 + fmt[1]:key_end].decode("utf-8"))
        tpl.take(buf[p:key_end])
        p = key_end
        m = buf[p]
        number = _INTS.get(m) or _FLOATS.get(m)
        if m == _ARRAY:
            count_format = _INTS.get(buf[p + 4])
            if buf[p + 1] != _TYPE or buf[p + 2] not in _NUMPY or buf[p + 3] != _COUNT or count_format is None:
                return None
            dtype = _numpy()[1][buf[p + 2]]
            count = count_format[0].unpack_from(buf, p + 5)[0]
            if count < 0:
                return None
            tpl.take(buf[p:p + 5])
            tpl.array(key, dtype, count_format, count, buf[p + 5:p + 5 + count_format[1]])
            p += 5 + count_format[1] + count * dtype.itemsize
        elif number is not None:
            tpl.take(buf[p:p + 1])
            tpl.fields.append(_Field("V", key, _numpy()[0].dtype(number[0].format), 0, None, tpl.a, tpl.b, tpl.d))
            tpl.a += number[1]
            p += 1 + number[1]
        elif m == _S:
            length_format = _INTS.get(buf[p + 1])
            stop = _sized(buf, p + 2, length_format, end)
            if length_format is None or stop is None:
                return None
            tpl.take(buf[p:p + 2])
            tpl.string(key, length_format, buf[p + 2 + length_format[1]:stop].decode("utf-8"), buf[p + 2:stop])
            p = stop
        elif m == _OPEN:
            tpl.fields.append(_Field("O", key))
            after = _walk(buf, p, end, tpl, path=key, depth=depth + 1)
            if after is None:
                return None
            p = after
        elif m in _CONSTANTS:
            tpl.take(buf[p:p + 1])
            tpl.fields.append(_Field("C", key, text=_CONSTANTS[m]))
            p += 1
        else:
            return None
    return None


def _sized(buf: bytes, at: int, fmt: tuple[struct.Struct, int] | None, end: int) -> int | None:
    """Where the bytes whose length is at `at` (in `fmt`) end; None if `fmt` is None, or past `end`."""
    if fmt is None:
        return None
    length = fmt[0].unpack_from(buf, at)[0]
    stop = at + fmt[1] + length
    return stop if length >= 0 and stop <= end else None


class Run:
    """Objects that matched a template, one after another in `buf`: their starts and lead counts."""

    __slots__ = ("buf", "digits", "fields", "leads", "starts")

    def __init__(self, buf: bytes, fields: list[_Field], starts: Any, leads: Any, digits: Any) -> None:
        self.buf, self.fields, self.starts, self.leads, self.digits = buf, fields, starts, leads, digits

    def __len__(self) -> int:
        return len(self.starts)

    def field(self, path: tuple[str, ...]) -> _Field | None:
        return next((f for f in self.fields if f.path == path), None)

    def place(self, f: _Field) -> Any:
        return self.starts + f.a + self.leads * f.b + self.digits * f.d

    def counts(self, f: _Field) -> Any:
        np = _numpy()[0]
        return self.leads if f.length < 0 else np.full(len(self), f.length, dtype=np.int64)

    def numbers(self, f: _Field) -> Any:
        """The values of a number field, one per object."""
        np = _numpy()[0]
        size = f.dtype.itemsize
        at = self.place(f)[:, None] + np.arange(size)
        return np.frombuffer(self.buf, dtype=np.uint8)[at].view(f.dtype).ravel()

    def values(self, f: _Field) -> list[Any]:
        """A field's value in each object, as the long way reads it (arrays as `TypedArray`s)."""
        if f.kind == "A":
            return [TypedArray(self.buf, f.dtype, c, o) for c, o in zip(
                self.counts(f).tolist(), self.place(f).tolist(), strict=True)]
        if f.kind == "V":
            return list(self.numbers(f).tolist())
        if f.kind == "S":
            return [f.text] * len(self) if f.text is not None else [str(n) for n in self.leads.tolist()]
        if f.kind == "C":
            return [f.text] * len(self)
        return [{} for _ in range(len(self))]

    def rows(self) -> list[dict[str, Any]]:
        """The objects as the long way reads them."""
        rows: list[dict[str, Any]] = [{} for _ in range(len(self))]
        for f in self.fields:
            for row, value in zip(rows, self.values(f), strict=True):
                place = row
                for key in f.path[:-1]:
                    place = place[key]
                place[f.path[-1]] = value
        return rows

    def row(self, i: int) -> dict[str, Any]:
        """Object `i` as the long way reads it."""
        one = Run(self.buf, self.fields, self.starts[i:i + 1], self.leads[i:i + 1], self.digits[i:i + 1])
        return one.rows()[0]


def words(buf: bytes, width: int) -> Any:
    """The `width`-byte word at each byte of `buf`, as numpy views it (no copy)."""
    np = _numpy()[0]
    return np.ndarray((max(len(buf) - width + 1, 0),), dtype=np.dtype(f"<u{width}"), buffer=buf, strides=(1,))


def read_run(buf: bytes, pos: int, tpl: _Template, limit: int | None) -> tuple[Run | None, int]:
    """The objects from `pos` that match `tpl` (at most `limit`), and where they end."""
    np = _numpy()[0]
    assert tpl.lead_at is not None
    at, lead = tpl.lead_at
    size, whole, per_lead, per_digit = len(buf), tpl.a, tpl.b, tpl.d
    views = {w: words(buf, w) for w in (8, 4, 2, 1)}
    starts: list[int] = []
    leads: list[int] = []
    digits: list[int] = []
    limit, origin = size if limit is None else limit, pos
    cells = sum(len(w[1]) for w in tpl.words) + sum(len(c[2]) for c in tpl.counts)
    chunk, most = _FIRST_CHUNK, max(1, min(_CHUNK, _CELLS // max(cells, 1)))
    while True:
        chunk_starts: list[int] = []
        chunk_leads: list[int] = []
        chunk_digits: list[int] = []
        chunk_texts: list[str] = []
        while len(starts) + len(chunk_starts) < limit and len(chunk_starts) < chunk and pos < size \
                and buf[pos] == _OPEN and pos + at + lead.size <= size:
            n = lead.unpack_from(buf, pos + at)[0]
            text = str(n) if per_digit else ""
            g = len(text)
            stop = pos + whole + per_lead * n + per_digit * g
            if n < 0 or stop > size:
                break
            chunk_starts.append(pos)
            chunk_leads.append(n)
            chunk_digits.append(g)
            chunk_texts.append(text)
            pos = stop
        if not chunk_starts:
            break
        s, n_, g_ = (np.asarray(v, dtype=np.int64) for v in (chunk_starts, chunk_leads, chunk_digits))
        s_, n2, g2 = s[:, None], n_[:, None], g_[:, None]
        ok = np.ones(len(s), dtype=bool)
        for width, wa, wb, wd, expected in tpl.words:
            ok &= (views[width][s_ + wa + n2 * wb + g2 * wd] == expected).all(axis=1)
        for dtype, of_digits, ca, cb, cd in tpl.counts:  # big-endian counts, read as little-endian words
            found = views[dtype.itemsize][s_ + ca + n2 * cb + g2 * cd].view(dtype.newbyteorder("<")).byteswap()
            ok &= (found == (g2 if of_digits else n2)).all(axis=1)
        if tpl.digits:
            ok &= _digits_ok(buf, s, n_, g_, chunk_texts, tpl)
        k = len(chunk_starts) if ok.all() else int(np.argmin(ok))
        starts += chunk_starts[:k]
        leads += chunk_leads[:k]
        digits += chunk_digits[:k]
        if k < len(chunk_starts):
            break
        chunk = min(chunk * 2, most)
    if not starts:
        return None, origin
    s, n_, g_ = (np.asarray(v, dtype=np.int64) for v in (starts, leads, digits))
    end = starts[-1] + whole + per_lead * leads[-1] + per_digit * digits[-1]
    return Run(buf, tpl.fields, s, n_, g_), end


def _digits_ok(buf: bytes, s: Any, n: Any, g: Any, texts: list[str], tpl: _Template) -> Any:  # noqa: PLR0917
    """Whether each object's digit strings are `texts`, its lead count's decimal digits (`g` of them)."""
    np = _numpy()[0]
    ok = np.ones(len(s), dtype=bool)
    expected = "".join(texts).encode()
    lengths = g.tolist()
    for a, b, d, dtype in tpl.digits:
        at = (s + a + dtype.itemsize + n * b + g * d).tolist()
        if b"".join([buf[p:p + k] for p, k in zip(at, lengths, strict=True)]) != expected:
            ok &= np.fromiter((buf.startswith(t.encode(), p) for t, p in zip(texts, at, strict=True)), dtype=bool,
                              count=len(s))
    return ok
