"""The default trust policy for pickle-based formats: what may be imported, what never may.

How the list was derived is in docs/security.md. In short: exact names for containers and
numpy's reconstructors; rules for the classes of trusted packages (every scikit-learn estimator
and internal data class, numpy scalar/dtype types and ufuncs, scipy sparse matrices); and a
deny-floor that no `allow=` lifts (only `trusted=True` does).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from types import FunctionType
from typing import Any

from ._record import Record
from .errors import UntrustedContentError


class TrustPolicy(Record):
    """What a load may import: the default list, plus `allow`, or everything if `trusted`."""

    trusted: bool
    allow: frozenset[str]

    def __init__(self, trusted: bool = False, allow: frozenset[str] = frozenset()) -> None:
        self._init(trusted=trusted, allow=allow)

    @classmethod
    def of(cls, trusted: bool = False, allow: Iterable[str] = ()) -> TrustPolicy:
        """Build a policy from the `trusted=` and `allow=` arguments of `load_any`."""
        if isinstance(allow, str):
            allow = [allow]
        return cls(bool(trusted), frozenset(allow))


# Refused even when `allow=` names them (the floor torch keeps for os/sys/posix/nt): modules that
# run code, open files or sockets, import modules, dispatch calls, or hold nested deserialisers.
DENY_MODULES = frozenset("""
    os posix nt sys subprocess _posixsubprocess pty runpy importlib _frozen_importlib
    _frozen_importlib_external _imp imp ctypes _ctypes cffi pickle _pickle pickletools shelve dbm
    marshal types code codeop pydoc pkgutil zipimport site inspect gc _interpreters _xxsubinterpreters
    cloudpickle dill operator _operator functools itertools shutil tempfile socket ssl http urllib
    urllib2 httplib requests aiohttp smtplib ftplib poplib telnetlib nntplib xmlrpc socketserver select
    selectors asyncio multiprocessing signal atexit threading _thread webbrowser venv ensurepip pip
    distutils setuptools cProfile profile timeit trace bdb pdb doctest idlelib lib2to3 logging io _io
    pathlib glob fileinput linecache filecmp mmap zipfile tarfile sqlite3 compileall py_compile platform
    uuid _osx_support _aix_support imaplib commands popen2 pipes pexpect yaml sympy numexpr _pyrepl test
    copyreg numpy.testing numpy.f2py numpy.ctypeslib numpy.lib._datasource numpy.lib.format
    numpy.lib._npyio_impl sklearn.utils._testing sklearn.datasets sklearn.externals sklearn._build_utils
    sklearn.__check_build joblib.numpy_pickle_compat joblib.memory joblib.parallel torch.hub torch.jit
    torch.utils torch.distributed torch._inductor torch._dynamo torch.fx torch.serialization
    keras.models keras.saving keras.src.saving keras.config keras.utils
""".split())
DENY_NAMES = frozenset("""
    builtins.eval builtins.exec builtins.compile builtins.__import__ builtins.getattr builtins.setattr
    builtins.delattr builtins.globals builtins.locals builtins.vars builtins.open builtins.input
    builtins.breakpoint builtins.help builtins.memoryview builtins.type builtins.apply builtins.execfile
    builtins.file builtins.reload builtins.map builtins.filter builtins.iter builtins.next
    builtins.__build_class__ builtins.print builtins.exit builtins.quit builtins.super numpy.memmap
    numpy.load numpy.save numpy.savez numpy.savez_compressed numpy.savetxt numpy.fromfile numpy.loadtxt
    numpy.genfromtxt numpy.vectorize numpy.frompyfunc numpy.fromregex joblib.load joblib.dump
    joblib.Memory pandas.read_pickle pandas.eval torch.load torch.save
""".split())

# Allowed by exact name. Values are checking wrappers where the bare callable trusts its input.
_BUILTINS = "int float complex str bytes bytearray list tuple set frozenset dict slice range bool object"
EXACT_NAMES = frozenset(
    [f"builtins.{n}" for n in _BUILTINS.split()]
    + """
    _codecs.encode collections.OrderedDict collections.defaultdict collections.Counter collections.deque
    datetime.datetime datetime.date datetime.time datetime.timedelta datetime.timezone decimal.Decimal
    fractions.Fraction numpy.ndarray numpy.dtype numpy.core.multiarray._reconstruct
    numpy._core.multiarray._reconstruct numpy.core.multiarray.scalar numpy._core.multiarray.scalar
    numpy.core.numeric._frombuffer numpy._core.numeric._frombuffer
    numpy.random._pickle.__randomstate_ctor numpy.random._pickle.__bit_generator_ctor
    numpy.random._pickle.__generator_ctor numpy.random.mtrand.RandomState
    numpy.random._generator.Generator numpy.random._mt19937.MT19937 numpy.random._pcg64.PCG64
    numpy.random._pcg64.PCG64DXSM numpy.random._philox.Philox numpy.random._sfc64.SFC64
    numpy.ma.core._mareconstruct numpy.ma.core.MaskedArray numpy.ma.MaskedArray
    numpy.matrix numpy.matrixlib.defmatrix.matrix joblib.numpy_pickle.NumpyArrayWrapper
    xgboost.sklearn.XGBClassifier xgboost.sklearn.XGBRegressor xgboost.sklearn.XGBRanker
    xgboost.sklearn.XGBRFClassifier xgboost.sklearn.XGBRFRegressor xgboost.core.Booster
    lightgbm.sklearn.LGBMClassifier lightgbm.sklearn.LGBMRegressor lightgbm.sklearn.LGBMRanker
    lightgbm.basic.Booster
    numpy.mean numpy.median numpy.average numpy.max numpy.min numpy.amax numpy.amin numpy.sum numpy.prod
    numpy.std numpy.var sklearn.utils.validation.check_array sklearn.cluster._kmeans._kmeans_single_lloyd
    sklearn.cluster._kmeans._kmeans_single_elkan scipy.interpolate._bsplines.BSpline
    scipy._lib.array_api_compat.numpy._aliases.asarray functools.partial copyreg._reconstructor
    """.split())
EXACT = EXACT_NAMES
# Fitted scikit-learn models keep these (FeatureAgglomeration's pooling function, BisectingKMeans's
# solver, SplineTransformer's splines, and HistGradientBoosting's check of its numerical columns,
# `partial(check_array, ...)`, whenever it has categorical features): pure functions and data.
# Two names of deny-floor modules are admitted. functools.partial only binds arguments to a
# callable the pickle had to load through this list, and calling it later does what a REDUCE of
# that callable could already do during the load. copyreg._reconstructor is how protocols 0 and 1 rebuild
# a plain object (every estimator): the unpickler lets it build only an allowed class on a builtin base
# (`Guard._reconstruct`), which is what protocol 2's NEWOBJ does.
FLOOR_EXCEPTIONS = frozenset({"functools.partial", "copyreg._reconstructor"})

# Frameworks whose objects (the Boosters and scikit-learn wrappers admitted above) carry a native model
# in their pickled state. The unpickler builds them with `__new__` and sets their state, never calls
# them (their constructors read model files by path and parse them), and hands that state to their
# adapter's `check_state`, when it has one, before their `__setstate__` gives it to the framework.
NATIVE_STATE = frozenset({"xgboost", "lightgbm"})


def unchecked_native(kind: type, where: str) -> UntrustedContentError:
    """The refusal of an object of a NATIVE_STATE framework that no installed adapter can check."""
    return UntrustedContentError(
        f"{where}: a {kind.__qualname__} carries a native model whose structure only its adapter can check, and "
        "none is installed that does; install it (mlpersist[xgboost], or mlpersist-lightgbm from "
        "examples/adapters) or pass trusted=True", [f"{kind.__module__}.{kind.__qualname__}"])

# Packages whose classes are judged by rule_allows (they are imported only to look the name up).
RULE_ROOTS = frozenset({"sklearn", "numpy", "scipy"})
# Compiled modules that some Cython 3.1 builds (scikit-learn 1.7's wheels among them) name by their last
# part alone: their classes' __module__, and so their pickles, say `_loss` for `sklearn._loss._loss`. Each
# short name stands for the module beside it, which is what gets imported and judged (the short one never is).
CYTHON_SHORT_NAMES = {"_loss": "sklearn._loss._loss", "_cyutility": "sklearn._cyutility",
                      "_csparsetools": "scipy.sparse._csparsetools", "_moduleTNC": "scipy.optimize._moduleTNC",
                      "_ni_label": "scipy.ndimage._ni_label"}

_PYX = "__pyx_unpickle_"
_SKLEARN_FUNCTION_MODULES = ("sklearn.metrics.", "sklearn.feature_selection._univariate_selection",
                             "sklearn.feature_selection._mutual_info")
_SCIPY_CLASS_MODULES = ("scipy.sparse.", "scipy.stats._distn_infrastructure", "scipy.stats._continuous_distns",
                        "scipy.stats._discrete_distns")


def module_of(obj: Any) -> str:
    """The module `obj` says it comes from, with a Cython short name spelled out in full."""
    module = str(getattr(obj, "__module__", None) or "")
    return CYTHON_SHORT_NAMES.get(module, module)


def denied(module: str, name: str) -> bool:
    """True for names on the deny-floor: no `allow=` admits them."""
    if f"{module}.{name}" in FLOOR_EXCEPTIONS:
        return False
    parts = module.split(".")
    if any(".".join(parts[:i]) in DENY_MODULES for i in range(1, len(parts) + 1)):
        return True
    dunder_builtin = module == "builtins" and name.startswith("__")
    return dunder_builtin or f"{module}.{name}" in DENY_NAMES


def rule_allows(module: str, name: str, obj: Any) -> bool:
    """Judge a class or function of a trusted package (already looked up, never called)."""
    root = module.partition(".")[0]
    if name.startswith(_PYX) and callable(obj):  # Cython's pickle helper: allowed with its class
        cls = getattr(sys.modules.get(module), name[len(_PYX):], None)
        return isinstance(cls, type) and rule_allows(module, cls.__name__, cls)
    if root == "sklearn":
        if name == "newObj":  # Cython helper (neighbors, dist_metrics): obj.__new__(obj) on an allowed class
            return callable(obj) and module_of(obj) == module
        if isinstance(obj, type):
            return module_of(obj).startswith("sklearn.")
        return (isinstance(obj, FunctionType) and obj.__module__ == module
                and module.startswith(_SKLEARN_FUNCTION_MODULES))
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, np.ufunc):  # numpy and scipy.special ufuncs: pure maths
        return root == "numpy" or module.startswith("scipy.special")
    if root == "numpy":
        if not isinstance(obj, type) or np is None or issubclass(obj, np.memmap):
            return False
        return issubclass(obj, (np.generic, np.dtype)) or obj.__module__.startswith("numpy.random.")
    if root == "scipy":
        return isinstance(obj, type) and module_of(obj).startswith(_SCIPY_CLASS_MODULES)
    return False


def _checked_scalar(real: Callable[..., Any]) -> Callable[..., Any]:
    def scalar(dtype: Any, *args: Any) -> Any:
        # numpy.core.multiarray.scalar with an object dtype dereferences raw bytes (numpy #28316).
        if getattr(dtype, "hasobject", True):
            raise UntrustedContentError("a numpy scalar with an object dtype is refused: it reads raw memory",
                                        ["numpy._core.multiarray.scalar"])
        return real(dtype, *args)
    return scalar


_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "numpy.core.multiarray.scalar": _checked_scalar,
    "numpy._core.multiarray.scalar": _checked_scalar,
}
_wrapped: dict[str, Any] = {}


def wrap(full: str, obj: Any) -> Any:
    """Return `obj`, or the checking wrapper registered for it (one per name, kept for identity)."""
    if full not in _WRAPPERS:
        return obj
    if full not in _wrapped:
        _wrapped[full] = _WRAPPERS[full](obj)
    return _wrapped[full]
