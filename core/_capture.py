"""Remember the arguments a model was built with, so that loading can rebuild it without `Net(...)`."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

INIT_ATTR = "_mlpersist_init"
T = TypeVar("T", bound=type)


def capture_init(cls: T) -> T:
    """Class decorator: record the arguments of the constructor call of each instance.

    The torch adapter stores them (as JSON) so that `load_any` can rebuild the model by itself, the
    way Hugging Face's hub mixin does. Only the outermost call is kept: a subclass's own arguments,
    not those it passes to `super().__init__`.
    """
    original = cls.__init__  # type: ignore[misc]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if INIT_ATTR not in self.__dict__:
            object.__setattr__(self, INIT_ATTR, (type(self), args, kwargs))
        original(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls
