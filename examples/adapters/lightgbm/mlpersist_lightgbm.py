"""LightGBM for mlpersist, written as a third party would: only `mlpersist` and `mlpersist.errors` are used.

Installed, it registers itself through the `mlpersist.adapters` entry point (see pyproject.toml).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightgbm
import numpy as np

from mlpersist import Payload
from mlpersist.errors import CorruptArtifactError, PersistError, UntrustedContentError

MODEL = "model.txt"
# A fixed table: the class to rebuild is never taken from the file.
_WRAPPERS: dict[str, type] = {c.__name__: c for c in (lightgbm.Booster, lightgbm.LGBMClassifier,
                                                       lightgbm.LGBMRegressor, lightgbm.LGBMRanker)}


class LightGBMAdapter:
    """Booster and the scikit-learn wrappers, as LightGBM's text model (checked before LightGBM parses it)."""

    name: ClassVar[str] = "lightgbm"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("lightgbm", "numpy", "scipy")
    # How mlpersist recognises a LightGBM text model saved without it: (first bytes, format, payload name)
    sniff: ClassVar[tuple[tuple[bytes, str, str], ...]] = ((b"tree\nversion=v", "default", MODEL),)

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]:
        """Write model.txt; record the wrapper, its parameters and classes."""
        if type(model) not in _WRAPPERS.values():
            raise PersistError(f"{type(model).__qualname__} is not a LightGBM class this adapter rebuilds")
        booster = model if isinstance(model, lightgbm.Booster) else model.booster_
        booster.save_model(str(dest / MODEL))
        info: dict[str, Any] = {"wrapper": type(model).__name__}
        if not isinstance(model, lightgbm.Booster):
            info["params"] = {k: v for k, v in model.get_params().items()
                              if v is None or isinstance(v, (bool, int, float, str))}
            classes = getattr(model, "classes_", None)
            if classes is not None:
                info["classes"] = np.asarray(classes).tolist()
        return info

    def load(self, payload: Payload, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        """Check every tree of the text model (unless the load is trusted), then rebuild the Booster from it."""
        try:
            text = payload.read_bytes(MODEL).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptArtifactError(f"{payload.label(MODEL)} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                       "a LightGBM text model is: the file is damaged or not LightGBM's") from None
        if not payload.policy.trusted:
            text = prepared(text, payload.label(MODEL))  # checked, and read by LightGBM as it was checked
        try:
            booster = lightgbm.Booster(model_str=text)
        except lightgbm.basic.LightGBMError as exc:
            raise CorruptArtifactError(f"LightGBM could not read {payload.label(MODEL)}: {exc}") from exc
        cls = _WRAPPERS.get(str(info.get("wrapper", "Booster")))
        if cls is None:
            raise CorruptArtifactError(f"unknown LightGBM wrapper {info.get('wrapper')!r}")
        if cls is lightgbm.Booster:
            return booster
        return _wrap(cls, booster, info)

    def check_state(self, obj: Any, state: Any, where: str) -> Any:
        """Check a pickled Booster's model text before its `__setstate__` hands it to LightGBM (a pipeline step).

        Returns the state to set: the model text as `prepared` checked it. A wrapper's state holds its
        Booster, a pickled object of its own, checked when that one is set. (So no `check` after the load.)
        """
        if not isinstance(obj, lightgbm.Booster) or not isinstance(state, dict):
            return state
        text = state.get("_handle", state.get("handle"))  # what Booster.__setstate__ parses
        if text is None:
            return state
        if not isinstance(text, str):
            raise UntrustedContentError(f"{where}: a pickled LightGBM Booster whose model is a {type(text).__name__}, "
                                        "not its text; refusing it", ["lightgbm.Booster"])
        return {**state, "_handle": prepared(text, where)}


def _wrap(cls: type, booster: Any, info: Mapping[str, Any]) -> Any:
    # LightGBM has no public "load into a wrapper": set what fit() sets (checked against lightgbm 4.x).
    model = cls(**info.get("params", {}))
    model._Booster = booster
    model.fitted_ = True
    model._n_features = model._n_features_in = booster.num_feature()
    model._evals_result, model._best_score = {}, {}
    model._best_iteration = booster.best_iteration
    model._objective = booster.params.get("objective", info.get("params", {}).get("objective"))
    if "classes" in info:
        from sklearn.preprocessing import LabelEncoder  # noqa: PLC0415 - the wrappers need scikit-learn anyway

        model._le = LabelEncoder().fit(np.asarray(info["classes"]))
        model._classes = model._le.classes_
        model._n_classes = len(model._classes)
    return model


def prepared(text: str, where: str = MODEL) -> str:
    """Check `text` as LightGBM will read it, and return it in the form that was checked (without `tree_sizes`).

    LightGBM's own parser trusts what it reads: tree indices (GHSA-wvg4-4w35-4jc9: out-of-bounds write
    via SHAP; issues 7437/7438: out-of-bounds reads), and the `tree_sizes` header, which it follows
    without bounds (a wrong size reads outside the text); a tree it cannot read there, on its parallel
    path, aborts the whole process. Without `tree_sizes` it reads the trees one after another and
    raises on what it cannot read. So the text is read here as that sequential reader reads it: the
    header's lines split at `=` (empty parts dropped), then each `Tree=` line's key lines up to a blank
    line (at most 22: LightGBM 4), stopping at the first other line; then its `parameters:` section,
    each line `[name: value]`. What LightGBM's reader would take differently from this one is refused
    rather than guessed at: control characters (a NUL ends the C string LightGBM gets), a key repeated
    or not lowercase (a `Tree=` line inside a tree), a key line without `=`, a tree that runs to the
    end of the text, numbers other than plain ASCII decimals.

    Raises:
        mlpersist.errors.UntrustedContentError: naming what is wrong (the first bad tree).
    """
    bad = _CONTROL.search(text)
    if bad is not None or not text.startswith("tree\n"):
        what = f"a control character {bad.group()!r}" if bad is not None else "no 'tree' first line"
        raise UntrustedContentError(f"{where}: not a LightGBM text model as LightGBM writes it ({what}); "
                                    "refusing it", ["lightgbm.Booster"])
    lines = text.split("\n")
    header: dict[str, str] = {}
    kept: list[str] = []
    i = 0
    try:
        for i, line in enumerate(lines):  # noqa: B007 - i is where the trees start
            if line.startswith("Tree="):
                break
            parts = [part for part in line.split("=") if part]
            if parts:
                _unique(header, parts[0], parts[1] if len(parts) == 2 else "", "header")
                if parts[0] == "tree_sizes":
                    continue  # LightGBM would jump by these sizes, unchecked: it reads tree after tree instead
            kept.append(line)
        else:
            i = len(lines)
        max_feature = _int(header["max_feature_idx"])
        classes, per_iteration = _int(header["num_class"]), _int(header.get("num_tree_per_iteration", "1"))
        if classes < 1 or per_iteration < 1:
            raise ValueError("fewer than one class or tree per iteration")  # LightGBM divides by them
        if per_iteration > classes:  # each tree of an iteration adds to its own output, in a row of num_class
            raise ValueError(f"{per_iteration} trees per iteration for {classes} outputs")
        tree_at = i
        n = 0
        while i < len(lines):
            if not lines[i]:
                i += 1
                continue
            if not lines[i].startswith("Tree="):
                break  # "end of trees": where LightGBM stops reading trees
            i += 1
            tree: dict[str, str] = {}
            while i < len(lines) and lines[i] and len(tree) < _TREE_LINES:
                key, eq, value = lines[i].partition("=")
                if not eq or not _KEY.fullmatch(key):
                    raise ValueError(f"tree {n}: line {lines[i][:40]!r}")
                _unique(tree, key, value, f"tree {n}")
                i += 1
            if i >= len(lines) - 1:  # the last of `lines` is what follows the last newline: no blank line
                raise ValueError(f"tree {n} runs to the end of the text")  # LightGBM would read on past it
            _check_tree(tree, max_feature, n, where)
            n += 1
        _check_parameters(lines[i:])
    except UntrustedContentError:
        raise
    except (KeyError, ValueError) as exc:
        raise UntrustedContentError(f"{where}: malformed LightGBM model ({exc}); refusing it",
                                    ["lightgbm.Booster"]) from None
    return "\n".join(kept + lines[tree_at:])


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # all but \n: LightGBM's reader ends lines at \r too
_KEY = re.compile(r"[a-z_]+", re.ASCII)
_INT = re.compile(r"-?[0-9]{1,18}", re.ASCII)  # fits in an int64; array values are then checked against counts
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|-?inf|nan", re.ASCII)
_TREE_LINES = 22  # LightGBM 4's Tree reads at most this many key lines
_PARAMETER = re.compile(r"\[[a-z0-9_]+: [^\n]*\]", re.ASCII)


def _check_parameters(tail: list[str]) -> None:
    """Check the `parameters:` section after the trees as LightGBM reads it back (`Booster.params`).

    LightGBM keeps its lines (up to `end of parameters`, or to the end of the text) and, asked for
    them, splits each at `:` and takes the second part unchecked: a line without one ("efd of
    parameters": one byte changed) made the load segfault. Each must be `[name: value]`, as
    LightGBM writes it.
    """
    if "parameters:" not in tail:
        return
    for line in tail[tail.index("parameters:") + 1:]:
        if line == "end of parameters":
            return
        if line and not _PARAMETER.fullmatch(line):
            raise ValueError(f"parameters: line {line[:40]!r}")


def _unique(fields: dict[str, str], key: str, value: str, where: str) -> None:
    if key in fields:
        raise ValueError(f"{where}: {key!r} twice")
    fields[key] = value


def _int(value: str) -> int:
    """A count or size as LightGBM reads it (an int32: a larger one would wrap around there, not here)."""
    if not _INT.fullmatch(value) or not -(2**31) <= int(value) < 2**31:
        raise ValueError(f"{value[:20]!r} is not a 32-bit integer")
    return int(value)


def _tokens(tree: Mapping[str, str], key: str, pattern: re.Pattern[str]) -> list[str]:
    """The numbers of `key` as LightGBM splits them (at single spaces, empty parts dropped), each a plain number."""
    tokens = [t for t in tree.get(key, "").split(" ") if t]
    for t in tokens:
        if not pattern.fullmatch(t):
            raise ValueError(f"{key}: {t[:20]!r} is not a number")
    return tokens


def _ints(tree: Mapping[str, str], key: str) -> np.ndarray:
    return np.array([int(t) for t in _tokens(tree, key, _INT)], dtype=np.int64)


def _check_tree(tree: Mapping[str, str], max_feature: int, n: int, where: str) -> None:
    leaves = _int(tree["num_leaves"])
    inner = leaves - 1
    left, right, feature = _ints(tree, "left_child"), _ints(tree, "right_child"), _ints(tree, "split_feature")
    decision, num_cat = _ints(tree, "decision_type"), _int(tree.get("num_cat", "0"))
    ok = leaves >= 1 and num_cat >= 0 and len(left) == len(right) == len(feature) == len(decision) == inner
    if ok:
        idx = np.arange(inner)
        for child in (left, right):
            # >= 0: an inner node, after its parent; < 0: leaf ~child
            inner_ok = (child > idx) & (child < inner)
            leaf_ok = (~child >= 0) & (~child < leaves)
            ok = ok and bool(np.all(np.where(child >= 0, inner_ok, leaf_ok)))
        # each node and leaf the child of one node at most: LightGBM's walks for SHAP values (leaf depths, then
        # the paths) follow every path down, and nodes shared make them as many as 2**depth
        for kids in (np.concatenate((left[left >= 0], right[right >= 0])),
                     np.concatenate((left[left < 0], right[right < 0]))):
            ok = ok and len(np.unique(kids)) == len(kids)
        ok = ok and bool(np.all((feature >= 0) & (feature <= max_feature)))
        cat = (decision & 1).astype(bool)  # a categorical split: its threshold indexes cat_boundaries
        if num_cat == 0:
            ok = ok and not bool(cat.any())
        else:
            bounds = _ints(tree, "cat_boundaries")
            thresholds = np.array([float(t) for t in _tokens(tree, "threshold", _FLOAT)], dtype=np.float64)
            words = len(_tokens(tree, "cat_threshold", _INT))
            ok = (ok and len(thresholds) == inner and len(bounds) == num_cat + 1 and bool(np.all(np.diff(bounds) >= 0))
                  and bounds[0] >= 0 and bounds[-1] <= words
                  and bool(np.all(~cat | ((thresholds >= 0) & (thresholds < num_cat)))))
    if ok and tree.get("is_linear", "0") != "0":
        ok = _linear_ok(tree, leaves, max_feature)
    if not ok:
        raise UntrustedContentError(f"{where}: tree {n}: child, feature or category indices point outside its arrays; "
                                    "the model is crafted or damaged, refusing it", ["lightgbm.Booster"])


def _linear_ok(tree: Mapping[str, str], leaves: int, max_feature: int) -> bool:
    """A linear tree's leaf models (`linear_tree=True`): `num_features` per leaf, then their features and coefficients.

    LightGBM cuts `leaf_features` into the leaves' lists by those counts and reads each feature of the
    row at its index, unchecked: a count below zero, or a feature past the row, read outside it (a
    feature of 10**9 segfaulted the predict).
    """
    counts, features = _ints(tree, "num_features"), _ints(tree, "leaf_features")
    coefficients = _tokens(tree, "leaf_coeff", _FLOAT)
    return (tree["is_linear"] == "1" and len(counts) == leaves and bool(np.all(counts >= 0))
            and len(features) == len(coefficients) == int(counts.sum())
            and bool(np.all((features >= 0) & (features <= max_feature))))
