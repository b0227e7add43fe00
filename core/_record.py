"""Small read-only value classes: what `@dataclass(frozen=True)` gives, without importing dataclasses.

`import dataclasses` imports `inspect` (and with it ast, dis and tokenize): about 20 ms, which was
half of `import mlpersist`. A record's fields are its annotated class attributes, in the order of
its `__init__`'s parameters; `__init__` sets them once with `_init`, and the record is compared,
hashed, printed and pickled by them. Fields named in `_unequal` are left out of `==`, the hash and
the repr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeVar

    R = TypeVar("R", bound="Record")


class Record:
    """Base of the core's value classes; see the module docstring."""

    _fields: tuple[str, ...] = ()
    _unequal: tuple[str, ...] = ()

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._fields = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063 (inspect is what we avoid)

    def _init(self, **fields: Any) -> None:
        """Set every field once (each record's `__init__` calls it with all of them)."""
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self._fields if n not in self._unequal)

    def replace(self: R, **changes: Any) -> R:
        """Return a copy with the given fields changed."""
        return type(self)(**{**{n: getattr(self, n) for n in self._fields}, **changes})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only: build a new one (.replace({name}=...))")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields if n not in self._unequal)
        return f"{type(self).__name__}({shown})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return type(self), tuple(getattr(self, n) for n in self._fields)
