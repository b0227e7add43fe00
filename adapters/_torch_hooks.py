"""What torch's pruning, norms and parametrizations do to a module after its constructor: found, and done again.

`torch.nn.utils.prune`, `weight_norm` and `spectral_norm` (hooks), and `torch.nn.utils.parametrizations`
(`weight_norm`, `spectral_norm`, `orthogonal`) rename the tensor they act on (`weight_orig` and `weight_mask`,
`weight_g` and `weight_v`, `parametrizations.weight.original0`, ...). A module rebuilt from its
constructor has a plain `weight`: the save records what was done (`info.reapplied`), and loading does it
again before the weights are filled, on the rebuilt module or on a template.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from mlpersist.errors import CorruptArtifactError


def base_class(m: Any) -> type[Any]:
    """The class a module was built as: a parametrization swaps in a generated subclass (`ParametrizedLinear`)."""
    cls = type(m)
    return cls.__bases__[0] if parametrize.is_parametrized(m) else cls


def found(model: Any) -> list[dict[str, Any]]:
    """What was done to the module's tensors after it was built, in the order it is to be done again.

    A parametrization other than weight_norm, spectral_norm and orthogonal is not recorded (the save's proof
    then fails, and loading asks for a template parametrized as the model was).
    """
    entries: list[dict[str, Any]] = []
    hooks = _hooks()
    for path, sub in model.named_modules():
        at = f"{path}." if path else ""
        for hook in sub._forward_pre_hooks.values():
            for kind, cls, args, _ in hooks:
                if isinstance(hook, cls):
                    entries.append({"kind": kind, "tensor": at + _tensor_name(hook), **args(hook)})
                    break
        if parametrize.is_parametrized(sub):
            for name, chain in sub.parametrizations.items():
                steps = [_step(p) for p in chain]
                if all(steps):
                    entries.append({"kind": "parametrizations", "tensor": at + name, "steps": steps})
    return entries


def _norm_args(p: Any) -> dict[str, Any]:
    # a parametrization of a 1-d tensor keeps no iteration count: it divides by the norm, no iterations
    return {"dim": p.dim, "eps": p.eps, "n_power_iterations": getattr(p, "n_power_iterations", 1)}


def _step(p: Any) -> dict[str, Any] | None:
    if type(p) is parametrizations._WeightNorm:
        return {"weight_norm": {"dim": p.dim}}
    if type(p) is parametrizations._SpectralNorm:
        return {"spectral_norm": _norm_args(p)}
    if type(p) is parametrizations._Orthogonal:  # the map it chose (by the weight's shape, if not told); its base
        return {"orthogonal": {"orthogonal_map": p.orthogonal_map.name, "use_trivialization": "base" in p._buffers}}
    return None


def reapply(model: Any, entries: Any) -> None:
    """Do again what `found` recorded, where it is not done already (a template prepared as the model was).

    A pruning method is not kept, its mask is (`custom_from_mask`, all ones until the saved mask is
    filled): the tensor is `name_orig * name_mask` again before every forward, and pruning further works.
    """
    if entries is None:
        return
    if not isinstance(entries, list):
        raise CorruptArtifactError(f"info.reapplied is {entries!r}, not a list")
    for entry in entries:
        kind, tensor = (entry.get("kind"), entry.get("tensor")) if isinstance(entry, dict) else (None, None)
        if kind not in _DONE or not isinstance(tensor, str):
            raise CorruptArtifactError(f"info.reapplied holds {entry!r}, not what mlpersist records")
        owner, _, name = tensor.rpartition(".")
        try:
            sub = model.get_submodule(owner)
        except AttributeError:
            sub = None
        if sub is not None and _DONE[kind](sub, name):
            continue
        if sub is None or not isinstance(sub._parameters.get(name), torch.Tensor):
            raise CorruptArtifactError(f"the artifact records {tensor!r} as {kind}, and {type(model).__qualname__} "
                                       "has no such parameter")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
                _redo(kind, sub, name, entry)
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise CorruptArtifactError(f"cannot apply {kind} to {tensor!r} again as recorded: {exc}") from exc


def _redo(kind: str, sub: Any, name: str, entry: dict[str, Any]) -> None:
    if kind == "prune":
        from torch.nn.utils import prune  # noqa: PLC0415 - 1.5 ms, for pruned models only

        prune.custom_from_mask(sub, name, torch.ones_like(sub._parameters[name]))  # type: ignore[no-untyped-call]
    elif kind == "weight_norm":
        torch.nn.utils.weight_norm(sub, name, dim=_int(entry["dim"]))
    elif kind == "spectral_norm":
        torch.nn.utils.spectral_norm(sub, name, **_norm(entry))
    else:
        for step in entry["steps"]:
            what, args = next(iter(step.items())) if type(step) is dict and len(step) == 1 else (None, None)
            if what not in _STEPS or type(args) is not dict:
                raise ValueError(f"{step!r} is not one of {', '.join(_STEPS)} with its arguments")
            _STEPS[what](sub, name, args)


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"{v!r} is not an integer")
    return v


def _norm(args: dict[str, Any]) -> dict[str, Any]:
    eps = args["eps"]
    if type(eps) is not float or _int(args["n_power_iterations"]) < 1:
        raise ValueError("eps must be a float and n_power_iterations at least 1")
    return {"dim": _int(args["dim"]), "eps": eps, "n_power_iterations": args["n_power_iterations"]}


# What each hook records beside its kind and tensor, and how it recomputes its tensor from the loaded ones
# (as it does before a forward in eval mode). Spectral norm without a power iteration: one would change the
# loaded u and v.
_Hook = tuple[str, type, Callable[[Any], dict[str, Any]], Callable[[Any, Any], None]]
_NORMS: tuple[_Hook, ...] = (
    ("weight_norm", WeightNorm, lambda h: {"dim": h.dim}, lambda sub, h: setattr(sub, h.name, h.compute_weight(sub))),
    ("spectral_norm", SpectralNorm, _norm_args,
     lambda sub, h: setattr(sub, h.name, h.compute_weight(sub, do_power_iteration=False))))


def _hooks() -> tuple[_Hook, ...]:
    """The hook kinds a module can hold: pruning's only once torch.nn.utils.prune is imported (it made them)."""
    prune = sys.modules.get("torch.nn.utils.prune")
    if prune is None:
        return _NORMS
    return (("prune", prune.BasePruningMethod, lambda h: {}, lambda sub, h: h(sub, ())), *_NORMS)


def _tensor_name(hook: Any) -> str:
    name: str = hook._tensor_name if hasattr(hook, "_tensor_name") else hook.name  # pruning's, the norms'
    return name


def _orthogonal(args: dict[str, Any]) -> dict[str, Any]:
    kind, trivial = args["orthogonal_map"], args["use_trivialization"]
    if kind not in ("matrix_exp", "cayley", "householder") or type(trivial) is not bool:
        raise ValueError("orthogonal_map must be matrix_exp, cayley or householder, use_trivialization a bool")
    return {"orthogonal_map": kind, "use_trivialization": trivial}


# the parametrizations a chain may hold, as `_step` records them, applied again
_STEPS: dict[str, Callable[[Any, str, dict[str, Any]], Any]] = {
    "weight_norm": lambda sub, name, a: parametrizations.weight_norm(sub, name, dim=_int(a["dim"])),
    "spectral_norm": lambda sub, name, a: parametrizations.spectral_norm(sub, name, **_norm(a)),
    "orthogonal": lambda sub, name, a: parametrizations.orthogonal(sub, name, **_orthogonal(a))}


def _hooked(kind: str) -> Callable[[Any, str], bool]:
    """Whether a module holds a hook of `kind` on its tensor `name`."""
    def done(sub: Any, name: str) -> bool:
        return any(k == kind and isinstance(h, cls) and _tensor_name(h) == name
                   for k, cls, _, _ in _hooks() for h in sub._forward_pre_hooks.values())
    return done


_DONE: dict[str, Callable[[Any, str], bool]] = {
    "prune": _hooked("prune"), "weight_norm": _hooked("weight_norm"), "spectral_norm": _hooked("spectral_norm"),
    "parametrizations": parametrize.is_parametrized}  # (module, tensor name)


def refresh(model: Any) -> None:
    """Recompute each hooked tensor from the loaded ones, as its hook does before a forward in eval mode.

    Until then it is what the hook computed from the empty tensors of the rebuild (on the meta device).
    """
    hooks = _hooks()
    for sub in model.modules():
        for hook in list(sub._forward_pre_hooks.values()):
            for _, cls, _, recompute in hooks:
                if isinstance(hook, cls):
                    recompute(sub, hook)
                    break
