"""A small example input saved with the model, and the model's outputs on it.

`save_any(model, path, example=X)` stores X and what the model answered; `load_any(path, check=True)`
and `mlpersist check` ask the loaded model again and compare. Everything is stored as `.npy` without
pickle (`allow_pickle=False` both ways), so an example is data, never code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._record import Record
from .errors import CheckFailedError, CorruptArtifactError, PersistError

if TYPE_CHECKING:
    import numpy as np

    from ._payload import Payload

DIR = "example"
METHODS = ("predict", "predict_proba", "transform")  # what a framework without a hook answers with
DEFAULT_TOLERANCE = 1e-5
_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class Diff(Record):
    """One output compared: the largest absolute difference, and whether it is within the tolerance."""

    part: str
    output: str
    max_abs_diff: float | None  # None: not numbers (labels): compared for equality
    ok: bool
    detail: str

    def __init__(self, part: str, output: str, max_abs_diff: float | None, ok: bool, detail: str = "") -> None:
        self._init(part=part, output=output, max_abs_diff=max_abs_diff, ok=ok, detail=detail)

    def __str__(self) -> str:
        size = "equal" if self.max_abs_diff is None and self.ok else (
            "different" if self.max_abs_diff is None else f"max |diff| {self.max_abs_diff:.3g}")
        where = "" if self.part == "the model" else f"{self.part}: "
        detail = f" {self.detail}" if self.detail else ""
        return f"{'ok    ' if self.ok else 'FAILED'} {where}{self.output}: {size}{detail}"


def save(model: Any, adapter: Any, example: Any, dest: Path, where: str) -> dict[str, Any]:
    """Store `example` under dest/example/, then the model's outputs on what was stored; return the manifest entry."""
    import numpy as np

    args = list(example) if isinstance(example, tuple) else [example]
    (dest / DIR).mkdir()  # FileExistsError if the adapter wrote one: an OSError, reported as is
    inputs = [_store_input(a, dest, i, where) for i, a in enumerate(args)]
    reread = [_load_input(spec, lambda name: _read_npy(dest / name)) for spec in inputs]
    outputs: dict[str, str] = {}
    for name, value in answers(model, adapter, reread, where).items():
        file = f"{DIR}/out-{name}.npy"
        with open(dest / file, "wb") as f:
            np.save(f, value, allow_pickle=False)
        outputs[name] = file
    return {"inputs": inputs, "outputs": outputs}


def files(example: Mapping[str, Any] | None) -> set[str]:
    """The file names an example entry uses (relative to its part)."""
    if example is None:
        return set()
    named = [c["file"] for i in example["inputs"] for c in ([i] if "file" in i else i["columns"])]
    return {*named, *example["outputs"].values()}


def check(model: Any, adapter: Any, example: Mapping[str, Any], payload: Payload, *, tolerance: float,
          where: str) -> list[Diff]:
    """Ask the loaded model again; compare with the stored outputs."""
    import numpy as np

    try:
        args = [_load_input(spec, lambda name: _read_npy(payload.open(name))) for spec in example["inputs"]]
        want = {name: _read_npy(payload.open(file)) for name, file in example["outputs"].items()}
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise CorruptArtifactError(f"the stored example of {where} cannot be read: {exc}") from None
    got = answers(model, adapter, args, where)
    out = []
    for name, expected in want.items():
        if name not in got:
            out.append(Diff(where, name, None, False, "(the loaded model no longer produces it)"))
        else:
            out.append(_compare(where, name, np.asarray(got[name]), expected, tolerance))
    return out


def raise_on_failure(report: Iterable[Diff], tolerance: float, path: str) -> None:
    """Raise CheckFailedError listing every output beyond the tolerance."""
    report = list(report)
    bad = [d for d in report if not d.ok]
    if bad:
        raise CheckFailedError(
            f"{path}: the loaded model answers the stored example differently (tolerance {tolerance:g}):\n  "
            + "\n  ".join(map(str, bad))
            + "\nThis environment differs from the one that saved it: `mlpersist requirements PATH` prints that "
              "one, ready for pip install -r", report)


def answers(model: Any, adapter: Any, args: list[Any], where: str) -> dict[str, np.ndarray]:
    """The model's outputs on `args`, as named numpy arrays: the adapter's hook, else predict/…/transform."""
    hook = getattr(adapter, "example_outputs", None)
    try:
        raw = hook(model, args) if hook is not None else None
        if raw is None:
            raw = {m: getattr(model, m)(*args) for m in METHODS if callable(getattr(model, m, None))}
    except PersistError:
        raise
    except Exception as exc:
        raise PersistError(f"{where} could not answer the example: {type(exc).__name__}: {exc}; pass an input "
                           "it accepts (the same type, shape and dtype as in training)") from exc
    if not raw:
        raise PersistError(f"{where} ({type(model).__qualname__}) has no {', '.join(METHODS)} and its adapter no "
                           "example hook: example= cannot be used with it")
    flat: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        _flatten(name, value, flat)
    return flat


def _flatten(name: str, value: Any, out: dict[str, np.ndarray]) -> None:
    """Name each array of a nested output (a tuple of tensors, a dict of heads); a list of numbers is one array."""
    if isinstance(value, (tuple, list)) and any(
            getattr(v, "ndim", 0) or isinstance(v, (Mapping, tuple, list)) for v in value):
        for i, v in enumerate(value):
            _flatten(f"{name}.{i}", v, out)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{name}.{_NAME.sub('_', str(k))}", v, out)
    else:
        out[name[:100]] = _plain(_to_numpy(value), f"output {name}")


def _to_numpy(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach"):  # torch (also Keras on the torch backend)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if hasattr(value, "toarray"):  # scipy sparse
        return value.toarray()
    if hasattr(value, "to_numpy"):  # pandas
        return value.to_numpy()
    if hasattr(value, "numpy") and callable(value.numpy):  # TensorFlow
        return value.numpy()
    return np.asarray(value)


def _plain(arr: Any, what: str) -> np.ndarray:
    """A numpy array that .npy stores without pickle (strings as unicode, never objects)."""
    import numpy as np

    out: np.ndarray = np.asarray(arr)
    if out.dtype.kind == "O":
        if all(isinstance(v, str) for v in out.flat):
            return out.astype(str)
        raise PersistError(f"the example's {what} holds Python objects ({type(next(iter(out.flat), None)).__name__}),"
                           " which cannot be stored without pickle; pass numbers or strings")
    return out


def _store_input(arg: Any, dest: Path, i: int, where: str) -> dict[str, Any]:
    import numpy as np

    if hasattr(arg, "columns") and hasattr(arg, "dtypes"):  # a pandas DataFrame
        columns = []
        for j, col in enumerate(arg.columns):
            if not isinstance(col, str):
                raise PersistError(f"the example of {where} has a column named {col!r}: DataFrame columns must be "
                                   "strings to be stored")
            file = f"{DIR}/in-{i}-{j}.npy"
            with open(dest / file, "wb") as f:
                np.save(f, _plain(arg[col].to_numpy(), f"column {col!r}"), allow_pickle=False)
            columns.append({"name": col, "file": file})
        return {"kind": "dataframe", "columns": columns}
    file = f"{DIR}/in-{i}.npy"
    kind, dtype = "array", None
    if hasattr(arg, "detach"):
        kind, dtype = "tensor", str(arg.dtype)
    with open(dest / file, "wb") as f:
        np.save(f, _plain(_to_numpy(arg), "input"), allow_pickle=False)
    return {"kind": kind, "file": file, **({"dtype": dtype} if dtype else {})}


def _read_npy(f: Any) -> Any:
    """Read one .npy (a path, or an open handle that stays open); never unpickles."""
    import numpy as np

    return np.load(f, allow_pickle=False)


def _load_input(spec: Mapping[str, Any], read: Callable[[str], Any]) -> Any:
    if spec.get("kind") == "dataframe":
        import pandas as pd  # type: ignore[import-untyped]  # only for a DataFrame example

        return pd.DataFrame({c["name"]: read(c["file"]) for c in spec["columns"]})
    arr = read(spec["file"])
    if spec.get("kind") == "tensor":
        import torch

        tensor = torch.from_numpy(arr)
        dtype = getattr(torch, str(spec.get("dtype", "")).removeprefix("torch."), None)
        return tensor.to(dtype) if isinstance(dtype, torch.dtype) else tensor
    return arr


def _compare(where: str, name: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> Diff:
    import numpy as np

    if got.shape != want.shape:
        return Diff(where, name, None, False, f"(shape {got.shape}, stored {want.shape})")
    if got.dtype.kind in "fciub" and want.dtype.kind in "fciub":
        g, w = got.astype(np.complex128 if "c" in got.dtype.kind + want.dtype.kind else np.float64), \
            want.astype(np.complex128 if "c" in got.dtype.kind + want.dtype.kind else np.float64)
        same_nan = np.array_equal(np.isnan(g), np.isnan(w))
        diff = np.abs(np.where(np.isnan(w), 0, g - w))
        worst = float(diff.max()) if diff.size else 0.0
        ok = same_nan and bool(np.all(diff <= tolerance * (1 + np.abs(np.nan_to_num(w)))))
        return Diff(where, name, worst, ok, "" if same_nan else "(NaN in other places)")
    return Diff(where, name, None, bool(np.array_equal(got, want)))
