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

from typing import Any

from . import _template
from ._template import _OPEN, Field, Template, words
from ._ubjson import TypedArray, _numpy

# Templates tried per list, and in a whole document: each costs ~0.1 ms of numpy calls, which a document
# of many short lists would otherwise pay once per list. An XGBoost model tries 2 or 3.
MAX_ATTEMPTS, MAX_TEMPLATES = 8, 32
# Siblings compared at once: 8 at first, twice as many after each chunk that matched whole, up to 256 or
# 2**20 words and counts (8 MiB per index array). A run that ends has then compared at most 8 siblings
# more than it kept, or as many as it kept: a crafted list costs at most a few times its long-way read.
_FIRST_CHUNK, _CHUNK, _CELLS = 8, 256, 1 << 20


class Run:
    """Objects that matched a template, one after another in `buf`: their starts and lead counts."""

    __slots__ = ("buf", "digits", "fields", "leads", "starts")

    def __init__(self, buf: bytes, fields: list[Field], starts: Any, leads: Any, digits: Any) -> None:
        self.buf, self.fields, self.starts, self.leads, self.digits = buf, fields, starts, leads, digits

    def __len__(self) -> int:
        return len(self.starts)

    def field(self, path: tuple[str, ...]) -> Field | None:
        return next((f for f in self.fields if f.path == path), None)

    def place(self, f: Field) -> Any:
        return self.starts + f.a + self.leads * f.b + self.digits * f.d

    def counts(self, f: Field) -> Any:
        np = _numpy()[0]
        return self.leads if f.length < 0 else np.full(len(self), f.length, dtype=np.int64)

    def numbers(self, f: Field) -> Any:
        """The values of a number field, one per object."""
        return _big_endian(words(self.buf, f.dtype.itemsize), f.dtype, self.place(f))

    def values(self, f: Field) -> list[Any]:
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


def read_after(buf: bytes, start: int, end: int, limit: int | None) -> tuple[Run | None, int]:
    """The objects from `end` that match the object at `buf[start:end]` (read the long way) as a template.

    At most `limit` of them; returns the run and where it ends, or None and `end`.
    """
    tpl = _template.template(buf, start, end)
    return (None, end) if tpl is None else read_run(buf, end, tpl, limit)


def read_run(buf: bytes, pos: int, tpl: Template, limit: int | None) -> tuple[Run | None, int]:
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
            found = _big_endian(views[dtype.itemsize], dtype, s_ + ca + n2 * cb + g2 * cd)
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


def _big_endian(view: Any, dtype: Any, places: Any) -> Any:
    """The big-endian `dtype` values at byte offsets `places`, from `view`: `words(buf, dtype.itemsize)`."""
    return view[places].view(dtype.newbyteorder("<")).byteswap()


def _digits_ok(buf: bytes, s: Any, n: Any, g: Any, texts: list[str], tpl: Template) -> Any:  # noqa: PLR0917
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
