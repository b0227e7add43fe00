"""The one way mlpersist unpickles: an allow-list enforced inside the unpickler, at run time."""

from __future__ import annotations

import _compat_pickle
import copyreg
import functools
import importlib
import io
import math
import os
import pickle
import sys
from collections.abc import Iterable
from types import BuiltinFunctionType, FunctionType, ModuleType
from typing import Any, BinaryIO

from ._policy import (
    CYTHON_SHORT_NAMES,
    EXACT,
    NATIVE_STATE,
    RULE_ROOTS,
    TrustPolicy,
    denied,
    rule_allows,
    unchecked_native,
    wrap,
)
from .errors import CorruptArtifactError, PersistError, UntrustedContentError


def load(fileobj: BinaryIO, policy: TrustPolicy, *, what: str, joblib_format: bool = True) -> Any:
    """Unpickle `fileobj` (joblib or plain pickle) under `policy`.

    Raises:
        mlpersist.errors.UntrustedContentError: listing every global outside the policy; none was called.
        mlpersist.errors.CorruptArtifactError: the stream is malformed.

    """
    obj, state = _run(fileobj, policy, what=what, joblib_format=joblib_format)
    if state.refused:
        raise refusal(what, state.refused, state.floor, state.missing)
    return obj


def audit(fileobj: BinaryIO, *, what: str, joblib_format: bool = True,
          floor: set[str] | None = None) -> list[tuple[str, bool]]:
    """Return every global the file names, with whether the default policy allows it.

    Refused globals are never imported or called; allowed ones are data constructors. `floor`, if
    given, receives the refused names that are on the deny-floor (no `allow=` admits them).
    """
    seen: list[tuple[str, bool]] = []
    _, state = _run(fileobj, TrustPolicy(), what=what, joblib_format=joblib_format, seen=seen)
    if floor is not None:
        floor.update(state.floor)
    return seen


def refusal(what: str, names: Iterable[str], floor: Iterable[str] = (), missing: Iterable[str] = ()) -> PersistError:
    """Build the error that lists every refused name and what would admit them.

    `floor`: those of `names` on the deny-floor (they run code, import, or open files), which only
    `trusted=True` admits: `allow=` is offered for the others only, or a caller who followed the advice
    would meet the same refusal again. `missing`: those the policy allows and this environment lacks;
    when they are all there is, the file was written with other versions (a CorruptArtifactError, which
    the load turns into a VersionMismatchError naming the versions when the manifest's differ).
    """
    lacking = sorted(set(missing))
    names = sorted(set(names) - set(lacking))
    if not names:  # each allowed, none found here: not a question of trust
        return CorruptArtifactError(
            f"{what} names {', '.join(lacking)}, which the installed packages do not have (each would be "
            "allowed): it was written with other versions of them; load it where the versions it was saved "
            "with are installed")
    floor = sorted(set(floor))
    admissible = [n for n in names if n not in floor]
    head = f"{what} would import {', '.join(names)}, which the default trust policy does not allow; nothing was run. "
    if not floor:
        advice = f"If you trust the file's author, pass allow={admissible!r} (or trusted=True) to load_any"
    else:
        advice = (f"No allow= admits {', '.join(floor)} (such names run code, import modules or open files and "
                  "sockets): only trusted=True loads this file, and only a file whose author you trust should be "
                  "loaded that way")
    return UntrustedContentError(head + advice, names)


def _run(fileobj: BinaryIO, policy: TrustPolicy, *, what: str, joblib_format: bool,
         seen: list[tuple[str, bool]] | None = None) -> tuple[Any, State]:
    state = State(policy, what, seen)
    stream: BinaryIO = fileobj
    load: Any
    if joblib_format:
        from . import _safejoblib  # joblib is imported only for joblib files

        stream, state.inflation = _safejoblib.decompressed(fileobj, what, bounded=not policy.trusted)
        # trusted: the C unpickler, unguarded (what the file names is imported and called)
        load = (functools.partial(_safejoblib.trusted_load, stream, state) if policy.trusted
                else _safejoblib.unpickler_class()(stream, state).load)
    else:
        load = functools.partial(pickle.load, fileobj) if policy.trusted else PlainUnpickler(fileobj, state).load
    state.raw_stream = stream is fileobj
    obj = _guarded_call(load, state)
    _at_end(stream, state)
    return obj, state


def _at_end(stream: BinaryIO, state: State) -> None:
    """Refuse bytes after the pickle's STOP: a model file holds one pickle, which joblib.load reads alone.

    A file of several pickles would load as its first one, and torch's legacy format (a pickle of a
    magic number first) as that number: a wrong answer, not a model.
    """
    if state.refused:
        return  # the refusal, raised next, tells more
    try:
        more = stream.read(1)
    except Exception as exc:  # a compressed stream damaged past the pickle
        raise CorruptArtifactError(f"{state.what}: the data after its pickle is damaged ({type(exc).__name__}: "
                                   f"{str(exc)[:200]})") from None
    if more:
        raise CorruptArtifactError(f"{state.what} holds more data after its pickle ends: a file of several pickles "
                                   "or of another format (torch's legacy torch.save format starts with one); "
                                   "mlpersist reads a file that holds one pickle, as joblib.dump and pickle.dump "
                                   "write it")


def _guarded_call(fn: Any, state: State) -> Any:
    from . import _gc

    try:
        with _gc.paused():  # an estimator is thousands of small objects
            return fn()
    except PersistError:  # the guard's own, and an adapter's check_state (a VersionMismatchError, say)
        raise
    except RecursionError:
        raise CorruptArtifactError(f"{state.what}: pickle nested too deeply") from None
    except MemoryError:
        raise CorruptArtifactError(f"{state.what}: pickle declares more data than memory holds") from None
    except Exception as exc:
        if state.refused:  # a refused global's stand-in broke the stream: the refusal is the story
            raise refusal(state.what, state.refused, state.floor, state.missing) from None
        raise CorruptArtifactError(f"{state.what} could not be unpickled ({type(exc).__name__}: "
                                   f"{str(exc)[:200]}); the file is damaged, not a pickle, or written with other "
                                   "versions of the packages it names") from exc


# The bases copyreg._reconstructor may build a protocol 0/1 object on: object (every estimator) and the
# builtin containers and values a Python class can derive from (a dict subclass such as sklearn's Bunch).
_RECONSTRUCTOR_BASES = (object, dict, list, set, frozenset, tuple, int, float, complex, str, bytes, bytearray)


# The functions of the allow-list that pickles call as they load (Python's, numpy's and its random
# generators' rebuilders); any other allowed function is only kept by models as a value. Cython's
# `__pyx_unpickle_<class>` and scikit-learn's `newObj` are called too, and any name the caller passed to allow=.
_CALLED = frozenset("""
    _codecs.encode copyreg._reconstructor numpy.core.multiarray._reconstruct numpy._core.multiarray._reconstruct
    numpy.core.multiarray.scalar numpy._core.multiarray.scalar numpy.core.numeric._frombuffer
    numpy._core.numeric._frombuffer numpy.random._pickle.__randomstate_ctor numpy.random._pickle.__bit_generator_ctor
    numpy.random._pickle.__generator_ctor numpy.ma.core._mareconstruct
""".split())
# numpy's array rebuilders and the place of their shape argument, which numpy writes as (0,)
_SHAPE_ARGUMENT = {"numpy.core.multiarray._reconstruct": 1, "numpy._core.multiarray._reconstruct": 1,
                   "numpy.ma.core._mareconstruct": 2}


def never_called(cls: type) -> bool:
    """Whether pickle rebuilds `cls` without calling it: a class with no reduction of its own, nor one in copyreg.

    Pickle makes such an object with `cls.__new__` (NEWOBJ, protocols 2-5) or `copyreg._reconstructor`
    (0 and 1), then sets its state (BUILD): the constructor never runs. A call of it (REDUCE, OBJ, INST) is
    no pickle's doing, and a constructor can allocate by its arguments: 32 bytes asking for
    `scipy.sparse.lil_matrix((3e7, 1))` took 4.3 GB and 26 s. Classes that reduce to a call of themselves
    (numpy.dtype, scikit-learn's Tree, set) define `__reduce__`/`__reduce_ex__`, or copyreg registers them
    (complex). Builtin types are left to `_check_call`'s rules: pickle writes `bytes()` for an empty bytes
    object in protocols 0-2.
    """
    return (cls.__module__ != "builtins" and getattr(cls, "__reduce__", None) is object.__reduce__
            and getattr(cls, "__reduce_ex__", None) is object.__reduce_ex__
            and cls not in copyreg.dispatch_table)


def _no_elements(shape: Any) -> bool:
    dims = shape if type(shape) is tuple else (shape,)
    return all(type(d) is int and d >= 0 for d in dims) and 0 in dims


def _call_kind(fn: Any) -> str:
    """What `_check_call` checks a call of `fn` for, by its type alone: "bytes", "array", "void" or ""."""
    if isinstance(fn, type) and issubclass(fn, (bytes, bytearray)):
        return "bytes"
    if _is_numpy_type(fn, "ndarray"):
        return "array"
    return "void" if _is_numpy_type(fn, "void") else ""


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", type(fn).__name__))


def _is_numpy_type(fn: Any, name: str) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(fn, type) and issubclass(fn, getattr(np, name))


class _Refused:
    """Stands in for a refused global so the rest of the stream can be read for the report."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Refused:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("refused global")


class State:
    """What one guarded read knows: the policy, the globals it handed out and refused, the file's size."""

    def __init__(self, policy: TrustPolicy, what: str, seen: list[tuple[str, bool]] | None) -> None:
        self.policy, self.what, self.seen = policy, what, seen
        self.refused: list[str] = []
        self.floor: set[str] = set()  # those of `refused` on the deny-floor (no allow= admits them)
        self.missing: set[str] = set()  # those of `refused` the policy allows, not found here (other versions)
        self.globals: set[int] = set()  # ids of objects find_class handed out
        self.values_only: dict[int, str] = {}  # of those, functions models keep but their pickles never call
        self.rebuilt_only: dict[int, str] = {}  # of those, classes pickles rebuild from their state, never call
        self.shaped: dict[int, int] = {}  # of those, numpy's array rebuilders: where their shape argument is
        self.kinds: dict[int, tuple[Any, str]] = {}  # id -> (callable, `_call_kind`): each is classed once per load
        self.built: dict[type, tuple[bool, bool]] = {}  # the type of a BUILD target -> (a numpy dtype?, NATIVE_STATE?)
        self.cache: dict[tuple[str, str], Any] = {}
        self.raw_stream = False  # True when the unpickler reads the file itself (not a decompressor)
        self.inflation: int | None = None  # a decompressed stream's limit, if it has one (`_safejoblib.decompressed`)
        self._size: int | None = None

    def remaining(self, f: Any) -> float:
        """How many bytes the raw file holds after the read position (its size is asked once per load).

        For a decompressed stream: how many more it may give (its limit), if it has one.
        """
        if not self.raw_stream:
            return float(1 << 40) if self.inflation is None else float(self.inflation - f.tell())
        try:
            if self._size is None:
                self._size = os.fstat(f.fileno()).st_size
            return float(self._size - f.tell())
        except (OSError, AttributeError, io.UnsupportedOperation):
            return float(1 << 40)  # no size known: the reads themselves stop at the stream's end

    def structural(self, message: str) -> UntrustedContentError:
        return UntrustedContentError(f"{self.what}: {message}; refusing to go on (nothing refused was run)",
                                     self.refused)

    def native_state(self, obj: Any, state: Any) -> Any:
        """The state to set on `obj`, an object of a NATIVE_STATE framework, as its adapter checked it.

        Its `__setstate__` hands the native model in `state` to the framework's parser, so the adapter
        that claims the framework sees it first (`check_state`, which may return it rewritten into the
        form it checked). An adapter without `check_state` checks the object after the load (`check`,
        called by the sklearn adapter).
        With no adapter for the framework, nothing can check it: refused before the parser runs.
        """
        from . import _registry

        adapter = _registry.claimant(type(obj).__module__)
        if adapter is None:
            raise unchecked_native(type(obj), self.what)
        hook = getattr(adapter, "check_state", None)
        return state if hook is None else hook(obj, state, self.what)


MISSING = object()  # what `resolve` returns for a name it allows that is not found here


def resolve(module: str, name: str, policy: TrustPolicy) -> Any | None:
    """Return the object `module.name` if `policy` allows it, else None. Imports only trusted packages.

    A name the policy allows (listed, or under a trusted package's rules) that cannot be imported here is
    `MISSING`: the file was written with other versions of the package (numpy 2's `numpy._core.numeric`
    under numpy 1, a class newer than the installed scikit-learn).
    """
    full = f"{module}.{name}"
    root = module.partition(".")[0]
    if denied(module, name):
        return None
    listed = full in policy.allow or full in EXACT
    if not listed and ("." in name or root not in RULE_ROOTS):
        return None  # dotted names only when listed exactly; unknown packages are never imported
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return MISSING
    if isinstance(obj, ModuleType):
        return None
    if listed:
        return wrap(full, obj)
    return obj if rule_allows(module, name, obj) else None


class Guard:
    """Structural rules on top of find_class; mixed into pickle's pure-Python unpickler."""

    stack: list[Any]
    metastack: list[Any]
    proto: int
    _s: State
    _file: BinaryIO

    def load(self) -> Any:
        """The pure-Python unpickler's load loop, reading the stream directly instead of through its frame buffer.

        A frame is only a read-ahead hint: here the stream is already buffered (in memory, mostly), so
        FRAME just skips its length, and each opcode costs one C call to read instead of three Python
        calls (a tenth of a forest's load time). Every opcode still goes through the guarded dispatch.
        """
        file: Any = self._file
        self.read, self.readline, self.readinto = file.read, file.readline, file.readinto
        self.metastack, self.stack = [], []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch  # type: ignore[attr-defined]
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value

    def load_frame(self) -> None:
        if len(self.read(8)) != 8:
            raise EOFError

    def find_class(self, module: str, name: str) -> Any:
        sys.audit("pickle.find_class", module, name)
        if self.proto < 3:  # canonical names first (__builtin__ -> builtins, copy_reg -> copyreg)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        module = CYTHON_SHORT_NAMES.get(module, module)
        s = self._s
        key = (module, name)
        if key not in s.cache:
            s.cache[key] = resolve(module, name, s.policy)
            if s.seen is not None:
                s.seen.append((f"{module}.{name}", s.cache[key] not in (None, MISSING)))
        obj = s.cache[key]
        if obj is None or obj is MISSING:
            s.refused.append(f"{module}.{name}")
            if obj is MISSING:
                s.missing.add(f"{module}.{name}")
            if denied(module, name):
                s.floor.add(f"{module}.{name}")
            return _Refused(f"{module}.{name}")
        s.globals.add(id(obj))
        full = f"{module}.{name}"
        if full in _SHAPE_ARGUMENT:
            s.shaped[id(obj)] = _SHAPE_ARGUMENT[full]
        if isinstance(obj, type) or full in _CALLED or name.startswith("__pyx_unpickle_") or full in s.policy.allow \
                or (module.startswith("sklearn.") and name == "newObj"):
            s.values_only.pop(id(obj), None)
        else:
            s.values_only[id(obj)] = full
        if isinstance(obj, type) and full not in s.policy.allow and never_called(obj):
            s.rebuilt_only[id(obj)] = full
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise self._s.structural("persistent ids are not part of any format mlpersist reads")

    def _callable_ok(self, fn: Any) -> bool:
        return isinstance(fn, _Refused) or id(fn) in self._s.globals

    def _check_call(self, fn: Any, args: Any, kwargs: Any, op: str) -> None:
        """Refuse a call that would build far more than the file holds, or compute at the file's will.

        The allowed functions that pickles call rebuild objects from their state; the others (numpy.sum,
        a metric, a ufunc, check_array) are values a model keeps, and a call of them with the file's
        arguments is work of any size: three calls of numpy.sum on a 16 GB array of no bytes, in a 77-byte
        file, took 3 s. And a few bytes can ask a constructor for gigabytes: bytearray(3e9) (48 bytes made
        3 GB), list(range(3e8)) (57 bytes made 11.6 GB in 64 s), numpy.ndarray of a large shape, np.void(n),
        scipy.sparse.lil_matrix((3e7, 1)) (`never_called`). A pickle writes none of these: bytes objects come
        whole, containers from their items, arrays with no elements first, then their data, other objects
        from `__new__` and their state unless their class reduces to a call of itself.
        """
        s = self._s
        if isinstance(fn, _Refused):
            return
        if id(fn) in s.rebuilt_only and op not in ("NEWOBJ", "NEWOBJ_EX"):
            raise s.structural(f"{op} would call {s.rebuilt_only[id(fn)]}, which pickles rebuild from its state "
                               "and never call (its constructor can be asked for far more than the file holds)")
        if id(fn) in s.values_only:
            raise s.structural(f"{op} would call {s.values_only[id(fn)]}, which models keep as a value and their "
                               "pickles never call")
        values = (*args, *kwargs.values()) if kwargs else tuple(args)
        known = s.kinds.get(id(fn))
        if known is None or known[0] is not fn:
            known = s.kinds[id(fn)] = (fn, _call_kind(fn))
        kind = known[1]  # a forest's load makes ~700 calls of a dozen callables
        why = None
        if range in map(type, values):
            why = f"pass a range object to {_name(fn)}, which would hold all its items"
        elif kind == "bytes" and not all(isinstance(v, (bytes, bytearray, str)) for v in values):
            kinds = ", ".join(sorted({type(v).__name__ for v in values}))
            why = f"make {_name(fn)} from {kinds}, not from bytes or text"
        elif id(fn) in s.shaped or kind == "array":
            at = s.shaped.get(id(fn), 0)
            if len(values) > at and not _no_elements(values[at]):
                why = (f"make an array of shape {str(values[at])[:80]} with no data (numpy writes an empty array, "
                       "then its data)")
        elif kind == "void" and any(isinstance(v, int) for v in values):
            why = "make a numpy.void of a size, not of its bytes"
        if why is not None:
            raise s.structural(f"{op} would {why}")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        fn = self.stack[-1]
        if not self._callable_ok(fn):
            raise self._s.structural(f"REDUCE calls {type(fn).__name__}, which no allowed global provided")
        if fn is copyreg._reconstructor:  # type: ignore[attr-defined]
            self.stack[-1] = self._reconstruct(args)
            return
        self._not_native(fn, "REDUCE")
        self._check_call(fn, args, None, "REDUCE")
        self.stack[-1] = fn(*args)

    def _reconstruct(self, args: Any) -> Any:
        """copyreg._reconstructor(cls, base, state): how protocols 0 and 1 rebuild a plain object.

        It makes `base.__new__(cls, state)` and, for a base other than object, runs `base.__init__` on
        it. With `cls` a class this load handed out and `base` a builtin type `cls` derives from, that
        is protocol 2's NEWOBJ followed by a builtin's constructor, both admitted anyway; with anything
        else it could call any type's constructor, so anything else is refused.
        """
        if type(args) is tuple and len(args) == 3 and isinstance(args[0], _Refused):
            return args[0]  # the refusal is what gets reported
        if not (type(args) is tuple and len(args) == 3 and isinstance(args[0], type) and self._callable_ok(args[0])
                and any(args[1] is b for b in _RECONSTRUCTOR_BASES) and issubclass(args[0], args[1])):
            raise self._s.structural("copyreg._reconstructor is called with something other than an allowed class "
                                     "and a builtin base type it derives from")
        return copyreg._reconstructor(*args)  # type: ignore[attr-defined]

    def _instantiate(self, klass: Any, args: list[Any]) -> None:  # OBJ and INST
        self._not_native(klass, "OBJ/INST")
        self._check_call(klass, args, None, "OBJ/INST")
        pickle._Unpickler._instantiate(self, klass, args)  # type: ignore[attr-defined]

    def _not_native(self, fn: Any, op: str) -> None:
        module = "" if isinstance(fn, _Refused) else str(getattr(fn, "__module__", None) or "")
        if module.partition(".")[0] in NATIVE_STATE:
            raise self._s.structural(f"{op} would call {module}.{getattr(fn, '__qualname__', '?')}, whose objects are "
                                     "rebuilt from their state only (it reads and parses model files)")

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not self._callable_ok(cls) or not (isinstance(cls, (type, _Refused))):
            raise self._s.structural("NEWOBJ on something that is not an allowed class")
        self._check_call(cls, args, None, "NEWOBJ")
        self.stack.append(cls if isinstance(cls, _Refused) else cls.__new__(cls, *args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if not self._callable_ok(cls) or not (isinstance(cls, (type, _Refused))):
            raise self._s.structural("NEWOBJ_EX on something that is not an allowed class")
        self._check_call(cls, args, kwargs, "NEWOBJ_EX")
        self.stack.append(cls if isinstance(cls, _Refused) else cls.__new__(cls, *args, **kwargs))

    def load_obj(self) -> None:
        args = self.pop_mark()  # type: ignore[attr-defined]
        cls = args.pop(0)
        if not self._callable_ok(cls):
            raise self._s.structural("OBJ on something that is not an allowed class")
        self._instantiate(cls, args)

    def load_build(self) -> None:
        state = self.stack[-1]
        target = self.stack[-2]
        if isinstance(target, _Refused):
            self.stack.pop()
            return
        if id(target) in self._s.globals or isinstance(target, (type, ModuleType, FunctionType,
                                                                 BuiltinFunctionType)):
            raise self._s.structural(f"BUILD would set state on the global {type(target).__name__} itself")
        kind = self._s.built.get(type(target))
        if kind is None:  # a forest's load builds ~600 objects of a handful of types
            np = sys.modules.get("numpy")
            kind = self._s.built[type(target)] = (np is not None and isinstance(target, np.dtype),
                                                  type(target).__module__.partition(".")[0] in NATIVE_STATE)
        if kind[0]:
            _check_dtype_state(target, state, self._s)
        if kind[1]:
            self.stack[-1] = self._s.native_state(target, state)
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def load_setitem(self) -> None:
        self._check_target(self.stack[-3], dict, "SETITEM")
        pickle._Unpickler.load_setitem(self)  # type: ignore[attr-defined]

    def load_setitems(self) -> None:
        self._check_target(self.metastack[-1][-1], dict, "SETITEMS")
        pickle._Unpickler.load_setitems(self)  # type: ignore[attr-defined]

    def load_append(self) -> None:
        self._check_target(self.stack[-2], list, "APPEND")
        pickle._Unpickler.load_append(self)  # type: ignore[attr-defined]

    def load_appends(self) -> None:
        self._check_target(self.metastack[-1][-1], list, "APPENDS")
        pickle._Unpickler.load_appends(self)  # type: ignore[attr-defined]

    def load_additems(self) -> None:
        self._check_target(self.metastack[-1][-1], set, "ADDITEMS")
        pickle._Unpickler.load_additems(self)  # type: ignore[attr-defined]

    def _check_target(self, target: Any, kind: type, op: str) -> None:
        if not isinstance(target, (kind, _Refused)):
            raise self._s.structural(f"{op} on a {type(target).__name__}, where only a {kind.__name__} may take it")

    def load_ext(self) -> None:
        raise self._s.structural("copyreg extension codes (EXT1/EXT2/EXT4) are refused: they bypass find_class")


def guarded_dispatch(base: dict[int, Any]) -> dict[int, Any]:
    d = dict(base)
    for op, meth in ((pickle.REDUCE, "load_reduce"), (pickle.NEWOBJ, "load_newobj"),
                     (pickle.NEWOBJ_EX, "load_newobj_ex"), (pickle.OBJ, "load_obj"), (pickle.BUILD, "load_build"),
                     (pickle.SETITEM, "load_setitem"), (pickle.SETITEMS, "load_setitems"),
                     (pickle.APPEND, "load_append"), (pickle.APPENDS, "load_appends"), (pickle.FRAME, "load_frame"),
                     (pickle.ADDITEMS, "load_additems"), (pickle.EXT1, "load_ext"), (pickle.EXT2, "load_ext"),
                     (pickle.EXT4, "load_ext")):
        d[op[0]] = getattr(Guard, meth)
    return d


class PlainUnpickler(Guard, pickle._Unpickler):
    dispatch = guarded_dispatch(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, state: State) -> None:
        pickle._Unpickler.__init__(self, file)
        self._s, self._file = state, file


def _check_dtype_state(target: Any, state: Any, s: State) -> None:
    """numpy.dtype's C setstate trusts its tuple (numpy #30476): check its shape first."""
    np = sys.modules.get("numpy")
    if np is None or not isinstance(target, np.dtype):
        return
    if not _dtype_state_ok(state, np, target.kind in "mM"):
        raise s.structural("a numpy dtype carries a malformed state")


def _dtype_state_ok(state: Any, np: Any, datetime: bool) -> bool:
    """Whether a dtype state has the shape numpy writes, down to its fields and subarray.

    numpy's setstate takes the fields' dtypes and offsets as they come: a field whose dtype was
    another object segfaulted loading a forest's node arrays (found by loading mutated copies),
    and a field past the item's end read outside each item.
    """
    if not (isinstance(state, tuple) and len(state) in (8, 9) and type(state[0]) is int
            and isinstance(state[1], str) and len(state[1]) == 1 and state[1] in "<>|="
            and all(type(x) is int for x in state[5:8])
            and (len(state) == 8 or _metadata_ok(state[8], datetime))):
        return False
    subarray, names, fields, size = state[2], state[3], state[4], state[5]
    if subarray is not None and not (
            isinstance(subarray, tuple) and len(subarray) == 2 and isinstance(subarray[0], np.dtype)
            and type(subarray[1]) is tuple and all(type(n) is int and n >= 0 for n in subarray[1])
            and size == subarray[0].itemsize * math.prod(subarray[1])):
        return False
    if names is None or fields is None:
        return names is None and fields is None
    if not (type(names) is tuple and type(fields) is dict and size >= 0 and len(set(names)) == len(names)
            and all(type(n) is str and n in fields for n in names)):
        return False
    for key, field in fields.items():  # (dtype, offset) or (dtype, offset, title), under its name and its title
        if not (type(field) is tuple and len(field) in (2, 3) and isinstance(field[0], np.dtype)
                and type(field[1]) is int and 0 <= field[1] <= size - field[0].itemsize
                and (key in names or (len(field) == 3 and field[2] == key))):
            return False
    return True


def _metadata_ok(metadata: Any, datetime: bool) -> bool:
    """None or a dict; a datetime's is (None or a dict, (unit, count...)), as numpy writes it."""
    if not datetime:
        return metadata is None or type(metadata) is dict
    return (type(metadata) is tuple and len(metadata) == 2 and (metadata[0] is None or type(metadata[0]) is dict)
            and type(metadata[1]) is tuple and all(type(x) in (bytes, int) for x in metadata[1]))
