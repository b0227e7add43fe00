"""Rebuilding a torch module from its artifact: constructor arguments found, recorded as JSON, and checked."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from mlpersist import PersistError
from mlpersist._capture import INIT_ATTR
from mlpersist._policy import denied
from mlpersist.errors import CorruptArtifactError, UntrustedContentError

_warned: set[type] = set()


def init_spec(model: Any, explicit: Mapping[str, Any] | None) -> tuple[Any, bool]:
    """Find how to rebuild the module and prove it gives the same parameter names and shapes.

    Returns `{"init": kwargs}` (the class called with recorded arguments) or `{"arch": tree}` (torch's
    containers, rebuilt child by child), and whether the rebuild works on the meta device.
    """
    cls = type(model)
    try:
        if explicit is None and type(model) in _CONTAINERS:
            encoded: Any = {"arch": _arch(model)}
        else:
            encoded = {"init": encode(dict(explicit) if explicit is not None else _found_kwargs(model))}
        for meta in (True, False):
            try:
                with torch.device("meta" if meta else "cpu"):
                    rebuilt = _construct(cls, encoded)
            except Exception:
                if meta:
                    continue
                raise
            if _shapes(rebuilt) == _shapes(model):
                return encoded, meta
            break
    except (TypeError, ValueError, LookupError):
        pass
    if cls not in _warned:
        _warned.add(cls)
        warnings.warn(f"mlpersist could not find constructor arguments that rebuild {cls.__qualname__} with the "
                      "same parameters; loading it will need a template: load_any(path, model=YourNet(...)). "
                      "Pass init_kwargs={...} to save_any, or decorate the class with @mlpersist.capture_init",
                      UserWarning, stacklevel=4)
    return None, False


def _found_kwargs(model: Any) -> dict[str, Any]:
    cls = type(model)
    sig = inspect.signature(cls.__init__)
    captured = model.__dict__.get(INIT_ATTR)
    if captured is not None and captured[0] is cls:
        bound = sig.bind(model, *captured[1], **captured[2])
        args = dict(bound.arguments)
        args.pop(next(iter(sig.parameters)))
        for p in sig.parameters.values():  # **kwargs arrive as one dict: spread them again
            if p.kind is p.VAR_KEYWORD and p.name in args:
                args.update(args.pop(p.name))
            elif p.kind is p.VAR_POSITIONAL and p.name in args:
                raise TypeError("*args cannot be recorded by name")
        return args
    if cls in _RNNS:  # __init__(self, *args, **kwargs): the arguments are read back by the names torch documents
        names = (*_RNN_ARGS, *(("proj_size",) if cls is torch.nn.LSTM else ()),
                 *(("nonlinearity",) if cls is torch.nn.RNN else ()))
        return {name: model.__dict__[name] for name in names}
    found = {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in model.__dict__:  # plain attributes of an nn.Module live in its __dict__
            found[p.name] = model.__dict__[p.name]
        elif p.name in model._parameters and isinstance(p.default, bool):  # bias=True/False flags
            found[p.name] = model._parameters[p.name] is not None
        elif p.default is p.empty:
            raise LookupError(p.name)
    return found


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
_RNNS = (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU)  # these classes exactly: a subclass has its own signature
_RNN_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


def _arch(m: Any) -> dict[str, Any]:
    """Describe torch's containers child by child; any other module by its recorded arguments."""
    cls = type(m)
    node: dict[str, Any] = {"class": f"{cls.__module__}:{cls.__qualname__}"}
    if cls in _CONTAINERS:
        node["children"] = {name: _arch(child) for name, child in m.named_children()}
    else:
        node["init"] = encode(_found_kwargs(m))
    return node


def _construct(cls: Any, spec: Mapping[str, Any]) -> Any:
    if "arch" in spec:
        return _build(spec["arch"])
    return cls(**decode(spec["init"]))


def _build(node: Mapping[str, Any]) -> Any:
    cls = _import_class(node.get("class"), lambda c: issubclass(c, torch.nn.Module), "a torch.nn.Module subclass")
    if "children" not in node:
        return cls(**decode(node.get("init", {})))
    children = {name: _build(child) for name, child in node["children"].items()}
    if cls is torch.nn.ModuleList:
        return cls(list(children.values()))
    return cls(children) if cls is torch.nn.ModuleDict else cls(OrderedDict(children))


def _shapes(m: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def encode(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, tuple):
        return {"__tuple__": [encode(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: encode(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        cls = type(v)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    raise TypeError(f"cannot record a {type(v).__name__} argument")


def decode(v: Any) -> Any:
    if isinstance(v, list):
        return [decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tuple__" in v:
        return tuple(decode(x) for x in v["__tuple__"])
    if "__dtype__" in v:
        dtype = getattr(torch, str(v["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptArtifactError(f"unknown torch dtype {v['__dtype__']!r}")
        return dtype
    if "__dataclass__" in v:
        cls = _import_class(v["__dataclass__"], dataclasses.is_dataclass, "a dataclass")
        return cls(**{k: decode(x) for k, x in v["fields"].items()})
    return {k: decode(x) for k, x in v.items()}


def _import_class(spec: Any, check: Any, kind: str) -> Any:
    """Import `module:QualName` only from an installed, non-stdlib module, and return it only if `check` holds."""
    module, _, qual = str(spec).partition(":")
    root = module.partition(".")[0]
    if not module or not qual or denied(module, qual.partition(".")[0]) or root in sys.stdlib_module_names:
        raise UntrustedContentError(f"the artifact names {spec!r} as its class; refusing to import it", [str(spec)])
    if module == "__main__":
        obj: Any = sys.modules.get("__main__")
    elif importlib.util.find_spec(root) is None:
        raise PersistError(f"the model class {spec} is not importable here (no module {root!r}); install the code "
                           f"that defines it, or pass a template: load_any(path, model={qual}(...))")
    else:
        obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and check(obj)):
        raise UntrustedContentError(f"{spec} is not {kind}; refusing to call it (nothing was constructed)",
                                    [str(spec)])
    return obj


def rebuild(info: Mapping[str, Any], tensors: dict[str, torch.Tensor], dev: torch.device) -> Any:
    cls = _import_class(info.get("class"), lambda c: issubclass(c, torch.nn.Module), "a torch.nn.Module subclass")
    spec = info.get("init")
    if not isinstance(spec, dict) or not ({"init", "arch"} & set(spec)):
        raise PersistError(f"{cls.__qualname__} was saved without constructor arguments that rebuild it; pass a "
                           f"template: load_any(path, model={cls.__qualname__}(...))")
    if info.get("meta_ok"):
        with torch.device("meta"):  # no random initialisation: the weights are assigned, not copied
            model = _construct(cls, spec)
        fill(model, tensors, strict=True, assign=True)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if not leftover:
            _retie(model, info.get("aliases", {}))
            return model
    with torch.device(dev):  # a buffer outside the state dict: build for real, then copy
        model = _construct(cls, spec)
    fill(model, tensors, strict=True)
    return model


def fill(model: Any, tensors: Any, *, strict: bool, assign: bool = False) -> None:
    """`model.load_state_dict`, its refusal of weights that do not fit the module a typed error.

    They do not fit when the class changed since the model was saved (a layer added, a width changed),
    when a template of another shape is given, or when the file was crafted.

    Raises:
        mlpersist.errors.CorruptArtifactError: naming the missing, unexpected and misshapen weights.

    """
    try:
        model.load_state_dict(tensors, strict=strict, assign=assign)
    except (RuntimeError, TypeError) as exc:  # TypeError: a bare file that holds no state dict
        why = " ".join(str(exc).split())[:600]
        raise CorruptArtifactError(
            f"the saved weights do not fit {type(model).__qualname__} as it is defined now ({why}); if its class "
            "changed since the model was saved, load it with the version it was saved with, or give a matching "
            "model= (strict=False loads the weights that do fit)") from exc


def _retie(model: Any, aliases: Mapping[str, str]) -> None:
    """assign=True gives each name its own Parameter: point aliases back at the one they were tied to."""
    for alias, canonical in aliases.items():
        owner_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        target = model.get_parameter(canonical) if attr in owner._parameters else model.get_buffer(canonical)
        setattr(owner, attr, target)
