"""One model or one bundle of models, written by its adapter and read back: the recursion under save/load.

A bundle is a `dict`: each value that is a model goes to its own adapter in its own directory,
each plain JSON value stays in the manifest, each nested `dict` is a bundle again. One manifest
lists every file, so one digest check and one atomic commit cover the whole bundle.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _environment, _registry
from ._checked import held_throughout
from ._dispatch import detect
from ._manifest import BUNDLE, JSON_PART, MAX_DEPTH, Manifest, Part
from ._payload import Payload
from ._policy import TrustPolicy
from ._strictjson import check_json_value
from .errors import (
    CorruptArtifactError,
    PersistError,
    UnsupportedModelError,
    VersionMismatchError,
    VersionMismatchWarning,
)

if TYPE_CHECKING:
    from . import _example

_SAFE_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def save_part(model: Any, dest: Path, *, fmt: str | None, options: dict[str, Any], example: Any,
              prefix: str = "", where: str = "the model") -> Part:
    """Write `model` (a bundle if it is a dict) into the empty directory `dest`; return what the manifest keeps."""
    if type(model) is dict:
        return _save_bundle(model, dest, fmt=fmt, options=options, example=example, prefix=prefix, where=where)
    name, adapter, model = _adapter_of(model)
    spec = _registry.get_spec(name)
    assert spec is not None  # detect only returns registered names
    fmt = fmt or (spec.formats[0] if spec.formats else "default")
    if spec.formats and fmt not in spec.formats:
        raise PersistError(f"format {fmt!r} is not one the {name} adapter writes ({', '.join(spec.formats)})")
    if example is not None and _takes_example(adapter):
        options["example"] = example  # the adapter uses it too (torch.export traces with it)
    try:
        info = dict(adapter.save(model, dest, format=fmt, **options))
    except (PersistError, OSError):
        raise
    except Exception as exc:
        kind = type(model).__qualname__
        subject = kind if where == "the model" else f"{where} ({kind})"
        raise UnsupportedModelError(f"the {name} adapter could not save {subject} as {fmt}: "
                                    f"{type(exc).__name__}: {exc}") from exc
    info["adapter_format_version"] = adapter.format_version
    check_json_value(info, f"what the {name} adapter returned")
    stored = None
    if example is not None:
        from . import _example  # with the first example only: keeps `import mlpersist` light

        stored = _example.save(model, adapter, example, dest, where)
    cls = type(model)
    return Part(name, prefix.rstrip("/"), fmt, f"{cls.__module__}:{cls.__qualname__}", spec.package,
                _environment.framework_version(spec) or "unknown", info, stored)


def _adapter_of(model: Any) -> tuple[str, Any, Any]:
    """The adapter that saves `model`, and what it saves: the model, or what its `unwrap` hook returns.

    A runtime wrapper (`torch.compile`'s module, `DataParallel`) is saved as the model it wraps: the
    wrapper holds no state of its own to keep, and the manifest then names the wrapped class.
    """
    for _ in range(8):  # a wrapper of a wrapper: unwrap again, with the adapter claiming what came out
        name = detect(model)
        adapter = _registry.get_adapter(name)
        unwrap = getattr(adapter, "unwrap", None)
        inner = model if unwrap is None else unwrap(model)
        if inner is model:
            return name, adapter, model
        model = inner
    raise UnsupportedModelError(f"{type(model).__qualname__}: still wrapped after 8 unwraps")


def _takes_example(adapter: Any) -> bool:
    import inspect

    return "example" in inspect.signature(adapter.save).parameters


def _save_bundle(bundle: dict[Any, Any], dest: Path, *, fmt: str | None, options: dict[str, Any], example: Any,
                 prefix: str, where: str) -> Part:
    if prefix.count("/") >= MAX_DEPTH:
        raise PersistError(f"{where} nests bundles more than {MAX_DEPTH} deep; flatten it")
    if fmt not in (None, BUNDLE):
        raise PersistError(f"{where} is a bundle (a dict); its format is 'bundle', not {fmt!r}: give each part's "
                           "format through parts={key: {...}}")
    per_part = options.pop("parts", None) or {}
    if options:
        raise PersistError(f"{where} is a bundle (a dict): pass options per part, parts={{key: {{option: value}}}}, "
                           f"not {', '.join(sorted(options))}=")
    example = {} if example is None else example
    for arg, value in (("parts", per_part), ("example", example)):
        if not isinstance(value, dict) or not set(value) <= set(bundle):
            raise PersistError(f"{arg}= for {where} (a bundle) must map some of its keys "
                               f"({', '.join(map(repr, bundle))}) to per-part values")
    parts: dict[str, Part] = {}
    used: set[str] = set()
    for i, (key, value) in enumerate(bundle.items()):
        if not isinstance(key, str):
            raise PersistError(f"the keys of {where} (a bundle) must be strings, not {key!r}")
        here = _name(where, key)
        if _is_json(value):  # a dict of JSON values only stays one JSON value
            if key in per_part or key in example:
                raise PersistError(f"{here} is a plain JSON value: it takes no options and no example")
            parts[key] = Part(JSON_PART, value=value)
            continue
        sub_options = per_part.get(key) or {}
        if not isinstance(sub_options, dict):
            raise PersistError(f"parts[{key!r}] must be a dict of options for {here}")
        sub_options = dict(sub_options)
        directory = _dir_for(key, i, used)
        (dest / directory).mkdir()
        parts[key] = save_part(value, dest / directory, fmt=sub_options.pop("format", None), options=sub_options,
                               example=example.get(key), prefix=f"{prefix}{directory}/", where=here)
    return Part(BUNDLE, prefix.rstrip("/"), BUNDLE, "builtins:dict", "mlpersist", _environment.mlpersist_version(),
                {"adapter_format_version": 1, "order": list(parts)}, None, parts)


def _name(where: str, key: str) -> str:
    """How errors and check reports name a part: bundle part 'outer/inner'."""
    return f"bundle part {key!r}" if where == "the model" else f"{where[:-1]}/{key}'"


def _is_json(value: Any) -> bool:
    try:
        check_json_value(value, "")
    except PersistError:
        return False
    return True


def _dir_for(key: str, index: int, used: set[str]) -> str:
    """A readable directory for the part: its key when that is a safe file name, else part-<index>."""
    name = key if _SAFE_DIR.fullmatch(key) and key.casefold() not in {"manifest.json", "manifest.sig"} \
        else f"part-{index}"
    while name.casefold() in used:
        name += "_"
    used.add(name.casefold())
    return name


def part_of(manifest: Manifest) -> Part:
    """The manifest's top level, seen as a part at the artifact's root."""
    return Part(manifest.adapter, "", manifest.format, manifest.model_class, manifest.framework,
                manifest.framework_version, manifest.info, manifest.example, manifest.parts)


def read_whole(manifest: Manifest) -> dict[str, str]:
    """The payload files whose adapters keep them whole, as manifest names, with how (see `whole_names`).

    Asked before the files are checked, so that these are hashed as they are read into memory.
    """
    return {f"{part.dir}/{name}" if part.dir else name: kind for part in walk(part_of(manifest))
            for name, kind in whole_names(part.adapter).items()}


def whole_names(adapter: str) -> dict[str, str]:
    """An adapter's payload names kept whole at any size, each with how: "memory" or "file".

    Its `read_whole` names are kept as memory the model views (torch weights), its `read_by_path`
    ones as a sealed in-memory file a framework reads by path (Keras).

    Empty for a core part, or an adapter that cannot be had here (not registered, framework missing:
    the load itself reports that).
    """
    if adapter in (BUNDLE, JSON_PART) or _registry.get_spec(adapter) is None:
        return {}
    try:
        cls = type(_registry.get_adapter(adapter))
    except (PersistError, ImportError):
        return {}
    return {**dict.fromkeys(getattr(cls, "read_by_path", ()), "file"),
            **dict.fromkeys(getattr(cls, "read_whole", ()), "memory")}


def walk(part: Part) -> Iterator[Part]:
    """The part, then every sub-part of a bundle, depth first."""
    yield part
    for sub in part.parts.values():
        yield from walk(sub)


def adapters_in(part: Part) -> list[str]:
    """Every adapter a part and its sub-parts use, in order."""
    return [p.adapter for p in walk(part) if p.adapter not in (BUNDLE, JSON_PART)]


class LoadContext:
    """What every part of one load shares."""

    __slots__ = ("check", "policy", "report", "root", "strict")

    def __init__(self, root: Path | None, policy: TrustPolicy, strict: bool, check: float | None) -> None:
        self.root = root
        self.policy = policy
        self.strict = strict
        self.check = check  # the tolerance, or None: do not check
        self.report: list[_example.Diff] = []


def load_part(part: Part, handles: Mapping[str, BinaryIO], ctx: LoadContext, options: dict[str, Any],
              where: str = "the model") -> Any:
    """Rebuild `part` from its checked files (names relative to the part's directory)."""
    if part.adapter == BUNDLE:
        per_part = options.pop("parts", None) or {}
        if options or not isinstance(per_part, dict) or not set(per_part) <= set(part.parts):
            raise PersistError(f"{where} is a bundle of {', '.join(map(repr, part.parts))}: pass load options per "
                               f"part, parts={{key: {{option: value}}}}, not {', '.join(sorted(options)) or per_part}")
        order = part.info.get("order")
        keys = order if isinstance(order, list) and all(isinstance(k, str) for k in order) \
            and sorted(order) == sorted(part.parts) else sorted(part.parts)
        out: dict[str, Any] = {}
        for key in keys:  # the order the bundle was saved in (JSON objects are written sorted)
            sub = part.parts[key]
            here = _name(where, key)
            if sub.adapter == JSON_PART:
                out[key] = sub.value
                continue
            rel = sub.dir[len(part.dir) + 1:] if part.dir else sub.dir
            mine = {n[len(rel) + 1:]: h for n, h in handles.items() if n.startswith(rel + "/")}
            out[key] = load_part(sub, mine, ctx, dict(per_part.get(key) or {}), here)
        return out
    adapter = adapter_for(part, strict=ctx.strict)
    examples: set[str] = set()
    if part.example is not None:
        from . import _example

        examples = _example.files(part.example)
    payload = Payload({n: h for n, h in handles.items() if n not in examples}, ctx.policy,
                      ctx.root / part.dir if ctx.root is not None else None)
    with held_throughout(handles.values()):  # a file read under a lease, opened for writing meanwhile: again
        model = adapter.load(payload, part.info, format=part.format, **options)
    if ctx.check is not None and part.example is not None:
        from . import _example

        ctx.report += _example.check(model, adapter, part.example, Payload(handles, ctx.policy), tolerance=ctx.check,
                                     where=where)
    return model


def adapter_for(part: Part, *, strict: bool) -> _registry.Adapter:
    """The adapter that reads `part`: registered, its framework installed, the version compared."""
    spec = _registry.get_spec(part.adapter)
    if spec is None:
        raise CorruptArtifactError(
            f"the artifact was written by the adapter {part.adapter!r} ({part.framework} "
            f"{part.framework_version}), which is not registered here; install the package that provides it")
    if not _registry.installed(spec):
        raise _registry.missing_framework(spec, part.framework_version)
    here = _environment.framework_version(spec)
    if here is not None and part.framework_version not in (here, "unknown"):
        message = (f"the artifact was saved with {spec.package} {part.framework_version} and is loaded with "
                   f"{here}; results may differ. To match: pip install '{spec.package}=="
                   f"{part.framework_version}' (mlpersist requirements PATH lists the whole environment)")
        if strict:
            raise VersionMismatchError(message)
        warnings.warn(message, VersionMismatchWarning, stacklevel=5)  # the caller of load_any
    adapter = _registry.get_adapter(part.adapter)
    written = part.info.get("adapter_format_version", 1)
    if type(written) is not int or written > adapter.format_version:
        raise CorruptArtifactError(f"the {part.adapter} payload has format version {written!r}, newer than "
                                   f"this mlpersist reads ({adapter.format_version}); upgrade mlpersist")
    return adapter
