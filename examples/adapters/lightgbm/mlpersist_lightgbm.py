"""LightGBM for mlpersist, written as a third party would: only `mlpersist` and `mlpersist.errors` are used.

Installed, it registers itself through the `mlpersist.adapters` entry point (see pyproject.toml).
"""

from __future__ import annotations

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
        """Check every tree of the text model, then rebuild the Booster (and its wrapper) from it."""
        text = payload.read_bytes(MODEL).decode("utf-8", errors="strict")
        validate(text)
        try:
            booster = lightgbm.Booster(model_str=text)
        except lightgbm.basic.LightGBMError as exc:
            raise CorruptArtifactError(f"LightGBM could not read {MODEL}: {exc}") from exc
        cls = _WRAPPERS.get(str(info.get("wrapper", "Booster")))
        if cls is None:
            raise CorruptArtifactError(f"unknown LightGBM wrapper {info.get('wrapper')!r}")
        if cls is lightgbm.Booster:
            return booster
        return _wrap(cls, booster, info)

    def check(self, obj: Any, where: str) -> None:
        """Validate a LightGBM model met inside another artifact (a pickled pipeline step)."""
        booster = obj if isinstance(obj, lightgbm.Booster) else obj.booster_
        validate(booster.model_to_string())


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


def validate(text: str) -> None:
    """Refuse trees whose child, feature or category indices point outside their arrays.

    LightGBM's own parser trusts them (GHSA-wvg4-4w35-4jc9: out-of-bounds write via SHAP; issues
    7437/7438: out-of-bounds reads).

    Raises:
        mlpersist.errors.UntrustedContentError: naming the first bad tree.
    """
    header, _, body = text.partition("\nTree=")
    fields = dict(line.split("=", 1) for line in header.splitlines() if "=" in line)
    try:
        max_feature = int(fields["max_feature_idx"])
        for block in body.split("end of trees")[0].split("\nTree="):
            tree = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if "num_leaves" in tree:
                _check_tree(tree, max_feature)
    except UntrustedContentError:
        raise
    except (KeyError, ValueError) as exc:
        raise UntrustedContentError(f"{MODEL}: malformed LightGBM model ({exc}); refusing it",
                                    ["lightgbm.Booster"]) from None


def _ints(tree: Mapping[str, str], key: str) -> np.ndarray:
    return np.array(tree.get(key, "").split(), dtype=np.int64)


def _check_tree(tree: Mapping[str, str], max_feature: int) -> None:
    leaves = int(tree["num_leaves"])
    inner = leaves - 1
    left, right, feature = _ints(tree, "left_child"), _ints(tree, "right_child"), _ints(tree, "split_feature")
    idx = np.arange(inner)
    ok = leaves >= 1 and len(left) == len(right) == len(feature) == inner
    for child in (left, right):
        # >= 0: an inner node, after its parent; < 0: leaf ~child
        inner_ok = (child > idx) & (child < inner)
        leaf_ok = (~child >= 0) & (~child < leaves)
        ok = ok and bool(np.all(np.where(child >= 0, inner_ok, leaf_ok)))
    ok = ok and bool(np.all((feature >= 0) & (feature <= max_feature)))
    num_cat = int(tree.get("num_cat", "0"))
    if ok and num_cat > 0:
        bounds, decision = _ints(tree, "cat_boundaries"), _ints(tree, "decision_type")
        thresholds = np.array(tree.get("threshold", "").split(), dtype=np.float64)
        cat = (decision & 1).astype(bool)
        words = len(tree.get("cat_threshold", "").split())
        ok = (len(bounds) == num_cat + 1 and bool(np.all(np.diff(bounds) >= 0)) and bounds[-1] <= words
              and bool(np.all(~cat | ((thresholds >= 0) & (thresholds < num_cat)))))
    if not ok:
        raise UntrustedContentError(f"{MODEL}: a tree's child, feature or category indices point outside its arrays; "
                                    "the model is crafted or damaged, refusing it", ["lightgbm.Booster"])
