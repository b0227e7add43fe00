"""XGBoost: `save_model` as UBJSON (or JSON), vetted by mlpersist before XGBoost's native parser reads it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xgboost

from mlpersist import Payload, PersistError, _gc
from mlpersist._trees import first_bad_tree
from mlpersist._ubjson import joined
from mlpersist._ubjson import loads as ubjson_loads
from mlpersist.errors import CorruptArtifactError, UntrustedContentError

_FILES = {"ubj": "model.ubj", "json": "model.json"}
# A fixed table: the class to rebuild is never taken from the file.
_WRAPPERS: dict[str, type] = {c.__name__: c for c in (
    xgboost.Booster, xgboost.XGBClassifier, xgboost.XGBRegressor, xgboost.XGBRanker,
    xgboost.XGBRFClassifier, xgboost.XGBRFRegressor, xgboost.XGBModel)}


class XGBoostAdapter:
    """Booster and the scikit-learn wrappers, through XGBoost's own data-only model format."""

    name: ClassVar[str] = "xgboost"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("xgboost", "numpy", "scipy")

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]:
        """Write model.ubj (or model.json) with `save_model`; record the wrapper class to rebuild."""
        if options:
            raise PersistError(f"the xgboost adapter takes no save options, not {', '.join(sorted(options))}")
        wrapper = type(model).__name__
        if type(model) not in _WRAPPERS.values():
            raise PersistError(f"{type(model).__qualname__} is not one of the XGBoost classes mlpersist rebuilds "
                               f"({', '.join(sorted(_WRAPPERS))}); save it with format=... of its base, or pickle it")
        model.save_model(str(dest / _FILES[format]))
        booster = model if isinstance(model, xgboost.Booster) else model.get_booster()
        info: dict[str, Any] = {"wrapper": wrapper, "n_features_in": int(booster.num_features())}
        classes = getattr(model, "classes_", None)
        if isinstance(classes, np.ndarray) and classes.ndim == 1 and len(classes) <= 1000:
            info["classes"] = classes.tolist()
        return info

    def load(self, payload: Payload, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        """Parse and check the trees, then let XGBoost load the very bytes that were checked.

        A trusted load (`trusted=True`, or a manifest signed by a configured key) skips the check, as
        scikit-learn's tree validation and Keras's config vetting are skipped: the caller vouches for
        the file's author, and XGBoost reads it as it would read any file of theirs.
        """
        if options:
            raise PersistError(f"the xgboost adapter takes no load options, not {', '.join(sorted(options))}")
        name = _FILES.get(format)
        if name is None:
            raise CorruptArtifactError(f"unknown xgboost format {format!r}")
        raw = payload.read_bytes(name)
        if not payload.policy.trusted:
            vet(raw, format, name)
        cls = _WRAPPERS.get(str(info.get("wrapper", "Booster")))
        if cls is None:
            raise CorruptArtifactError(f"unknown XGBoost wrapper {info.get('wrapper')!r}")
        model = cls()
        try:
            model.load_model(bytearray(raw))
        except Exception as exc:  # XGBoostError; UnicodeDecodeError when XGBoost's message quotes the file's bytes
            why = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise CorruptArtifactError(f"XGBoost could not read {payload.label(name)}: {type(exc).__name__}: "
                                       f"{why}") from exc
        return model


    def example_outputs(self, model: Any, args: list[Any]) -> Mapping[str, Any] | None:
        """A Booster predicts on a DMatrix; the scikit-learn wrappers answer predict/predict_proba as usual."""
        if isinstance(model, xgboost.Booster):
            return {"predict": model.predict(xgboost.DMatrix(args[0]))}
        return None

    def check(self, obj: Any, where: str) -> None:
        """Validate an XGBoost model met inside another artifact (an sklearn Pipeline step)."""
        booster = obj if isinstance(obj, xgboost.Booster) else obj.get_booster()
        vet(bytes(booster.save_raw("ubj")), "ubj", where)


def vet(raw: bytes, format: str, what: str) -> None:
    """Parse and check the model document, with the garbage collector paused until it is dropped.

    Its thousands of dicts and arrays are garbage once checked: freed before the collector resumes,
    they count toward no collection (one that walked them took 1.5-3 ms in a process with TensorFlow
    and torch imported).
    """
    with _gc.paused():
        validate(parse(raw, format, what), what)


def parse(raw: bytes, format: str, what: str) -> Any:
    """Read the model document ourselves: bounded, no native code."""
    if format == "ubj":
        return ubjson_loads(raw, what, lazy=True)  # typed arrays read when checked (most are not)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptArtifactError(f"{what} is not valid JSON: {str(exc)[:120]}") from None


def validate(doc: Any, what: str) -> None:
    """Refuse trees whose child, feature or category indices point outside their arrays (xgboost #7903).

    Raises:
        mlpersist.errors.UntrustedContentError: naming the first bad tree.

    """
    try:
        learner = doc["learner"]
        n_features = int(learner["learner_model_param"]["num_feature"])
        booster = learner["gradient_booster"]
        if booster["name"] == "gblinear":
            return  # a weight vector: no indices to follow
        model = (booster["gbtree"] if booster["name"] == "dart" else booster)["model"]
        trees = model["trees"]
        if len(model["tree_info"]) != len(trees) or int(model["gbtree_model_param"]["num_trees"]) != len(trees):
            raise ValueError("tree_info and num_trees disagree with the number of trees")
        _check_trees(trees, n_features)
    except UntrustedContentError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:  # Overflow: an int past int64
        raise UntrustedContentError(f"{what}: the booster's structure is malformed or out of range ({exc}); "
                                    "refusing to hand it to XGBoost", ["xgboost.Booster"]) from None


_ARRAYS = ("left_children", "right_children", "parents", "split_indices", "split_conditions", "default_left")


def _check_trees(trees: list[Any], n_features: int) -> None:
    """Check every tree's child, parent, feature and category indices (all trees' node arrays at once)."""
    sizes, categorical = [], set()
    for i, tree in enumerate(trees):
        n = int(tree["tree_param"]["num_nodes"])
        if n < 1 or any(len(tree[k]) != n for k in _ARRAYS):
            _refuse(i)
        sizes.append(n)
        if len(tree.get("categories_nodes", ())):
            categorical.add(i)
    if not trees:
        return
    left, right, split, parents = (joined([t[k] for t in trees])
                                   for k in ("left_children", "right_children", "split_indices", "parents"))
    bad = first_bad_tree(sizes, left, right, split, n_features, adjacent=True)  # predict assumes adjacent children
    if bad is None:
        bad = _first_bad_parents(sizes, left, right, parents)
    if bad is not None:
        _refuse(bad)
    split_type = joined([t["split_type"] if "split_type" in t else np.zeros(n, np.uint8) for t, n in zip(
        trees, sizes, strict=True)])  # absent before XGBoost 1.6: every split numerical
    if len(split_type) != len(left):
        _refuse(next(i for i, (t, n) in enumerate(zip(trees, sizes, strict=True))
                     if len(t.get("split_type", [0] * n)) != n))
    unknown = np.flatnonzero((split_type != 0) & (split_type != 1))
    if len(unknown):
        _refuse(_tree_of(sizes, int(unknown[0])))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    categorical.update(np.searchsorted(ends, np.flatnonzero(split_type == 1), side="right").tolist())  # their trees
    for i in sorted(categorical):  # most models have none: no per-tree work for them
        span = slice(int(starts[i]), int(starts[i]) + sizes[i])
        if not _categories_ok(trees[i], np.asarray(split_type[span]), np.asarray(left[span])):
            _refuse(i)


def _tree_of(sizes: list[int], node: int) -> int:
    """The tree that holds the `node`-th node of all trees' joined arrays."""
    return int(np.searchsorted(np.cumsum(sizes), node, side="right"))


def _first_bad_parents(sizes: list[int], left: Any, right: Any, parents: Any) -> int | None:
    """Return the first tree whose `parents` disagree with its children, or None.

    Every node but the root is the child of exactly one node, which is its parent; the root's parent
    is 2**31 - 1, as XGBoost writes it. XGBoost follows each node's parent as it loads (to mark left
    children), unchecked: a parent index past the tree made the load segfault. Called once children
    are known to lie inside their trees.
    """
    counts = np.asarray(sizes, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    base = np.repeat(starts, counts)
    local = np.arange(len(left), dtype=np.int64) - base  # each node's index in its tree
    inner = np.flatnonzero(np.asarray(left) != -1)
    children = np.concatenate([left[inner] + base[inner], right[inner] + base[inner]]).astype(np.int64)
    expected = np.full(len(left), _ROOT_PARENT, dtype=np.int64)
    expected[children] = np.concatenate([local[inner], local[inner]])
    times_a_child = np.bincount(children, minlength=len(left))
    bad = (np.asarray(parents, dtype=np.int64) != expected) | (times_a_child != (local != 0))
    if not bad.any():
        return None
    return _tree_of(sizes, int(np.argmax(bad)))


def _categories_ok(tree: Any, split_type: Any, left: Any) -> bool:
    """Whether a tree's categorical splits are where its category lists say, each list inside `categories`.

    XGBoost reads `categories_nodes` in order while it walks the nodes, builds each split's bit set
    from its slice of `categories` (as large as the largest category), and predicts categorical nodes
    (`split_type` 1) from those sets: the nodes listed must be exactly the inner nodes marked
    categorical, ascending, their slices non-empty and inside the list, the categories int32 and not
    negative.
    """
    nodes, segments, sizes, categories = (np.asarray(tree.get(k, ()), dtype=np.int64) for k in (
        "categories_nodes", "categories_segments", "categories_sizes", "categories"))
    marked = np.flatnonzero(split_type == 1)
    return bool(len(nodes) == len(segments) == len(sizes) and np.array_equal(nodes, marked)
                and np.all(left[marked] != -1) and np.all((segments >= 0) & (sizes > 0))
                and np.all(segments + sizes <= len(categories))
                and np.all((categories >= 0) & (categories <= _INT32_MAX)))


_ROOT_PARENT = _INT32_MAX = 2**31 - 1


def _refuse(i: int) -> None:
    raise UntrustedContentError(f"tree {i}: child, feature or category indices point outside its arrays; "
                                "the model is crafted or damaged, refusing it", ["xgboost.Booster"])
