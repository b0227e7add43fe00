"""What torch's pruning, weight and spectral norms do to a module after its constructor: found, and done again.

`torch.nn.utils.prune`, `weight_norm` and `spectral_norm` (hooks), and `torch.nn.utils.parametrizations`
(`weight_norm`, `spectral_norm`) rename the tensor they act on (`weight_orig` and `weight_mask`,
`weight_g` and `weight_v`, `parametrizations.weight.original0`, ...). A module rebuilt from its
constructor has a plain `weight`: the save records what was done (`info.reapplied`), and loading does it
again before the weights are filled, on the rebuilt module or on a template.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.nn.utils import parametrizations, parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from mlpersist.errors import CorruptArtifactError


def base_class(m: Any) -> type[Any]:
    """The class a module was built as: a parametrization swaps in a generated subclass (`ParametrizedLinear`)."""
    cls = type(m)
    return cls.__bases__[0] if parametrize.is_parametrized(m) else cls


def found(model: Any) -> list[dict[str, Any]]:
    """What was done to the module's tensors after it was built, in the order it is to be done again.

    A parametrization other than weight_norm and spectral_norm is not recorded (the save's proof then
    fails, and loading asks for a template parametrized as the model was).
    """
    entries: list[dict[str, Any]] = []
    for path, sub in model.named_modules():
        at = f"{path}." if path else ""
        for hook in sub._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                entries.append({"kind": "prune", "tensor": at + hook._tensor_name})
            elif isinstance(hook, WeightNorm):
                entries.append({"kind": "weight_norm", "tensor": at + hook.name, "dim": hook.dim})
            elif isinstance(hook, SpectralNorm):
                entries.append({"kind": "spectral_norm", "tensor": at + hook.name, **_norm_args(hook)})
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
        prune.custom_from_mask(sub, name, torch.ones_like(sub._parameters[name]))  # type: ignore[no-untyped-call]
    elif kind == "weight_norm":
        torch.nn.utils.weight_norm(sub, name, dim=_int(entry["dim"]))
    elif kind == "spectral_norm":
        torch.nn.utils.spectral_norm(sub, name, **_norm(entry))
    else:
        for step in entry["steps"]:
            if "weight_norm" in step:
                parametrizations.weight_norm(sub, name, dim=_int(step["weight_norm"]["dim"]))
            else:
                parametrizations.spectral_norm(sub, name, **_norm(step["spectral_norm"]))


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"{v!r} is not an integer")
    return v


def _norm(args: dict[str, Any]) -> dict[str, Any]:
    eps = args["eps"]
    if type(eps) is not float or _int(args["n_power_iterations"]) < 1:
        raise ValueError("eps must be a float and n_power_iterations at least 1")
    return {"dim": _int(args["dim"]), "eps": eps, "n_power_iterations": args["n_power_iterations"]}


def _hooked(kind: type) -> Any:
    return lambda sub, name: any(isinstance(h, kind) and getattr(h, "_tensor_name", getattr(h, "name", None)) == name
                                 for h in sub._forward_pre_hooks.values())


_DONE = {"prune": _hooked(prune.BasePruningMethod), "weight_norm": _hooked(WeightNorm),
         "spectral_norm": _hooked(SpectralNorm),
         "parametrizations": parametrize.is_parametrized}


def refresh(model: Any) -> None:
    """Recompute each hooked tensor from the loaded ones, as its hook does before a forward in eval mode.

    Until then it is what the hook computed from the empty tensors of the rebuild (on the meta device).
    """
    for sub in model.modules():
        for hook in list(sub._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                hook(sub, ())
            elif isinstance(hook, WeightNorm):
                setattr(sub, hook.name, hook.compute_weight(sub))
            elif isinstance(hook, SpectralNorm):  # no power iteration: it would change the loaded u and v
                setattr(sub, hook.name, hook.compute_weight(sub, do_power_iteration=False))
