"""A list read partly as runs of like objects (`_runs`): the columns a check needs, without an object per element."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ._runs import Run
from ._ubjson import _numpy, joined

_MISSING: Any = object()


class Rows(Sequence[Any]):
    """A list whose elements are partly read as runs: `parts` holds runs and single elements, in order.

    The columns a check needs (`values`, `lengths`, `joined`) come from a run's columns, without an
    object per element; the elements themselves are made when asked for.
    """

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) if type(p) is Run else 1 for p in self.parts)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return list(self)[i]
        if i < 0:
            i += len(self)
        for p in self.parts:
            n = len(p) if type(p) is Run else 1
            if 0 <= i < n:
                return p.row(i) if type(p) is Run else p
            i -= n
        raise IndexError("list index out of range")

    def __iter__(self) -> Iterator[Any]:
        for p in self.parts:
            yield from (p.rows() if type(p) is Run else (p,))

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def values(self, path: tuple[str, ...], default: Any = _MISSING) -> list[Any]:
        """Each element's value at `path` (`element[path[0]][path[1]]...`), or `default` where it has none.

        Raises:
            KeyError: an element has none and there is no default.
            TypeError: an element (or a value on the path) is not an object.

        """
        out: list[Any] = []
        for p in self.parts:
            f = p.field(path) if type(p) is Run else None
            if f is not None:
                out += p.values(f)
            elif type(p) is Run and default is not _MISSING and _on_path(p, path):
                out += [default] * len(p)
            else:
                out += [_at(e, path, default) for e in (p.rows() if type(p) is Run else (p,))]
        return out

    def lengths(self, key: str, default: int | None = None) -> Any:
        """Each element's `len(element[key])` as a numpy array (`default` where it has no `key`).

        Raises:
            KeyError: an element has no `key` and there is no default.
            TypeError: a value has no length.

        """
        np = _numpy()[0]
        parts = []
        for p in self.parts:
            f = p.field((key,)) if type(p) is Run else None
            if f is not None and f.kind == "A":
                parts.append(p.counts(f))
            else:
                elements = p.rows() if type(p) is Run else (p,)
                parts.append(np.asarray([len(e[key]) if default is None or key in e else default for e in elements],
                                        dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def joined(self, key: str) -> Any:
        """Every element's `element[key]` array, joined in order, as one numpy array (`_ubjson.joined`)."""
        np = _numpy()[0]
        pieces: list[Any] = []
        singles: list[Any] = []  # the arrays of elements read one by one since the last run
        for p in self.parts:
            f = p.field((key,)) if type(p) is Run else None
            if f is not None and f.kind == "A":
                if singles:
                    pieces.append(joined(singles))
                    singles = []
                size = f.dtype.itemsize
                with memoryview(p.buf) as view:
                    data = b"".join([view[o:o + c * size] for o, c in zip(
                        p.place(f).tolist(), p.counts(f).tolist(), strict=True)])
                pieces.append(np.frombuffer(data, dtype=f.dtype))
            else:
                singles += [e[key] for e in (p.rows() if type(p) is Run else (p,))]
        if singles:
            pieces.append(joined(singles))
        if not pieces:
            return np.empty(0)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _on_path(run: Run, path: tuple[str, ...]) -> bool:
    """Whether a run's objects have an object at each step of `path` but the last (else `values` reads them)."""
    return all(run.field(path[:i]) is not None and run.field(path[:i]).kind == "O"  # type: ignore[union-attr]
               for i in range(1, len(path)))


def _at(element: Any, path: tuple[str, ...], default: Any) -> Any:
    for key in path[:-1]:
        element = element[key]
    if default is _MISSING:
        return element[path[-1]]
    return element.get(path[-1], default) if isinstance(element, dict) else element[path[-1]]


def rows(elements: Sequence[Any]) -> Rows:
    """`elements` (a list, or the `Rows` a lazy parse made) as `Rows`."""
    return elements if isinstance(elements, Rows) else Rows(list(elements))
