"""scikit-learn: a joblib (or pickle) payload, read back only through the core's guarded unpickler."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import joblib
import numpy as np
from sklearn.tree._tree import Tree

from mlpersist import Payload, _registry
from mlpersist._policy import NATIVE_STATE, unchecked_native
from mlpersist._trees import first_bad_tree
from mlpersist.errors import PersistError, UntrustedContentError

_FILES = {"joblib": "model.joblib", "pickle": "model.pkl"}
_MAX_CLASSES_RECORDED = 1000


class SklearnAdapter:
    """Any estimator, Pipeline, ColumnTransformer or meta-estimator, through joblib by default."""

    name: ClassVar[str] = "sklearn"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("scikit-learn", "numpy", "scipy", "joblib")

    def save(self, model: Any, dest: Path, *, format: str, compress: Any = 0, protocol: int | None = None,
             **options: Any) -> Mapping[str, Any]:
        """Write model.joblib (`compress=` as joblib takes it) or model.pkl; return what describes the model."""
        if options:
            raise PersistError(f"the sklearn adapter takes compress= and protocol=, not {', '.join(sorted(options))}")
        if format == "joblib":
            joblib.dump(model, dest / _FILES["joblib"], compress=compress, protocol=protocol)
        else:
            with open(dest / _FILES["pickle"], "wb") as f:
                pickle.dump(model, f, protocol=protocol or pickle.HIGHEST_PROTOCOL)
        return describe(model)

    def load(self, payload: Payload, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        """Unpickle under the caller's trust policy, then check tree structures before anything predicts."""
        if options:
            raise PersistError(f"the sklearn adapter takes no load options, not {', '.join(sorted(options))}")
        model = payload.unpickle(_FILES.get(format, _FILES["joblib"]), joblib_format=format == "joblib")
        if not payload.policy.trusted:
            validate(model)
        return model


def describe(model: Any) -> dict[str, Any]:
    """Record n_features_in_, feature_names_in_ and classes_ where the model has them."""
    out: dict[str, Any] = {}
    if isinstance(n := getattr(model, "n_features_in_", None), (int, np.integer)):
        out["n_features_in"] = int(n)
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        out["feature_names_in"] = [str(x) for x in names]
    classes = getattr(model, "classes_", None)
    if isinstance(classes, np.ndarray) and classes.ndim == 1:
        if len(classes) <= _MAX_CLASSES_RECORDED:
            out["classes"] = [c.item() if isinstance(c, np.generic) else str(c) for c in classes]
        out["n_classes"] = len(classes)
    return out


def validate(model: Any) -> None:
    """Refuse trees, neighbour trees and sparse matrices whose indices point outside their arrays.

    Tree.predict, KDTree.query and scipy's sparse routines (compiled) index these arrays without
    bounds checks: a crafted file would read out of bounds. Walks the whole object graph (pipelines,
    ensembles, meta-estimators).

    Raises:
        mlpersist.errors.UntrustedContentError: naming the first bad structure.

    """
    seen: set[int] = set()
    claims = _registry.claims()  # once per load, not once per object of the graph
    trees: list[tuple[Tree, int | None, str]] = []  # checked together at the end (a forest is many small trees)
    stack: list[tuple[Any, int | None, str]] = [(model, None, type(model).__name__)]
    while stack:
        obj, n_features, where = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, np.ndarray, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tree):
            trees.append((obj, n_features, where))
            continue
        module = type(obj).__module__
        owner = _other_adapter(module, claims)
        if owner is not None:  # e.g. an XGBClassifier step: its own adapter knows its structure
            if not hasattr(owner, "check_state"):  # with it, the unpickler had it check the state before it was set
                owner.check(obj, where)
            continue
        if module.partition(".")[0] in NATIVE_STATE:
            raise unchecked_native(type(obj), where)
        if module.startswith("scipy.sparse.") and hasattr(obj, "format"):
            if not _checked(_sparse_ok, obj):
                raise _bad_indices(obj, where, f"a scipy sparse matrix ({obj.format})")
            continue  # its arrays are checked together
        if module.startswith("sklearn.neighbors.") and hasattr(obj, "get_arrays"):
            if not _checked(_binary_tree_ok, obj):
                raise _bad_indices(obj, where, f"a {type(obj).__name__}")
            continue
        nodes = getattr(obj, "nodes", None)
        if isinstance(nodes, np.ndarray) and nodes.dtype.names and "left" in nodes.dtype.names:
            _check_predictor_nodes(nodes, n_features, where)
        n = getattr(obj, "n_features_in_", n_features)
        n = int(n) if isinstance(n, (int, np.integer)) else n_features
        children: Any = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else (
            getattr(obj, "__dict__", {}).values())
        for i, child in enumerate(children):
            stack.append((child, n, f"{where}[{i}]"))
    _check_trees(trees)


def _other_adapter(module: str, claims: Mapping[str, str]) -> Any:
    """The adapter (reached through the registry, never imported directly) that checks objects of `module`, if any."""
    if claims.get(module.partition(".")[0]) in (None, "sklearn"):
        return None  # most of the graph: no registry lookup
    try:
        adapter = _registry.claimant(module, claims)
    except ImportError:  # MissingFrameworkError: the object exists, so this cannot happen; be safe anyway
        return None
    if adapter is None:
        return None
    return adapter if hasattr(adapter, "check") or hasattr(adapter, "check_state") else None


def _check_trees(trees: list[tuple[Tree, int | None, str]]) -> None:
    """Check every decision tree met in the model: sizes one by one, child and feature indices all at once."""
    for tree, n_features, where in trees:
        count = tree.node_count
        if count < 1 or tree.value.shape[0] != count or (n_features is not None and tree.n_features != n_features):
            _refuse_tree(tree, n_features, where)
    if not trees:
        return
    left, right, feature = (np.concatenate([getattr(t, k) for t, _, _ in trees])
                            for k in ("children_left", "children_right", "feature"))
    try:
        bad = first_bad_tree([t.node_count for t, _, _ in trees], left, right, feature,
                             [t.n_features for t, _, _ in trees], adjacent=False)
    except ValueError:
        bad = 0
    if bad is not None:
        _refuse_tree(*trees[bad])


def _refuse_tree(tree: Tree, n_features: int | None, where: str) -> None:
    raise UntrustedContentError(
        f"{where}: a decision tree's child or feature indices point outside its arrays (n_features "
        f"{tree.n_features}, estimator expects {n_features}); the file is crafted or damaged, refusing it",
        ["sklearn.tree._tree.Tree"])


def _sparse_ok(m: Any) -> bool:
    """Whether a scipy sparse matrix's index arrays lie inside it.

    A KNeighbors model's training data, an SVM's support vectors: scipy's and sklearn's compiled routines
    index with them unchecked (a crafted `indices` entry made a KNeighborsClassifier's predict segfault).
    Formats other than these five are refused.
    """
    fmt = getattr(m, "format", None)
    if fmt in ("csr", "csc", "bsr"):
        m.check_format(full_check=True)  # index dtypes and lengths, indptr monotonic, indices inside the shape
        return True
    if fmt == "coo":
        coords = getattr(m, "coords", None) or (m.row, m.col)
        return len(coords) == len(m.shape) and all(
            np.ndim(c) == 1 and len(c) == len(m.data) and (len(c) == 0 or (int(c.min()) >= 0 and int(c.max()) < n))
            for c, n in zip(coords, m.shape, strict=True))
    if fmt == "dia":
        return bool(m.data.ndim == 2 and m.offsets.ndim == 1 and m.data.shape[0] == len(m.offsets))
    return False


def _binary_tree_ok(tree: Any) -> bool:
    """Whether a KDTree's or BallTree's indices (KNeighbors*, KernelDensity...) lie inside its arrays.

    Its queries follow `idx_array` into the data and the implicit children 2i+1, 2i+2 of every inner
    node without bounds checks (a crafted `idx_array` entry segfaulted in predict).
    """
    state = tree.__getstate__()  # (data, idx_array, node_data, node_bounds, leaf_size, n_levels, n_nodes, ...)
    data, idx, nodes, bounds = (np.asarray(a) for a in state[:4])
    n_nodes, weights = state[6], state[12] if len(state) > 12 else None
    n = len(data)
    ok = (data.ndim == 2 and idx.ndim == 1 and len(idx) == n and (n == 0 or (idx.min() >= 0 and idx.max() < n))
          and nodes.ndim == 1 and nodes.dtype.names is not None
          and {"idx_start", "idx_end", "is_leaf"} <= set(nodes.dtype.names) and n_nodes == len(nodes)
          and bounds.ndim == 3 and bounds.shape[1:] == (len(nodes), data.shape[1])
          and (weights is None or np.shape(weights) == (n,)))
    if ok and len(nodes):
        start, end, inner = nodes["idx_start"], nodes["idx_end"], np.flatnonzero(nodes["is_leaf"] == 0)
        ok = bool(np.all((start >= 0) & (start <= end) & (end <= n))) and bool(np.all(2 * inner + 2 < len(nodes)))
    return bool(ok)


def _checked(ok: Any, obj: Any) -> bool:
    """`ok(obj)`, False where the arrays are too malformed to even be compared."""
    try:
        return bool(ok(obj))
    except (ValueError, TypeError, AttributeError, IndexError):
        return False


def _bad_indices(obj: Any, where: str, what: str) -> UntrustedContentError:
    return UntrustedContentError(
        f"{where}: {what} whose index arrays point outside its data or disagree with its shape; the file is "
        "crafted or damaged, refusing it (trusted=True loads it as it is)",
        [f"{type(obj).__module__}.{type(obj).__qualname__}"])


def _check_predictor_nodes(nodes: np.ndarray, n_features: int | None, where: str) -> None:
    count = len(nodes)
    inner = nodes["is_leaf"] == 0
    ok = bool(np.all(~inner | ((nodes["left"] < count) & (nodes["right"] < count)
                               & (nodes["left"] > 0) & (nodes["right"] > 0))))
    if ok and n_features is not None:
        ok = bool(np.all(~inner | (nodes["feature_idx"] < n_features)))
    if not ok:
        raise UntrustedContentError(
            f"{where}: a gradient-boosting predictor's node indices point outside its arrays; "
            "the file is crafted or damaged, refusing it", ["sklearn.ensemble._hist_gradient_boosting"])
