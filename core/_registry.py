"""Adapters known by import string: data, not code, until a model of theirs is saved or loaded."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ._record import Record
from .errors import MissingFrameworkError, PersistError

if TYPE_CHECKING:
    from ._payload import Payload

ENTRY_POINT_GROUP = "mlpersist.adapters"


@runtime_checkable
class Adapter(Protocol):
    """What every adapter provides: the same verbs for every framework.

    `save` writes payload files into `dest` (a fresh, empty directory) and returns the JSON-able
    facts `load` needs, stored as the manifest's `info`. `load` gets a `Payload` whose files the
    core has already checked against the manifest, and rebuilds the model.
    """

    name: ClassVar[str]
    format_version: ClassVar[int]

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]: ...

    def load(self, payload: Payload, info: Mapping[str, Any], **options: Any) -> Any: ...


class AdapterSpec(Record):
    """How to find an adapter without importing it."""

    target: str                  # "module:Class", imported on first use
    claims: tuple[str, ...]      # top-level modules whose classes this adapter saves
    extra: str                   # the mlpersist extra named in MissingFrameworkError ("" for none)
    package: str                 # the distribution whose version the manifest records
    formats: tuple[str, ...]     # formats it writes; the first is the default
    # bare files it reads: (magic prefix | "zip:<member suffix>" | "probe:<name>" | "dir:<file in a directory>",
    # format, payload name)
    sniff: tuple[tuple[bytes | str, str, str], ...]
    # bare files it reads by name when no magic prefix matched (pickle protocols 0 and 1 have none)
    suffixes: tuple[tuple[str, str, str], ...]
    alt_packages: tuple[str, ...]  # other distributions of the same framework (xgboost-cpu)

    # positional, in field order, as the dataclass this replaced was called
    def __init__(  # noqa: PLR0917
        self, target: str, claims: tuple[str, ...], extra: str, package: str, formats: tuple[str, ...] = (),
        sniff: tuple[tuple[bytes | str, str, str], ...] = (), suffixes: tuple[tuple[str, str, str], ...] = (),
        alt_packages: tuple[str, ...] = ()) -> None:
        self._init(target=target, claims=claims, extra=extra, package=package, formats=formats, sniff=sniff,
                   suffixes=suffixes, alt_packages=alt_packages)


_BUILTIN: dict[str, AdapterSpec] = {  # alphabetical; a test checks the order
    "keras": AdapterSpec(
        "mlpersist.adapters.keras:KerasAdapter", ("keras",), "keras", "keras", ("keras", "export"),
        (("zip:config.json", "keras", "model.keras"), (b"\x89HDF\r\n\x1a\n", "h5", "model.h5"),
         ("dir:saved_model.pb", "export", "export"))),
    "sklearn": AdapterSpec(
        "mlpersist.adapters.sklearn:SklearnAdapter", ("sklearn",), "sklearn", "scikit-learn", ("joblib", "pickle"),
        # pickle protocols 2-5, then joblib's compressed containers (zlib, gzip, bz2, xz, lzma, lz4)
        tuple((b"\x80" + bytes([p]), "joblib", "model.joblib") for p in (2, 3, 4, 5))
        + tuple((m, "joblib", "model.joblib") for m in (b"\x78", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00",
                                                         b"\x04\x22\x4d\x18")),
        tuple((s, "joblib", "model.joblib") for s in (".pkl", ".pickle", ".joblib", ".sav"))),
    "torch": AdapterSpec(
        "mlpersist.adapters.torch:TorchAdapter", ("torch",), "torch", "torch", ("safetensors", "torchscript", "export"),
        (("zip:/data.pkl", "state_dict", "weights.pt"), ("probe:safetensors", "safetensors", "weights.safetensors"),
         # torch's legacy format (`_use_new_zipfile_serialization=False`): a pickle of its magic number first,
         # in protocol 2-3, or 4-5 with a frame header (joblib would read that number alone)
         *((b"\x80" + bytes([p]) + frame + b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.", "state_dict", "weights.pt")
           for p, frame in ((2, b""), (3, b""), (4, b"\x95\r" + bytes(7)), (5, b"\x95\r" + bytes(7))))),
        ((".safetensors", "safetensors", "weights.safetensors"),)),
    "xgboost": AdapterSpec(
        "mlpersist.adapters.xgboost:XGBoostAdapter", ("xgboost",), "xgboost", "xgboost", ("ubj", "json"),
        # UBJSON: '{', the key length (XGBoost writes it as int64 'L'), then "learner"; or JSON
        ((b"{L" + bytes(7) + b"\x07learner", "ubj", "model.ubj"), (b"{U\x07learner", "ubj", "model.ubj"),
         (b"{i\x07learner", "ubj", "model.ubj"), (b'{"learner"', "json", "model.json")),
        ((".ubj", "ubj", "model.ubj"),), ("xgboost-cpu",)),
}
_specs: dict[str, AdapterSpec] = dict(_BUILTIN)
specs = MappingProxyType(_specs)  # read-only view; only register_adapter writes _specs
_instances: dict[str, Adapter] = {}
_entry_points_read = False


class AdapterInfo(Record):
    """One row of `list_adapters()`."""

    name: str
    framework: str
    formats: tuple[str, ...]
    installed: bool
    target: str

    def __init__(self, name: str, framework: str, formats: tuple[str, ...], installed: bool, target: str) -> None:
        self._init(name=name, framework=framework, formats=formats, installed=installed, target=target)


def register_adapter(name: str, target: str, *, claims: tuple[str, ...] | list[str] = (),
                     extra: str | None = None, package: str | None = None,
                     formats: tuple[str, ...] | list[str] = (), replace: bool = False) -> None:
    """Add an adapter without editing mlpersist.

    Args:
        name: the adapter's name, recorded in every manifest it writes.
        target: `"module:Class"` of the adapter class, imported on first use.
        claims: top-level modules whose classes it saves (default: `(name,)`).
        extra: the mlpersist extra named when its framework is missing (default: none).
        package: the distribution whose version is recorded (default: the first claim).
        formats: formats it writes, the default first.
        replace: allow taking over a name or claim already registered.

    Raises:
        mlpersist.errors.PersistError: the name or a claim is taken and `replace` is false.

    """
    _read_entry_points()
    claims = tuple(claims) or (name,)
    if ":" not in target:
        raise PersistError(f"adapter target {target!r} should be 'module:Class'")
    if not replace:
        if name in _specs:
            raise PersistError(f"adapter name {name!r} is taken by {_specs[name].target}; pass replace=True")
        taken = _claim_table()
        for c in claims:
            if c in taken:
                raise PersistError(f"module {c!r} is claimed by adapter {taken[c]!r}; pass replace=True")
    else:
        for other, spec in list(_specs.items()):
            if other != name and set(spec.claims) & set(claims):
                _specs[other] = replace_claims(spec, tuple(c for c in spec.claims if c not in claims))
    pkg = package or claims[0]
    _specs[name] = AdapterSpec(target, claims, extra or "", pkg, tuple(formats))
    _instances.pop(name, None)


def replace_claims(spec: AdapterSpec, new: tuple[str, ...]) -> AdapterSpec:
    """Return `spec` claiming only `new`."""
    return AdapterSpec(spec.target, new, spec.extra, spec.package, spec.formats, spec.sniff, spec.suffixes,
                       spec.alt_packages)


def claims() -> dict[str, str]:
    """Map each claimed top-level module to its adapter's name."""
    _read_entry_points()
    return _claim_table()


def _claim_table() -> dict[str, str]:
    """Each claimed top-level module -> its adapter's name, among the specs registered so far."""
    return {c: name for name, spec in _specs.items() for c in spec.claims}


def claimed(module: str) -> str | None:
    """The name of the adapter claiming `module`'s top-level package, or None; reads entry points only if needed.

    Entry points never take a name or a claim already taken (`_read_entry_points`), and are read before
    any `register_adapter`, so a claim found before reading them is the one found after.
    """
    top = module.partition(".")[0]
    name = _claim_table().get(top)
    return name if name is not None or _entry_points_read else claims().get(top)


def claimant(module: str, table: Mapping[str, str | None] | None = None) -> Adapter | None:
    """The adapter registered for `module`'s top-level package (imported on first use), or None.

    `table`: top-level module -> adapter name (None: none), as `claims()` gives it, when the caller asks
    for many objects in one go.
    """
    name = claimed(module) if table is None else table.get(module.partition(".")[0])
    if name is None or get_spec(name) is None:
        return None
    return get_adapter(name)


def get_spec(name: str) -> AdapterSpec | None:
    """Return the spec registered under `name`, reading entry points first if no spec has that name."""
    if name not in _specs:
        _read_entry_points()
    return _specs.get(name)


def get_adapter(name: str) -> Adapter:
    """Import and instantiate the adapter `name` (once).

    Raises:
        mlpersist.errors.MissingFrameworkError: its framework is not installed.
        mlpersist.errors.PersistError: no such adapter is registered.

    """
    if name in _instances:
        return _instances[name]
    spec = get_spec(name)
    if spec is None:
        known = ", ".join(sorted(_specs))
        raise PersistError(f"no adapter named {name!r} is registered (known: {known}); "
                           "install the package that provides it, or register_adapter() it")
    module_name, _, attr = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in spec.claims:
            raise missing_framework(spec) from exc
        raise
    adapter = getattr(module, attr)()
    _instances[name] = adapter
    return adapter  # type: ignore[no-any-return]


def missing_framework(spec: AdapterSpec, version: str | None = None) -> MissingFrameworkError:
    """Build the error that names the exact install line."""
    version = None if version == "unknown" else version
    pin = f"=={version}" if version else ""
    alt = f"  (or pip install 'mlpersist[{spec.extra}]')" if spec.extra else ""
    return MissingFrameworkError(
        f"{spec.package}{' ' + version if version else ''} is needed and is not installed; "
        f"run: pip install '{spec.package}{pin}'{alt}")


def installed(spec: AdapterSpec) -> bool:
    """True when every module the adapter claims can be imported (imports nothing)."""
    return all(sys.modules[c] is not None if c in sys.modules else importlib.util.find_spec(c) is not None
               for c in spec.claims)


def list_adapters() -> list[AdapterInfo]:
    """Every known adapter, its framework, formats, and whether the framework is installed."""
    _read_entry_points()
    return [AdapterInfo(n, s.package, s.formats, installed(s), s.target) for n, s in sorted(_specs.items())]


def _read_entry_points() -> None:
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    from importlib.metadata import entry_points

    taken = _claim_table()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _specs and ep.name not in taken:  # stored as a string: never loaded until used
            _specs[ep.name] = AdapterSpec(ep.value, (ep.name,), "", ep.name)
