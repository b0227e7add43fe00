"""The template of a run (`_runs`): what every like sibling shares with the one read the long way.

Its bytes (keys, markers, constant strings and counts) and, between them, the parts whose length follows
from the object's lead count (arrays of that count, numbers, the lead count's digits), each placed at
`a + b * lead + d * digits(lead)` from the object's start. `plan` then covers the template's own bytes
with words of 8, 4, 2 and 1 bytes, which `_runs.read_run` compares for many siblings at once.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from ._ubjson import _CONSTANTS, _FLOATS, _INTS, _NUMPY, _numpy

_OPEN, _CLOSE, _ARRAY, _TYPE, _COUNT, _S = (ord(c) for c in "{}[$#S")
_TEMPLATE_DEPTH = 8  # nested objects in a template; deeper ones are read the long way


class Field(NamedTuple):
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


class Template:
    """What every object of a run shares with the one read the long way: see the module's docstring."""

    def __init__(self) -> None:
        self.zones: list[tuple[int, int, int, int]] = []  # (a, b, d, length) of each stretch of the template's bytes
        self.leads: list[tuple[int, int, int, Any]] = []  # (a, b, d, dtype) of each count that is the lead count
        self.digits: list[tuple[int, int, int, Any]] = []  # the same, of the length of a string of its digits
        self.fields: list[Field] = []
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
            self.fields.append(Field("A", path, dtype, -1, None, self.a, self.b, self.d))
            self.b += dtype.itemsize
        else:
            self.take(count_bytes)
            self.fields.append(Field("A", path, dtype, count, None, self.a, self.b, self.d))
            self.a += count * dtype.itemsize

    def string(self, path: tuple[str, ...], length_format: tuple[struct.Struct, int], text: str,
               encoded: bytes) -> None:
        """`encoded`: the string's length bytes, then its UTF-8 bytes."""
        if self.lead is not None and text == str(self.lead):
            self.digits.append((self.a, self.b, self.d, _numpy()[0].dtype(length_format[0].format)))
            self.a += length_format[1]
            self.fields.append(Field("S", path, None, 0, None, self.a, self.b, self.d))
            self.d += 1
        else:
            self.take(encoded)
            self.fields.append(Field("S", path, text=text))


def template(buf: bytes, start: int, end: int) -> Template | None:
    """The template of the object at `buf[start:end]` (its `{` to its `}`), read the long way already.

    None if it holds anything but keys, typed numeric arrays, numbers, strings, constants and plain
    objects, or no array: its siblings are read the long way.
    """
    tpl = Template()
    try:
        if _walk(buf, start, end, tpl, path=(), depth=0) != end or tpl.lead_at is None:
            return None
        tpl.plan(buf, start)
    except (IndexError, struct.error, UnicodeDecodeError):  # not as the long way read it: leave it to that
        return None
    return tpl


def _walk(buf: bytes, p: int, end: int, tpl: Template, *, path: tuple[str, ...], depth: int) -> int | None:
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
            tpl.fields.append(Field("V", key, _numpy()[0].dtype(number[0].format), 0, None, tpl.a, tpl.b, tpl.d))
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
            tpl.fields.append(Field("O", key))
            after = _walk(buf, p, end, tpl, path=key, depth=depth + 1)
            if after is None:
                return None
            p = after
        elif m in _CONSTANTS:
            tpl.take(buf[p:p + 1])
            tpl.fields.append(Field("C", key, text=_CONSTANTS[m]))
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


def words(buf: bytes, width: int) -> Any:
    """The `width`-byte word at each byte of `buf`, as numpy views it (no copy)."""
    np = _numpy()[0]
    return np.ndarray((max(len(buf) - width + 1, 0),), dtype=np.dtype(f"<u{width}"), buffer=buf, strides=(1,))
