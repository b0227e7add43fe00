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
        except xgboost.core.XGBoostError as exc:
            raise CorruptArtifactError(f"XGBoost could not read {name}: {str(exc).splitlines()[0][:200]}") from exc
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
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UntrustedContentError(f"{what}: the booster's structure is malformed or out of range ({exc}); "
                                    "refusing to hand it to XGBoost", ["xgboost.Booster"]) from None


_ARRAYS = ("left_children", "right_children", "parents", "split_indices", "split_conditions", "default_left")


def _check_trees(trees: list[Any], n_features: int) -> None:
    """Check every tree's child, feature and category indices (all trees' node arrays at once)."""
    sizes = []
    for i, tree in enumerate(trees):
        n = int(tree["tree_param"]["num_nodes"])
        if n < 1 or any(len(tree[k]) != n for k in _ARRAYS):
            _refuse(i)
        sizes.append(n)
    if not trees:
        return
    left, right, split = (joined([t[k] for t in trees]) for k in ("left_children", "right_children", "split_indices"))
    bad = first_bad_tree(sizes, left, right, split, n_features, adjacent=True)  # predict assumes adjacent children
    if bad is not None:
        _refuse(bad)
    for i, tree in enumerate(trees):
        if not len(tree.get("categories_segments", ())):
            continue  # no categorical split: nothing to read
        segments, sizes_ = np.asarray(tree.get("categories_segments", [])), np.asarray(tree.get("categories_sizes", []))
        if not (len(segments) == len(sizes_) and bool(np.all(
                (segments >= 0) & (sizes_ >= 0) & (segments + sizes_ <= len(tree.get("categories", [])))))):
            _refuse(i)


def _refuse(i: int) -> None:
    raise UntrustedContentError(f"tree {i}: child, feature or category indices point outside its arrays; "
                                "the model is crafted or damaged, refusing it", ["xgboost.Booster"])
