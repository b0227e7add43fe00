"""Rebuilding a torch module from its artifact: constructor arguments found, recorded as JSON, and checked."""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import importlib.util
import inspect
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch.nn.modules import module as torch_module

from mlpersist import PersistError
from mlpersist._capture import INIT_ATTR
from mlpersist._policy import denied
from mlpersist.adapters._torch_hooks import base_class, reapply, refresh
from mlpersist.errors import CorruptArtifactError, UntrustedContentError

_warned: set[type] = set()


def init_spec(model: Any, explicit: Mapping[str, Any] | None, reapplied: list[Any],
              state: Mapping[str, Any]) -> tuple[Any, bool]:
    """Find how to rebuild the module and prove it gives the same parameter names and shapes.

    Returns `{"init": kwargs}` (the class called with recorded arguments) or `{"arch": tree}` (torch's
    containers, rebuilt child by child), and whether the rebuild works on the meta device. `reapplied`: what
    pruning and norms did to it after it was built (`_torch_hooks.found`), done again as a load will.
    `state`: `model.state_dict(keep_vars=True)`, the module's own tensor objects.
    """
    cls = base_class(model)
    names = _STATE_NAMES.set({id(t): name for name, t in state.items()})
    weights = _WEIGHTS.set({name: t.detach() for name, t in state.items()})
    try:
        if explicit is None and cls in _CONTAINERS:
            encoded: Any = {"arch": _arch(model)}
        else:
            encoded = {"init": encode(dict(explicit) if explicit is not None else _found_kwargs(model))}
        for meta in (True, False):
            try:
                with torch.device("meta" if meta else "cpu"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the user saw the class's own warnings when they built it
                    rebuilt = _construct(cls, encoded)
                    reapply(rebuilt, reapplied)
            except Exception:
                if meta:
                    continue
                raise
            if _shapes(rebuilt) == _shapes(model):
                return encoded, meta
            if not meta:
                break  # on meta, a parametrization may not make all it makes for real (orthogonal's base)
    except Exception:  # the save goes on without them, as the contract says: loading will need a template
        pass
    finally:
        _STATE_NAMES.reset(names)
        _WEIGHTS.reset(weights)
    if cls not in _warned:
        _warned.add(cls)
        warnings.warn(f"mlpersist could not find constructor arguments that rebuild {cls.__qualname__} with the "
                      "same parameters; loading it will need a template: load_any(path, model=YourNet(...)). "
                      "Pass init_kwargs={...} to save_any, or decorate the class with @mlpersist.capture_init",
                      UserWarning, stacklevel=4)
    return None, False


def _found_kwargs(model: Any) -> dict[str, Any]:
    cls = base_class(model)
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
        own = _STATE_NAMES.get()  # a tensor argument the module keeps in its state dict, as it was given
        return {k: Slot.of(v) if isinstance(v, torch.Tensor) and id(v) in own else v for k, v in args.items()}
    reader = _READERS.get(cls)
    if reader is not None:  # torch's own classes that keep their arguments under other names
        return reader(model)
    found: dict[str, Any] = {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in model.__dict__:  # plain attributes of an nn.Module live in its __dict__
            found[p.name] = model.__dict__[p.name]
        elif p.name in model._modules and (p.default is p.empty or p.default is None):  # kept under its name
            found[p.name] = model._modules[p.name]
        elif p.name in model._parameters and isinstance(p.default, bool):  # bias=True/False flags
            found[p.name] = model._parameters[p.name] is not None
        elif (isinstance(state := model._buffers.get(p.name, model._parameters.get(p.name)), torch.Tensor)
              and id(state) in _STATE_NAMES.get() and (p.default is p.empty or p.default is None)):
            found[p.name] = Slot.of(state)  # e.g. a loss's class `weight`: a buffer, its values in the weights
        elif p.default is p.empty:
            raise LookupError(p.name)
    return found


@dataclasses.dataclass(frozen=True)
class Slot:
    """A constructor argument that is one of the module's own tensors: recorded by its name in the state dict.

    The weights file holds it, so the rebuild is given those very values (a copy of them), as the class was
    when it was built: what its constructor computes from them (a sum kept as a number) comes out the same.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> Slot:
        key = _STATE_NAMES.get().get(id(t))
        if key is None:
            raise TypeError("a tensor argument outside the state dict cannot be recorded (its values are in no file)")
        return cls(key, tuple(t.shape), t.dtype)


# while one module's arguments are found: its state dict's tensors by id; while one is built: its weights by name
_NOTHING: Mapping[Any, Any] = MappingProxyType({})
_STATE_NAMES: contextvars.ContextVar[Mapping[int, str]] = contextvars.ContextVar("state_names", default=_NOTHING)
_WEIGHTS: contextvars.ContextVar[Mapping[str, torch.Tensor]] = contextvars.ContextVar("weights", default=_NOTHING)


def _rnn(m: Any) -> dict[str, Any]:
    """__init__(self, *args, **kwargs): the arguments are read back by the names torch documents them by."""
    names = (*_RNN_ARGS, *(("proj_size",) if type(m) is torch.nn.LSTM else ()),
             *(("nonlinearity",) if type(m) is torch.nn.RNN else ()))
    return {name: m.__dict__[name] for name in names}


def _activation(m: Any) -> Any:
    """A transformer layer keeps `activation="relu"/"gelu"` as the function itself; a module is recorded as one."""
    act = m.activation
    if isinstance(act, torch.nn.Module):
        return act
    named = {torch.nn.functional.relu: "relu", torch.nn.functional.gelu: "gelu"}
    if act in named:
        return named[act]
    raise TypeError("a transformer layer's activation function cannot be recorded (give a torch.nn module)")


def _layer(m: Any) -> dict[str, Any]:
    """TransformerEncoderLayer / TransformerDecoderLayer: their arguments, read back from the layers they made."""
    return {"d_model": m.self_attn.embed_dim, "nhead": m.self_attn.num_heads,
            "dim_feedforward": m.linear1.out_features, "dropout": m.dropout.p, "activation": _activation(m),
            "layer_norm_eps": m.norm1.eps, "batch_first": m.self_attn.batch_first, "norm_first": m.norm_first,
            "bias": m.linear1.bias is not None}


def _stack(m: Any) -> dict[str, Any]:
    """TransformerEncoder / TransformerDecoder: its layers are clones of the one layer it was given."""
    if type(m) is torch.nn.TransformerEncoder:
        return {"encoder_layer": m.layers[0], "num_layers": m.num_layers, "norm": m.norm,
                "enable_nested_tensor": m.enable_nested_tensor, "mask_check": m.mask_check}
    return {"decoder_layer": m.layers[0], "num_layers": m.num_layers, "norm": m.norm}


def _params(m: Any) -> dict[str, Any]:
    """ParameterList / ParameterDict: their tensors as slots (anything else they hold cannot be recorded)."""
    if isinstance(m, torch.nn.ParameterList):
        return {"values": [_slot(v) for v in m]}
    return {"parameters": {k: _slot(v) for k, v in m.items()}}


def _slot(v: Any) -> Slot:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"cannot record a {type(v).__name__} held in a parameter container")
    return Slot.of(v)


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
_RNN_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
# these classes exactly: a subclass has its own signature
_READERS: dict[type, Callable[[Any], dict[str, Any]]] = {
            torch.nn.RNN: _rnn, torch.nn.LSTM: _rnn, torch.nn.GRU: _rnn,
            torch.nn.TransformerEncoderLayer: _layer, torch.nn.TransformerDecoderLayer: _layer,
            torch.nn.TransformerEncoder: _stack, torch.nn.TransformerDecoder: _stack,
            torch.nn.Transformer: lambda m: {"d_model": m.d_model, "nhead": m.nhead, "batch_first": m.batch_first,
                                             "custom_encoder": m.encoder, "custom_decoder": m.decoder},
            torch.nn.ParameterList: _params, torch.nn.ParameterDict: _params,
            torch.nn.AdaptiveLogSoftmaxWithLoss: lambda m: {  # its `cutoffs` end with n_classes, appended
                "in_features": m.in_features, "n_classes": m.n_classes, "cutoffs": list(m.cutoffs[:-1]),
                "div_value": m.div_value, "head_bias": m.head_bias}}


def _arch(m: Any) -> dict[str, Any]:
    """Describe torch's containers child by child; any other module by its recorded arguments."""
    cls = base_class(m)
    node: dict[str, Any] = {"class": f"{cls.__module__}:{cls.__qualname__}"}
    if cls in _CONTAINERS:
        node["children"] = {name: _arch(child) for name, child in m.named_children()}
    else:
        node["init"] = encode(_found_kwargs(m))
    return node


def _construct(cls: Any, spec: Mapping[str, Any]) -> Any:
    if "arch" in spec:
        return _build(spec["arch"])
    return _call(cls, decode(spec["init"], build=True))


def _call(cls: Any, kwargs: Any) -> Any:
    """`cls(**kwargs)`, once counts of copies it would make are found to fit the weights file."""
    counts = _CLONE_COUNTS.get(cls, ()) if isinstance(kwargs, Mapping) else ()
    held = len(_WEIGHTS.get())
    for name in counts:
        n = kwargs.get(name)
        if n is not None and (type(n) is not int or n > held):
            raise _Overbuilt(f"{cls.__qualname__} is recorded with {name}={n!r}, more layers than its "
                             f"weights file holds tensors ({held}): the manifest's arguments were changed")
    return cls(**kwargs)


# torch's classes that deep-copy a layer a counted number of times, before any of the copies is registered (each
# copy holds at least one weight); 20,000 layers of a small encoder took 35 s and 0.9 GB to build on meta
_CLONE_COUNTS: dict[type, tuple[str, ...]] = {
    torch.nn.TransformerEncoder: ("num_layers",), torch.nn.TransformerDecoder: ("num_layers",),
    torch.nn.Transformer: ("num_encoder_layers", "num_decoder_layers")}


class _Stop(BaseException):
    """Raised by the registration count, through the constructor, to `_bounded`."""


class _Overbuilt(CorruptArtifactError):
    """The recorded arguments ask for more than the weights file can account for: not to be built at all."""


def _bounded(build: Callable[[], Any], cls: type, tensors: Mapping[str, torch.Tensor]) -> Any:
    """`build()`, stopped once it registers more than 4 modules, parameters or buffers per weight, plus 4,096.

    A loop in a constructor, run with a count from the manifest, ends there, whatever it builds. torch's
    global registration hooks do the counting; they are installed for this build only, and count only in
    its context (another thread's modules pass through them uncounted).
    """
    limit = 4 * len(tensors) + 4096
    left = [limit]
    token = _BUDGET.set(left)

    def count(*_: Any) -> None:
        if _BUDGET.get() is left:
            left[0] -= 1
            if left[0] < 0:
                raise _Stop  # not an Exception: a constructor's `except Exception` does not keep its loop going

    handles = [torch_module.register_module_module_registration_hook(count),
               torch_module.register_module_parameter_registration_hook(count),
               torch_module.register_module_buffer_registration_hook(count)]
    try:
        model = build()
        if left[0] < 0:  # a bare `except:` in the constructor caught it and went on
            raise _Stop
        return model
    except _Stop:
        raise _Overbuilt(f"{cls.__qualname__} as recorded registers more than {limit} modules, parameters and "
                         f"buffers, for a weights file of {len(tensors)} tensors: the manifest's arguments were "
                         f"changed (or give a template: load_any(path, model={cls.__qualname__}(...)))") from None
    finally:
        for handle in handles:
            handle.remove()
        _BUDGET.reset(token)


_BUDGET: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("mlpersist_torch_budget", default=None)


def _build(node: Any) -> Any:
    if not isinstance(node, Mapping):
        raise CorruptArtifactError(f"a module in the recorded constructor arguments is {node!r}, not a description")
    cls = _import_class(node.get("class"), lambda c: issubclass(c, torch.nn.Module), "a torch.nn.Module subclass")
    if "children" not in node:
        return _call(cls, decode(node.get("init", {}), build=True))
    children = {name: _build(child) for name, child in node["children"].items()}
    if cls is torch.nn.ModuleList:
        return cls(list(children.values()))
    return cls(children) if cls is torch.nn.ModuleDict else cls(OrderedDict(children))


def _shapes(m: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def encode(v: Any) -> Any:
    """Constructor arguments as JSON: tuples, dtypes, dataclasses, modules and the module's own tensors tagged."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Slot):
        return {"__tensor__": {"key": v.key, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}}
    if isinstance(v, torch.nn.Module):  # another module's arguments, or a container's children
        return {"__module__": _arch(v)}
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


def decode(v: Any, *, build: bool = False) -> Any:
    """`encode` undone.

    Modules and tensors are built only for a constructor (`build=True`): modules on the meta device first, where
    no size in the artifact allocates anything before the weights are found to fit; a tensor as a copy of the
    weight it names (`Slot`).
    """
    if isinstance(v, list):
        return [decode(x, build=build) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tuple__" in v:
        return tuple(decode(x, build=build) for x in v["__tuple__"])
    if "__dtype__" in v:
        return _dtype(v["__dtype__"])
    if "__dataclass__" in v:
        cls = _import_class(v["__dataclass__"], dataclasses.is_dataclass, "a dataclass")
        return cls(**{k: decode(x, build=build) for k, x in v["fields"].items()})
    if build and "__module__" in v:
        return _build(v["__module__"])
    if build and "__tensor__" in v:
        t = v["__tensor__"]
        shape = t.get("shape") if isinstance(t, dict) else None
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise CorruptArtifactError(f"a recorded tensor argument has shape {shape!r}, not a list of sizes")
        dtype, weight = _dtype(t.get("dtype")), _WEIGHTS.get().get(t.get("key"))
        if weight is None or list(weight.shape) != shape or weight.dtype != dtype:
            raise CorruptArtifactError(f"a tensor argument is recorded as the weight {t.get('key')!r} of shape "
                                       f"{shape} and {dtype}, which the weights file does not hold")
        return weight.clone()  # the constructor may change what it is given in place
    if {"__module__", "__tensor__"} & set(v):
        raise CorruptArtifactError(f"a module or tensor is recorded outside constructor arguments: {sorted(v)}")
    return {k: decode(x, build=build) for k, x in v.items()}


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptArtifactError(f"unknown torch dtype {name!r}")
    return dtype


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
    token = _WEIGHTS.set(tensors)  # what a tensor argument is built from
    try:
        return _rebuilt(cls, spec, info, tensors, dev)
    finally:
        _WEIGHTS.reset(token)


def _rebuilt(cls: Any, spec: Mapping[str, Any], info: Mapping[str, Any], tensors: dict[str, torch.Tensor],
             dev: torch.device) -> Any:
    model: Any = None
    filling = False
    try:  # no random initialisation: the weights are assigned, not copied
        with torch.device("meta"):
            model = _bounded(lambda: _construct(cls, spec), cls, tensors)
            reapply(model, info.get("reapplied"))
        filling = True
        fill(model, tensors, strict=True, assign=True)  # refused here, before the artifact's sizes allocate anything
    except Exception as exc:
        # Built for real below when meta could not do it all (a class that builds only for real; orthogonal's
        # right_inverse, which reads values) and the saved module said so, unless it is larger than the file:
        # its sizes come from the manifest.
        if isinstance(exc, _Overbuilt):
            raise  # the recorded arguments ask for more than the file holds: not to be built for real either
        too_big = model is not None and _larger(model, tensors)
        if too_big and not filling:
            raise CorruptArtifactError(f"{cls.__qualname__} as recorded holds more numbers than its weights file: "
                                       "the manifest's arguments were changed") from exc
        if info.get("meta_ok") or too_big:
            if isinstance(exc, PersistError):
                raise  # fill's names the weights that do not fit
            raise _unbuildable(cls, exc) from exc
    else:
        if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            _retie(model, info.get("aliases", {}))
            refresh(model)
            return model
    try:
        with torch.device(dev):  # the class cannot be built on meta, or keeps a buffer outside the state dict
            model = _bounded(lambda: _construct(cls, spec), cls, tensors)
            reapply(model, info.get("reapplied"))
    except PersistError:
        raise
    except Exception as exc:
        raise _unbuildable(cls, exc) from exc
    fill(model, tensors, strict=True)
    refresh(model)
    return model


def _larger(model: Any, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a module built on meta holds more numbers than the weights file.

    Pruning, norms and parametrizations only add tensors beside the ones they act on.
    """
    built: int = sum(t.numel() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    held: int = sum(t.numel() for t in tensors.values())
    return built > held


def _unbuildable(cls: type, exc: Exception) -> CorruptArtifactError:
    """The class refused the recorded arguments: it changed since the save (a version), or they were edited."""
    why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return CorruptArtifactError(
        f"{cls.__qualname__} could not be built from the arguments recorded when it was saved ({why}); if its "
        f"class changed since, load it where the versions it was saved with are installed, or give a template: "
        f"load_any(path, model={cls.__qualname__}(...))")


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
