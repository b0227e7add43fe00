"""Variables Keras makes as it loads a file: counted against its weights, not filled with values they replace."""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import keras

from mlpersist.errors import CorruptArtifactError


def _stateless_scope_check() -> Any:
    """Keras's `in_stateless_scope` (internal); None in a Keras that moved it: no zero start there."""
    try:
        from keras.src.backend.common import stateless_scope  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(stateless_scope, "in_stateless_scope", None)


_IN_STATELESS_SCOPE = _stateless_scope_check()

UNSAVED_VALUES = 16 << 20  # variables a model may make that its weights file does not hold (metric states...)
# what a compiled model's optimizer may add per weight value when it is built at load (its state is in the file
# only once it has trained): RMSprop's 3 (centered, with momentum) or Adam's (amsgrad), one for use_ema, one for
# gradient_accumulation_steps
OPTIMIZER_SLOTS = 5


class _Stop(BaseException):
    """Raised through Keras by the variable budget (not an Exception: no `except Exception` there keeps going)."""


class _Load:
    """One load under way: the values it may still make, and the variables made zero whose values are owed."""

    __slots__ = ("left", "owed")

    def __init__(self, allowed: int) -> None:
        self.left = allowed
        self.owed: dict[int, tuple[Any, Any]] = {}  # id -> (the variable, its own initializer)


_load: contextvars.ContextVar[_Load | None] = contextvars.ContextVar("mlpersist_keras_load", default=None)
_patch_lock = threading.Lock()
# loads under way; the classes whose __init__ and assign are wrapped while there are any, and the originals
_patched: list[Any] = [0, None, None, None, None]


@contextmanager
def loading_variables(declared: int, what: str, *, optimizer: bool) -> Iterator[None]:
    """Around `keras.models.load_model`: a budget of variable values, and no initial values thrown away.

    The budget: Keras may make the values the weights file declares, plus `UNSAVED_VALUES`; with
    `optimizer` (the model is compiled as it loads), `OPTIMIZER_SLOTS` more per declared one (a model
    compiled with Adam and saved before training declares its weights only, and Adam makes two more of
    each as it is built). Keras builds every layer from the config, initialising its variables, before
    it reads a weight: a 41 KB .keras whose config asked for a Dense layer of 3,000,000 units took 13 s
    and 3.4 GB to be refused, and ten times that would take all memory.

    The initial values: Keras draws each variable's values from its initializer (Glorot-uniform random
    numbers for a Dense kernel), then overwrites them with the file's: a third of the load of a 200 MB
    model. Here a variable whose initializer is not zeros is made zero instead (a fill, no random
    draws), and owed its initializer's values; each one Keras then assigns a value to is not owed any
    more. When the load has succeeded, each variable still owed one (the file did not hold it: an
    optimizer saved before training, a custom layer that saves part of its state) gets its
    initializer's values, as Keras would have given it. Variables made in a stateless scope, whose
    values Keras defers itself, are left alone.

    Keras has no hook for either, so the `__init__` and `assign` of its variable class are wrapped while
    loads are under way; the wrappers act only in the context of a load (another thread's variables
    pass through untouched).
    """
    allowed = declared * (1 + OPTIMIZER_SLOTS if optimizer else 1) + UNSAVED_VALUES
    load = _Load(allowed)
    token = _load.set(load)
    _install()
    try:
        try:
            yield
        finally:
            _load.reset(token)
            _uninstall()
    except _Stop:
        extra = f" and {OPTIMIZER_SLOTS} per value its optimizer may add" if optimizer else ""
        raise CorruptArtifactError(f"{what}: the model's config makes more than {allowed} variable values, the most "
                                   f"the {declared} its weights file declares allow (with {UNSAVED_VALUES} a model may "
                                   f"leave unsaved{extra}): the config was changed, or the file is damaged") from None
    for variable, initializer in load.owed.values():
        try:
            variable.assign(initializer(variable.shape, dtype=variable.dtype))
        except Exception as exc:  # what Keras would have raised as it made the variable
            name = getattr(variable, "path", None) or getattr(variable, "name", "?")
            raise CorruptArtifactError(f"{what}: Keras could not rebuild the model: the initializer of the variable "
                                       f"{name!r}, which the file does not hold, failed: {type(exc).__name__}: "
                                       f"{exc}") from exc


def _install() -> None:
    with _patch_lock:
        if _patched[0] == 0:
            init_cls, assign_cls = (next(c for c in keras.Variable.__mro__ if name in c.__dict__)
                                    for name in ("__init__", "assign"))
            _patched[1:] = init_cls, init_cls.__init__, assign_cls, assign_cls.assign
            init_cls.__init__, assign_cls.assign = _made(_patched[2]), _assigned(_patched[4])
        _patched[0] += 1


def _uninstall() -> None:
    with _patch_lock:
        _patched[0] -= 1
        if _patched[0] == 0:
            _patched[1].__init__, _patched[3].assign = _patched[2], _patched[4]


def _made(init: Any) -> Any:
    def made(self: Any, initializer: Any, shape: Any = None, *args: Any, **kwargs: Any) -> None:
        load = _load.get()
        if load is None:
            init(self, initializer, shape, *args, **kwargs)
            return
        dims = shape if shape is not None else getattr(initializer, "shape", ())
        try:
            n = math.prod(int(d) for d in dims)
        except (TypeError, ValueError):
            n = 0  # Keras refuses it itself
        load.left -= n
        if load.left < 0:
            raise _Stop
        owed = _deferrable(initializer) if shape is not None else None
        if owed is None:
            init(self, initializer, shape, *args, **kwargs)
            return
        init(self, _zeros, shape, *args, **kwargs)
        load.owed[id(self)] = (self, owed)  # held: its id is not reused before the load ends

    return made


def _assigned(assign: Any) -> Any:
    def assigned(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = assign(self, *args, **kwargs)
        load = _load.get()
        if load is not None and load.owed:
            load.owed.pop(id(self), None)  # given its value (from the file): its initial one is not owed
        return out

    return assigned


def _deferrable(initializer: Any) -> Any:
    """The initializer a variable is owed, where it may be made zero first; None where it is made as Keras does.

    Not for zeros (nothing to save), values given as arrays, names Keras does not know (it raises
    itself), or variables made in a stateless scope (Keras defers their values).
    """
    if _IN_STATELESS_SCOPE is None:
        return None
    if isinstance(initializer, str):
        try:
            initializer = keras.initializers.get(initializer)
        except (ValueError, TypeError):
            return None
    if not callable(initializer) or isinstance(initializer, keras.initializers.Zeros) or _IN_STATELESS_SCOPE():
        return None
    return initializer


def _zeros(shape: Any, dtype: Any = None) -> Any:
    return keras.ops.zeros(shape, dtype=dtype)
