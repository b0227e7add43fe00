"""PyTorch: weights as safetensors plus the class and its constructor arguments; rebuilt without pickle."""

from __future__ import annotations

import pickle
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from mlpersist import Payload, PersistError
from mlpersist._environment import release
from mlpersist._zips import no_overlap
from mlpersist.adapters._safetensors import read_safetensors, unique_tensors, write_safetensors
from mlpersist.adapters._torch_build import decode, encode, fill, init_spec, rebuild
from mlpersist.adapters._torch_hooks import base_class, found, reapply, refresh
from mlpersist.errors import CorruptArtifactError, UnsupportedModelError, UntrustedContentError

WEIGHTS, OPTIMIZER = "weights.safetensors", "optimizer.safetensors"
_FILES = {"torchscript": "model.torchscript.pt", "export": "model.pt2"}


class TorchAdapter:
    """Any `torch.nn.Module`: safetensors weights, rebuilt on the meta device, no pickle on the default path."""

    name: ClassVar[str] = "torch"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("torch", "safetensors", "numpy")
    # read whole into memory as they are checked: the tensors are views of those very bytes, which no
    # later write to the file can change (a mapped file's pages would follow it)
    read_whole: ClassVar[tuple[str, ...]] = ("weights.safetensors", "optimizer.safetensors")
    # programs torch reads only by path (trusted loads): a sealed in-memory copy of the checked bytes
    read_by_path: ClassVar[tuple[str, ...]] = tuple(_FILES.values())

    def unwrap(self, model: Any) -> Any:
        """The module a runtime wrapper holds (`torch.compile`'s `OptimizedModule`, `DataParallel`, DDP).

        Their state dicts are the wrapped module's under a prefix (`_orig_mod.`, `module.`), and they
        cannot be rebuilt from a file (a compiled graph is made anew in each process): the module is
        saved, and loads as itself; compile or wrap it again after loading.
        """
        cls = type(model)
        if cls.__name__ == "OptimizedModule" and cls.__module__.startswith("torch._dynamo"):
            return model._orig_mod
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            return model.module
        return model

    def save(self, model: Any, dest: Path, *, format: str, init_kwargs: Mapping[str, Any] | None = None,
             optimizer: Any = None, extra: Any = None, example: Any = None) -> Mapping[str, Any]:
        """Write weights (and optimizer state) as safetensors, or a TorchScript / torch.export program."""
        lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if torch.nn.parameter.is_lazy(t)]
        if lazy:
            raise UnsupportedModelError(f"{type(model).__qualname__} has weights not yet initialised "
                                        f"({', '.join(lazy[:3])}): a lazy module takes its shapes from its first "
                                        "input; run one forward pass on a batch before saving it")
        if format != "safetensors":
            return _save_program(model, dest, format, example)
        live = model.state_dict(keep_vars=True)  # the module's own tensors: the rebuild's proof names them by id
        state = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in live.items()}
        odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor) or v.is_quantized), None)
        if odd is not None:
            raise UnsupportedModelError(
                f"{type(model).__qualname__} keeps {odd!r} as a {type(state[odd]).__name__}, not a plain tensor "
                "(quantized modules pack their weights), and safetensors holds plain tensors: save the float model "
                "and quantize it after loading, or save it with format='torchscript' (a program, which loads only "
                "with trusted=True)")
        tensors, aliases = unique_tensors(state)
        write_safetensors(tensors, dest / WEIGHTS)
        reapplied = found(model)
        init, meta_ok = init_spec(model, init_kwargs, reapplied, live)
        cls = base_class(model)
        info: dict[str, Any] = {"class": f"{cls.__module__}:{cls.__qualname__}", "init": init, "meta_ok": meta_ok,
                                "aliases": aliases,
                                "frozen": [n for n, p in model.named_parameters() if not p.requires_grad]}
        if reapplied:
            info["reapplied"] = reapplied
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
            model = rebuild(info, tensors, dev)
        else:
            reapply(model, info.get("reapplied"))
            fill(model, tensors, strict=strict)
            refresh(model)
            model.to(dev)
        frozen = set(info.get("frozen", []))
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        model.eval()
        if training_state:
            opt = _load_optimizer(payload, info["optimizer"], dev) if "optimizer" in info else None
            return model, {"optimizer": opt, "extra": info.get("extra")}
        return model



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
            "param_groups": encode(state["param_groups"]), "scalars": encode(scalars)}


def _read_safetensors(payload: Payload, name: str, dev: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of `name`, viewing the very bytes the core checked (mapped from the file if it kept none)."""
    data = payload.checked_bytes(name)
    if data is None or sys.byteorder != "little":  # verify=False; safetensors data is little-endian
        return load_file(payload.local_path(name), device=str(dev))
    tensors = read_safetensors(data, name)
    if tensors is None:  # a dtype this reader does not view (complex, a newer float): safetensors copies
        tensors = load_bytes(bytes(data))
    return {k: v.to(dev) for k, v in tensors.items()}  # .to(): the tensor itself when already on `dev`




def _load_optimizer(payload: Payload, info: Mapping[str, Any], dev: torch.device) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in decode(info["scalars"]).items()}
    for key, value in _read_safetensors(payload, OPTIMIZER, dev).items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": decode(info["param_groups"])}


def _load_bare_pt(payload: Payload, model: Any, dev: torch.device, strict: bool) -> Any:
    """A bare torch.save file: read with weights_only=True (never full pickle), as a state dict or into `model`."""
    if release(torch.__version__) < (2, 10) and not payload.policy.trusted:
        raise UntrustedContentError("torch < 2.10 has known weights_only bypasses (CVE-2025-32434, CVE-2026-24747); "
                                    "upgrade torch, or pass trusted=True for a file you trust", ["torch.load"])
    f = payload.open("weights.pt")
    _vet_archive(f)
    try:
        state = torch.load(f, map_location=dev, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler: a global or an opcode it does not allow
        raise UntrustedContentError(f"weights.pt holds more than tensors and containers ({exc}); torch's "
                                    "weights_only loader refused it", ["torch.load"]) from exc
    except Exception as exc:  # a record missing or cut short, a storage of the wrong size
        raise CorruptArtifactError(f"weights.pt could not be read ({type(exc).__name__}: {str(exc)[:300]}); the "
                                   "file is damaged, or not written by torch.save") from exc
    if model is None:
        return state
    fill(model, state.get("state_dict", state) if isinstance(state, dict) else state, strict=strict)
    return model.to(dev).eval()


def _vet_archive(f: Any) -> None:
    """Refuse a torch.save archive that makes torch read more than the file holds, trusted or not.

    torch reads each record whole into memory. torch.save stores them uncompressed, and with no record
    sharing another's bytes, so together they are the file's size. A deflated record would be inflated
    (a 262 KB file made torch allocate 256 MiB), and records pointing at one another's data would each
    be read (4 MB made 160 MiB from 40 of them). torch's reader takes both. A file not starting as a zip
    is torch's legacy format, which torch reads in order and checks against the file's end.
    """
    if f.read(4) != b"PK\x03\x04":  # torch's own test (serialization._is_zipfile)
        f.seek(0)
        return
    try:
        infos = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise CorruptArtifactError(f"weights.pt is a damaged zip archive ({exc}); save it again with "
                                   "torch.save") from None
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            raise CorruptArtifactError(f"weights.pt record {i.filename!r} is compressed, which torch.save never "
                                       "does, and torch would inflate it whole into memory (a decompression "
                                       "bomb?): save the weights again with torch.save")
    no_overlap(infos, f, "weights.pt")
    f.seek(0)


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
    if format == "torchscript":
        path = str(payload.local_path(_FILES[format]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location=dev).eval()  # type: ignore[no-untyped-call]
    # the checked stream: given a path, torch.export wants it to end in .pt2 (a /proc/self/fd path does
    # not), else it logs "Unable to load package" and falls back to its legacy reader
    return torch.export.load(payload.open(_FILES[format])).module().to(dev)
