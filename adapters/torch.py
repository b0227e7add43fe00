"""PyTorch: weights as safetensors plus the class and its constructor arguments; rebuilt without pickle."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from mlpersist import Payload, PersistError
from mlpersist._capture import INIT_ATTR
from mlpersist._policy import denied
from mlpersist._writeback import Writeback
from mlpersist.errors import CorruptArtifactError, UntrustedContentError

WEIGHTS, OPTIMIZER = "weights.safetensors", "optimizer.safetensors"
_FILES = {"torchscript": "model.torchscript.pt", "export": "model.pt2"}
_warned: set[type] = set()


class TorchAdapter:
    """Any `torch.nn.Module`: safetensors weights, rebuilt on the meta device, no pickle on the default path."""

    name: ClassVar[str] = "torch"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("torch", "safetensors", "numpy")
    # read whole into memory as they are checked: the tensors are views of those very bytes, which no
    # later write to the file can change (a mapped file's pages would follow it)
    read_whole: ClassVar[tuple[str, ...]] = ("weights.safetensors", "optimizer.safetensors")

    def save(self, model: Any, dest: Path, *, format: str, init_kwargs: Mapping[str, Any] | None = None,
             optimizer: Any = None, extra: Any = None, example: Any = None) -> Mapping[str, Any]:
        """Write weights (and optimizer state) as safetensors, or a TorchScript / torch.export program."""
        if format != "safetensors":
            return _save_program(model, dest, format, example)
        tensors, aliases = _unique(model.state_dict())
        write_safetensors(tensors, dest / WEIGHTS)
        init, meta_ok = _init_spec(model, init_kwargs)
        cls = type(model)
        info: dict[str, Any] = {"class": f"{cls.__module__}:{cls.__qualname__}", "init": init, "meta_ok": meta_ok,
                                "aliases": aliases,
                                "frozen": [n for n, p in model.named_parameters() if not p.requires_grad]}
        if optimizer is not None:
            info["optimizer"] = _save_optimizer(optimizer, dest)
        if extra is not None:
            info["extra"] = extra
        return info

    def example_outputs(self, model: Any, args: list[Any]) -> Mapping[str, Any] | None:
        """`forward` in eval mode without gradients, on the model's device (for example= and check=)."""
        if not isinstance(model, torch.nn.Module):
            return None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        tensors = [torch.as_tensor(a).to(device) for a in args]
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return {"forward": model(*tensors)}
        finally:
            model.train(training)

    def load(self, payload: Payload, info: Mapping[str, Any], *, format: str, model: Any = None,
             device: Any = None, map_location: Any = None, training_state: bool = False,
             strict: bool = True) -> Any:
        """Rebuild the module (or fill `model`), place it on `device`, return it in eval mode."""
        dev = torch.device(device or map_location or "cpu")
        if format == "state_dict":
            return _load_bare_pt(payload, model, dev, strict)
        if format != "safetensors":
            return _load_program(payload, format, dev)
        try:
            tensors = _read_safetensors(payload, WEIGHTS, dev)
        except (RuntimeError, AssertionError) as exc:
            raise PersistError(f"cannot place the weights on {dev}: {exc}") from exc
        except Exception as exc:  # safetensors raises its own SafetensorError for malformed headers
            raise CorruptArtifactError(f"{WEIGHTS} is not valid safetensors: {exc}") from exc
        for alias, canonical in info.get("aliases", {}).items():
            tensors[alias] = tensors[canonical]
        if info.get("bare") and model is None:
            return tensors  # a bare .safetensors file: its state dict
        if model is None:
            model = _rebuild(info, tensors, dev)
        else:
            model.load_state_dict(tensors, strict=strict)
            model.to(dev)
        frozen = set(info.get("frozen", []))
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        model.eval()
        if training_state:
            opt = _load_optimizer(payload, info["optimizer"], dev) if "optimizer" in info else None
            return model, {"optimizer": opt, "extra": info.get("extra")}
        return model


_ST_DTYPES = {getattr(torch, name): code for name, code in {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}.items() if hasattr(torch, name)}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a standard safetensors file straight from each tensor's memory.

    safetensors' own `save_file` first copies every tensor into a new bytes object (1 GB more for a
    1 GB model, each page freshly faulted); this writes the same format (8-byte header length, JSON
    header, data largest element first so every tensor is aligned) from views of the tensors. Tensors
    it does not cover (another device, an exotic dtype, a big-endian machine) go through `save_file`.
    """
    if sys.byteorder != "little" or any(t.device.type != "cpu" or t.dtype not in _ST_DTYPES or t.is_sparse
                                        or not t.is_contiguous() for t in tensors.values()):
        save_file(dict(tensors), path)
        return
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "xb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        flushing = Writeback(f)  # the disk starts on each 64 MiB as soon as it is written
        for name in order:
            t = tensors[name]
            if t.numel():
                f.write(t.detach().reshape(-1).view(torch.uint8).numpy().data)  # a view of the tensor: no copy
                flushing.written()


def _unique(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of each tied tensor (recording the aliases); make the rest contiguous and unshared."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, value in state.items():
        t = value.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        shared = not t.is_contiguous() or (t.numel() and ptr in storages)  # safetensors refuses shared storage
        out[name] = t.contiguous().clone() if shared else t
        storages.add(ptr)
    return out, aliases


def _init_spec(model: Any, explicit: Mapping[str, Any] | None) -> tuple[Any, bool]:
    """Find how to rebuild the module and prove it gives the same parameter names and shapes.

    Returns `{"init": kwargs}` (the class called with recorded arguments) or `{"arch": tree}` (torch's
    containers, rebuilt child by child), and whether the rebuild works on the meta device.
    """
    cls = type(model)
    try:
        if explicit is None and type(model) in _CONTAINERS:
            encoded: Any = {"arch": _arch(model)}
        else:
            encoded = {"init": _encode(dict(explicit) if explicit is not None else _found_kwargs(model))}
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


def _arch(m: Any) -> dict[str, Any]:
    """Describe torch's containers child by child; any other module by its recorded arguments."""
    cls = type(m)
    node: dict[str, Any] = {"class": f"{cls.__module__}:{cls.__qualname__}"}
    if cls in _CONTAINERS:
        node["children"] = {name: _arch(child) for name, child in m.named_children()}
    else:
        node["init"] = _encode(_found_kwargs(m))
    return node


def _construct(cls: Any, spec: Mapping[str, Any]) -> Any:
    if "arch" in spec:
        return _build(spec["arch"])
    return cls(**_decode(spec["init"]))


def _build(node: Mapping[str, Any]) -> Any:
    cls = _import_class(node.get("class"), lambda c: issubclass(c, torch.nn.Module), "a torch.nn.Module subclass")
    if "children" not in node:
        return cls(**_decode(node.get("init", {})))
    children = {name: _build(child) for name, child in node["children"].items()}
    if cls is torch.nn.ModuleList:
        return cls(list(children.values()))
    return cls(children) if cls is torch.nn.ModuleDict else cls(OrderedDict(children))


def _shapes(m: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _encode(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        cls = type(v)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    raise TypeError(f"cannot record a {type(v).__name__} argument")


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tuple__" in v:
        return tuple(_decode(x) for x in v["__tuple__"])
    if "__dtype__" in v:
        dtype = getattr(torch, str(v["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptArtifactError(f"unknown torch dtype {v['__dtype__']!r}")
        return dtype
    if "__dataclass__" in v:
        cls = _import_class(v["__dataclass__"], dataclasses.is_dataclass, "a dataclass")
        return cls(**{k: _decode(x) for k, x in v["fields"].items()})
    return {k: _decode(x) for k, x in v.items()}


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


def _rebuild(info: Mapping[str, Any], tensors: dict[str, torch.Tensor], dev: torch.device) -> Any:
    cls = _import_class(info.get("class"), lambda c: issubclass(c, torch.nn.Module), "a torch.nn.Module subclass")
    spec = info.get("init")
    if not isinstance(spec, dict) or not ({"init", "arch"} & set(spec)):
        raise PersistError(f"{cls.__qualname__} was saved without constructor arguments that rebuild it; pass a "
                           f"template: load_any(path, model={cls.__qualname__}(...))")
    if info.get("meta_ok"):
        with torch.device("meta"):  # no random initialisation: the weights are assigned, not copied
            model = _construct(cls, spec)
        model.load_state_dict(tensors, strict=True, assign=True)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if not leftover:
            _retie(model, info.get("aliases", {}))
            return model
    with torch.device(dev):  # a buffer outside the state dict: build for real, then copy
        model = _construct(cls, spec)
    model.load_state_dict(tensors, strict=True)
    return model


def _retie(model: Any, aliases: Mapping[str, str]) -> None:
    """assign=True gives each name its own Parameter: point aliases back at the one they were tied to."""
    for alias, canonical in aliases.items():
        owner_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        target = model.get_parameter(canonical) if attr in owner._parameters else model.get_buffer(canonical)
        setattr(owner, attr, target)


def _save_optimizer(optimizer: Any, dest: Path) -> dict[str, Any]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    write_safetensors(tensors, dest / OPTIMIZER)
    return {"class": f"{type(optimizer).__module__}:{type(optimizer).__qualname__}",
            "param_groups": _encode(state["param_groups"]), "scalars": _encode(scalars)}


def _read_safetensors(payload: Payload, name: str, dev: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of `name`, viewing the very bytes the core checked (mapped from the file if it kept none)."""
    data = payload.checked_bytes(name)
    if data is None or sys.byteorder != "little":  # verify=False; safetensors data is little-endian
        return load_file(payload.local_path(name), device=str(dev))
    tensors = read_safetensors(data, name)
    if tensors is None:  # a dtype this reader does not view (complex, a newer float): safetensors copies
        tensors = load_bytes(bytes(data))
    return {k: v.to(dev) for k, v in tensors.items()}  # .to(): the tensor itself when already on `dev`


_ST_TORCH = {code: dtype for dtype, code in _ST_DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def read_safetensors(buf: Any, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors of the safetensors file in `buf` (writable bytes), as views of it; None for an unknown dtype.

    The header is checked as strictly as safetensors' own reader does: a JSON object of at most
    100 MB without duplicate names, known dtypes, shapes of non-negative integers, and data offsets
    that tile the data section exactly (in order, no gap, no overlap, to its end), each the tensor's
    size. A tensor whose offset does not suit its dtype's alignment is copied instead of viewed. A dtype
    not in `_ST_DTYPES` (complex, newer float formats) returns None: the caller has safetensors read it.

    Raises:
        mlpersist.errors.CorruptArtifactError: naming what is malformed.

    """
    def bad(why: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{what} is not valid safetensors: {why}; the file is damaged or crafted")

    n = int.from_bytes(buf[:8], "little") if len(buf) >= 8 else -1
    if not 0 <= n <= min(len(buf) - 8, _MAX_HEADER):
        raise bad(f"a header of {n} bytes declared in a file of {len(buf)}")
    try:
        header = json.loads(bytes(buf[8:8 + n]), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the header is not JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise bad("the header is not a JSON object of tensors")
    entries = []
    for name, spec in header.items():
        code = spec.get("dtype") if isinstance(spec, dict) else None
        if isinstance(code, str) and code not in _ST_TORCH:
            return None
        dtype = _ST_TORCH.get(code) if isinstance(code, str) else None
        shape, offsets = (spec.get("shape"), spec.get("data_offsets")) if isinstance(spec, dict) else (None, None)
        if dtype is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) \
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise bad(f"tensor {name!r} has a malformed entry {str(spec)[:100]}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    base, end = 8 + n, 0
    data = torch.frombuffer(buf, dtype=torch.uint8)  # the whole file; every tensor views it
    out: dict[str, torch.Tensor] = {}
    for begin, stop, name, dtype, shape in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin != end or stop - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} has data offsets {begin}..{stop}, where {end}.."
                      f"{end + math.prod(shape) * dtype.itemsize} was due")
        end = stop
        raw = data[base + begin:base + stop]
        try:
            out[name] = raw.view(dtype).reshape(shape)
        except RuntimeError:  # an offset the dtype cannot view at: copy this one
            out[name] = raw.clone().view(dtype).reshape(shape)
    if base + end != len(buf):
        raise bad(f"{len(buf) - base - end} bytes after the last tensor")
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate names")
    return out


def _load_optimizer(payload: Payload, info: Mapping[str, Any], dev: torch.device) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in _decode(info["scalars"]).items()}
    for key, value in _read_safetensors(payload, OPTIMIZER, dev).items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": _decode(info["param_groups"])}


def _load_bare_pt(payload: Payload, model: Any, dev: torch.device, strict: bool) -> Any:
    """A bare torch.save file: read with weights_only=True (never full pickle), as a state dict or into `model`."""
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 10) and not payload.policy.trusted:
        raise UntrustedContentError("torch < 2.10 has known weights_only bypasses (CVE-2025-32434, CVE-2026-24747); "
                                    "upgrade torch, or pass trusted=True for a file you trust", ["torch.load"])
    try:
        state = torch.load(payload.open("weights.pt"), map_location=dev, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for anything outside torch's weights-only allow-list
        raise UntrustedContentError(f"weights.pt holds more than tensors and containers ({exc}); torch's "
                                    "weights_only loader refused it", ["torch.load"]) from exc
    if model is None:
        return state
    model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state, strict=strict)
    return model.to(dev).eval()


def _save_program(model: Any, dest: Path, format: str, example: Any) -> dict[str, Any]:
    args = example if isinstance(example, tuple) else (example,)
    if format == "torchscript":
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; libtorch (C++) still reads it
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                program = torch.jit.script(model)
            except Exception:
                if example is None:
                    raise
                program = torch.jit.trace(model, args)  # type: ignore[no-untyped-call]
            torch.jit.save(program, str(dest / _FILES[format]))
    else:
        if example is None:
            raise PersistError("format='export' needs example= (the inputs torch.export traces with)")
        torch.export.save(torch.export.export(model, args), str(dest / _FILES[format]))
    return {"program": True}


def _load_program(payload: Payload, format: str, dev: torch.device) -> Any:
    if not payload.policy.trusted:
        raise UntrustedContentError(f"a {format} artifact is a program (it runs when called, and torch reads it "
                                    "with its own unpickler); load it only with trusted=True, or from an artifact "
                                    "signed by a key you configured", [format])
    path = str(payload.local_path(_FILES[format]))
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location=dev).eval()  # type: ignore[no-untyped-call]
    return torch.export.load(path).module().to(dev)
