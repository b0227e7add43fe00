"""XGBoost adapter: Booster and sklearn wrappers through UBJSON/JSON, vetted before XGBoost parses them."""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any, ClassVar

import pytest
from contract import AdapterContract
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlp_testkit import collections_started, grown_tree, require, run_python
from ubjson_kit import ARRAY_MARKERS, encode, read_arrays, same

from mlpersist import (
    CorruptArtifactError,
    PersistError,
    UntrustedContentError,
    VersionMismatchError,
    VersionMismatchWarning,
    load_any,
    save_any,
)


def xgb_version() -> tuple[int, int]:
    """The installed XGBoost's (major, minor): its file layout and what it reads changed at 3.1 and 3.2."""
    major, minor = require("xgboost").__version__.split(".")[:2]
    return int(major), int(minor)


def data(n: int = 300, features: int = 6, seed: int = 0) -> tuple[Any, Any]:
    return require("sklearn.datasets").make_classification(n, features, n_informative=4, random_state=seed)


class TestXGBoost(AdapterContract):
    adapter = "xgboost"
    framework_module = "xgboost"
    mutants: ClassVar[tuple[tuple[str, int], ...]] = (("xgboost-ubj", 400), ("xgboost-json", 200),
                                                      ("xgboost-multiclass", 200), ("xgboost-vector", 200),
                                                      ("xgboost-many", 100))

    def make_model(self) -> Any:
        x, y = data()
        return require("xgboost").XGBClassifier(n_estimators=30, max_depth=4).fit(x, y)

    def make_input(self) -> Any:
        return data(50, seed=1)[0]

    def outputs(self, model: Any, x: Any) -> Any:
        return model.predict_proba(x)


def test_dispatch_picks_xgboost_over_scikit_learn(tmp_path: Path) -> None:
    from mlpersist._dispatch import detect

    x, y = data()
    assert detect(require("xgboost").XGBRegressor(n_estimators=2).fit(x, y)) == "xgboost"


@pytest.mark.parametrize("kind", ["XGBRegressor", "XGBRFClassifier", "XGBRFRegressor"])
def test_sklearn_wrappers_round_trip(kind: str, tmp_path: Path) -> None:
    xgb, np = require("xgboost"), require("numpy")
    x, y = data()
    model = getattr(xgb, kind)(n_estimators=10, max_depth=3).fit(x, y)
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_a_ranker_round_trips(tmp_path: Path) -> None:
    xgb, np = require("xgboost"), require("numpy")
    x, y = data()
    qid = np.repeat(np.arange(30), 10)
    model = xgb.XGBRanker(n_estimators=10).fit(x, y, qid=qid)
    save_any(model, tmp_path / "m")
    np.testing.assert_array_equal(load_any(tmp_path / "m").predict(x), model.predict(x))


def test_a_booster_keeps_best_iteration_feature_names_and_types(tmp_path: Path) -> None:
    xgb, np = require("xgboost"), require("numpy")
    x, y = data()
    names = [f"f_{i}" for i in range(6)]
    dtrain = xgb.DMatrix(x[:200], y[:200], feature_names=names)
    dvalid = xgb.DMatrix(x[200:], y[200:], feature_names=names)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3}, dtrain, 200, evals=[(dvalid, "v")],
                        early_stopping_rounds=5, verbose_eval=False)
    save_any(booster, tmp_path / "b", format="json")
    loaded = load_any(tmp_path / "b")
    assert loaded.best_iteration == booster.best_iteration and loaded.feature_names == names
    assert loaded.feature_types == booster.feature_types
    np.testing.assert_array_equal(loaded.predict(dvalid), booster.predict(dvalid))


def test_categorical_features_survive(tmp_path: Path) -> None:
    xgb, pd, np = require("xgboost"), require("pandas"), require("numpy")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"plan": pd.Categorical(rng.choice(["a", "b", "c"], 300)), "x": rng.normal(size=300)})
    y = (df["plan"] == "b").astype(int) ^ (df["x"] > 1).astype(int)
    model = xgb.XGBClassifier(n_estimators=10, enable_categorical=True, tree_method="hist").fit(df, y)
    save_any(model, tmp_path / "m")
    np.testing.assert_array_equal(load_any(tmp_path / "m").predict_proba(df), model.predict_proba(df))


def test_an_xgboost_artifact_holds_no_pickle_and_loads_under_default_trust(tmp_path: Path) -> None:
    x, y = data()
    m = save_any(require("xgboost").XGBClassifier(n_estimators=3).fit(x, y), tmp_path / "m")
    assert set(m.files) == {"model.ubj"} and m.info["classes"] == [0, 1]
    out = run_python(f"""
        import sys, mlpersist
        mlpersist.load_any({str(tmp_path / 'm')!r})
        print("mlpersist._safepickle" in sys.modules)
    """)
    assert out.stdout.split() == ["False"]  # the guarded unpickler was never needed


def test_the_column_reader_is_imported_by_checked_loads_only(tmp_path: Path) -> None:
    """The tree reader's modules (~4 ms of import) are not imported by a save, nor by a trusted load where the
    installed XGBoost reads the model as it was written (3.1+; an older one needs its base score read first)."""
    require("xgboost")
    out = run_python(f"""
        import sys, mlpersist, numpy as np, xgboost
        reader = ("mlpersist._runs", "mlpersist._template", "mlpersist._rows")
        x = np.random.default_rng(0).normal(size=(200, 4))
        model = xgboost.XGBClassifier(n_estimators=20).fit(x, x[:, 0] > 0)
        mlpersist.save_any(model, {str(tmp_path / 'm')!r})
        print(sum(m in sys.modules for m in reader))
        mlpersist.load_any({str(tmp_path / 'm')!r}, trusted=True)
        print(sum(m in sys.modules for m in reader))
        mlpersist.load_any({str(tmp_path / 'm')!r})
        print(sum(m in sys.modules for m in reader))
    """)
    reads_as_written = xgb_version() >= (3, 1)
    assert out.stdout.split() == ["0", "0" if reads_as_written else "3", "3"]


@pytest.mark.parametrize("suffix", ["json", "ubj"])
def test_a_bare_model_file_loads_as_a_booster(suffix: str, tmp_path: Path) -> None:
    xgb, np = require("xgboost"), require("numpy")
    x, y = data()
    model = xgb.XGBClassifier(n_estimators=5).fit(x, y)
    model.save_model(str(tmp_path / f"model.{suffix}"))
    loaded = load_any(tmp_path / f"model.{suffix}")
    assert isinstance(loaded, xgb.Booster)
    np.testing.assert_array_equal(loaded.predict(xgb.DMatrix(x)), model.get_booster().predict(xgb.DMatrix(x)))


def test_a_feature_count_far_beyond_what_the_model_shows_is_refused(tmp_path: Path) -> None:
    """XGBoost's predict allocates num_feature values per row of a block, per thread: a small model edited to a
    billion features loaded, and its first predict took 24 GB in 59 s before the kernel killed it."""
    xgb = require("xgboost")
    from mlpersist.adapters.xgboost import SPARE_FEATURES

    x, y = data()
    xgb.XGBClassifier(n_estimators=5, max_depth=3).fit(x, y).save_model(str(tmp_path / "model.json"))
    doc = json.loads((tmp_path / "model.json").read_text())
    used = 1 + max(i for tree in doc["learner"]["gradient_booster"]["model"]["trees"]
                   for i, left in zip(tree["split_indices"], tree["left_children"], strict=True) if left != -1)
    for n_features, refused in ((10**9, True), (used + SPARE_FEATURES + 1, True), (used + SPARE_FEATURES, False)):
        doc["learner"]["learner_model_param"]["num_feature"] = str(n_features)
        (tmp_path / "edited.json").write_text(json.dumps(doc))
        if refused:
            with pytest.raises(UntrustedContentError, match=f"num_feature is {n_features}, far beyond"):
                load_any(tmp_path / "edited.json")
        else:  # unused trailing features, up to SPARE_FEATURES of them
            assert load_any(tmp_path / "edited.json").num_features() == n_features
    doc["learner"]["feature_names"] = [f"f{i}" for i in range(2 * SPARE_FEATURES)]  # named features count
    doc["learner"]["feature_types"] = ["float"] * (2 * SPARE_FEATURES)
    doc["learner"]["learner_model_param"]["num_feature"] = str(2 * SPARE_FEATURES)
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    assert load_any(tmp_path / "edited.json").num_features() == 2 * SPARE_FEATURES


@pytest.mark.parametrize("kind", ["classes", "targets", "no-trees"])
def test_an_output_count_beyond_what_the_model_shows_is_refused(kind: str, tmp_path: Path) -> None:
    """XGBoost keeps a base score per output and predicts rows x outputs values: a 3-class model of a few KB
    edited to 100,000,000 classes took 0.5 GB to load and 12 GB and 73 s to predict 10 rows (XGBoost 3.2)."""
    xgb, np = require("xgboost"), require("numpy")
    from mlpersist.adapters.xgboost import SPARE_OUTPUTS

    x, y = data()
    if kind == "classes":
        model = xgb.XGBClassifier(n_estimators=2, max_depth=2).fit(x, np.arange(len(y)) % 3).get_booster()
    elif kind == "targets":  # one tree per target and round
        model = xgb.XGBRegressor(n_estimators=2, max_depth=2).fit(x, np.stack([x[:, 0], y, -y], axis=1)).get_booster()
    else:  # a booster trained for no round: nothing but its parameters
        model = xgb.train({"objective": "multi:softprob", "num_class": 3}, xgb.DMatrix(x, np.arange(len(y)) % 3), 0)
    model.save_model(str(tmp_path / "model.json"))
    doc = json.loads((tmp_path / "model.json").read_text())
    param = doc["learner"]["learner_model_param"]
    field = "num_target" if kind == "targets" else "num_class"
    assert int(param[field]) == 3
    np.testing.assert_array_equal(load_any(tmp_path / "model.json").predict(xgb.DMatrix(x)),
                                  model.predict(xgb.DMatrix(x)))
    param["base_score"] = "5E-1"  # one score for all outputs, as XGBoost before 3.1 writes it
    edits = [10**8, 4] if kind != "no-trees" else [10**8, SPARE_OUTPUTS + 1]
    for outputs in edits:
        param[field] = str(outputs)
        (tmp_path / "edited.json").write_text(json.dumps(doc))
        with pytest.raises(UntrustedContentError, match=f"give {outputs} outputs"):
            load_any(tmp_path / "edited.json")
    if kind == "no-trees":  # nothing to show its classes: a few are taken
        param[field] = str(SPARE_OUTPUTS)
        (tmp_path / "edited.json").write_text(json.dumps(doc))
        assert load_any(tmp_path / "edited.json").predict(xgb.DMatrix(x[:2])).shape == (2, SPARE_OUTPUTS)


def test_a_pipeline_with_an_xgboost_step_uses_the_sklearn_adapter_safely(tmp_path: Path) -> None:
    np = require("numpy")
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = data()
    pipe = make_pipeline(StandardScaler(), require("xgboost").XGBClassifier(n_estimators=5)).fit(x, y)
    m = save_any(pipe, tmp_path / "p")
    assert m.adapter == "sklearn"
    np.testing.assert_array_equal(load_any(tmp_path / "p").predict_proba(x), pipe.predict_proba(x))


# --- crafted boosters (catalogue X01), each checked in a fresh process -------------------------------

CRAFT = """
import json, sys, numpy as np, xgboost as xgb
from sklearn.datasets import make_classification
import mlpersist
kind, out = sys.argv[1], sys.argv[2]
x, y = make_classification(200, 5, random_state=0)
model = xgb.XGBClassifier(n_estimators=3, max_depth=3).fit(x, y)
model.save_model(out + "/model.json")
doc = json.load(open(out + "/model.json"))
tree = doc["learner"]["gradient_booster"]["model"]["trees"][1]
if kind == "child":
    tree["left_children"][0] = 10**6
elif kind == "adjacency":
    tree["right_children"][0] = tree["left_children"][0] + 2
elif kind == "right-past-end":  # adjacent children, the right one just past the tree's last node
    n = len(tree["left_children"])
    tree["left_children"][0], tree["right_children"][0] = n - 1, n
elif kind == "loop":
    tree["left_children"][0], tree["right_children"][0] = 0, 1
elif kind == "feature":
    tree["split_indices"][0] = 99
elif kind == "tree-info":
    doc["learner"]["gradient_booster"]["model"]["tree_info"].append(0)
elif kind == "parent":  # XGBoost follows it while loading (made the load segfault)
    tree["parents"][1] = 2**24
elif kind == "wrong-parent":  # inside the tree, but not the node whose child it is
    tree["parents"][1] = tree["parents"][2] = 1
elif kind == "shared-children":  # two nodes claim the same children (the second's own are orphaned)
    inner = [i for i, c in enumerate(tree["left_children"]) if c != -1]
    a, b = inner[1], inner[2]
    tree["left_children"][b], tree["right_children"][b] = tree["left_children"][a], tree["right_children"][a]
elif kind == "split-type":
    tree["split_type"][0] = 2
elif kind == "categorical-unlisted":  # a categorical split with no categories to read
    tree["split_type"][0] = 1
json.dump(doc, open(out + "/model.json", "w"))
try:
    mlpersist.load_any(out + "/model.json")
    print("LOADED")
except mlpersist.UntrustedContentError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("kind", ["child", "adjacency", "right-past-end", "loop", "feature", "tree-info", "parent",
                                  "wrong-parent", "shared-children", "split-type", "categorical-unlisted"])
def test_crafted_tree_indices_are_refused_before_xgboost_parses_them(kind: str, tmp_path: Path) -> None:
    require("xgboost")
    (tmp_path / "craft.py").write_text(CRAFT)
    proc = run_python(f"import runpy, sys; sys.argv = ['x', {kind!r}, {str(tmp_path)!r}]; "
                      f"runpy.run_path({str(tmp_path / 'craft.py')!r})")
    assert proc.stdout.startswith("REFUSED"), proc.stdout + proc.stderr
    if kind != "tree-info":
        assert "tree 1:" in proc.stdout  # the crafted tree is named, though all trees are checked at once


# --- the model beyond the node arrays: output groups, ids, iterations, leaf vectors, category encodings --------
# Each kind below crashed XGBoost 3.2 (segfault, abort or heap corruption) when the crafted model predicted, or
# read past an array without a crash (linear weights). Checked in a fresh process per base model: a kind that
# got through would crash it there, not the test run.

STRUCTURE = """
import json, sys, numpy as np, xgboost as xgb
import mlpersist
out, base, kinds = sys.argv[1], sys.argv[2], sys.argv[3:]
rng = np.random.default_rng(0)
x = rng.normal(size=(200, 4))
y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
if base == "multiclass":
    model, data = xgb.XGBClassifier(n_estimators=3, max_depth=2).fit(x, y), x
elif base == "vector":
    model, data = xgb.XGBRegressor(n_estimators=3, max_depth=2, tree_method="hist",
                                   multi_strategy="multi_output_tree").fit(x, x[:, :3] * 2), x
elif base == "linear":
    model, data = xgb.XGBClassifier(n_estimators=3, booster="gblinear").fit(x, y), x
elif base == "dart":
    model, data = xgb.XGBClassifier(n_estimators=3, booster="dart").fit(x, y), x
else:
    import pandas as pd
    data = pd.DataFrame({"plan": pd.Categorical(rng.choice(["a", "b", "c", "d"], 200)), "x": x[:, 0],
                         "n": pd.Categorical(rng.choice([3, 7, 9], 200))})
    model = xgb.XGBClassifier(n_estimators=3, max_depth=2, enable_categorical=True, tree_method="hist",
                              max_cat_to_onehot=1).fit(data, y)
for kind in kinds:
    doc = json.loads(bytes(model.get_booster().save_raw("json")))
    booster = doc["learner"]["gradient_booster"]
    m = booster["gbtree"]["model"] if booster["name"] == "dart" else booster["model"]
    tree, cats = (m["trees"][1] if "trees" in m else None), m.get("cats")
    if (kind.startswith(("leaf-index", "leaf-weights")) and "leaf_weights" not in tree
            or base == "frame" and kind != "as-written" and not cats):
        print(kind, "SKIPPED", "(not written by XGBoost", xgb.__version__ + ")")
        continue
    if kind == "tree-info-past-outputs":
        m["tree_info"][0] = 3
    elif kind == "tree-info-far":
        m["tree_info"][0] = 100000
    elif kind == "tree-info-negative":
        m["tree_info"][0] = -5
    elif kind == "iterations-negative":
        m["iteration_indptr"][1] = -5
    elif kind == "iterations-falling":
        m["iteration_indptr"][1:3] = m["iteration_indptr"][2:0:-1]
    elif kind == "repeated-id":
        tree["id"] = 0
    elif kind == "leaf-index-far":
        tree["right_children"][-1] = 100000
    elif kind == "leaf-index-negative":
        tree["right_children"][-1] = -7
    elif kind == "leaf-index-repeated":
        tree["right_children"][-1] = tree["right_children"][-2]
    elif kind == "leaf-weights-short":
        tree["leaf_weights"] = tree["leaf_weights"][:3]
    elif kind == "base-weights-short":
        tree["base_weights"] = tree["base_weights"][:3]
    elif kind == "leaf-vector-wider":
        tree["tree_param"]["size_leaf_vector"] = "30"
    elif kind == "fewer-outputs":
        doc["learner"]["learner_model_param"].update(num_target="2", base_score="[0,0]")
    elif kind == "offsets-past-values":
        cats["enc"][0]["offsets"][-1] = 400000
    elif kind == "sorted-index-far":
        cats["sorted_idx"][3] = 300000
    elif kind == "sorted-index-negative":
        cats["sorted_idx"][3] = -3000000
    elif kind == "sorted-index-repeated":
        cats["sorted_idx"][1] = cats["sorted_idx"][0]
    elif kind == "segments-past-end":
        cats["feature_segments"][-1] = 700000
    elif kind == "weights-short":
        m["weights"] = m["weights"][:2]
    elif kind == "more-features":
        doc["learner"]["learner_model_param"]["num_feature"] = "1000"
    elif kind == "weight-drop-short":
        booster["weight_drop"] = booster["weight_drop"][:1]
    elif kind != "as-written":
        raise SystemExit("unknown kind " + kind)
    path = f"{out}/{base}-{kind}.json"
    with open(path, "w") as f:
        json.dump(doc, f)
    try:
        loaded = mlpersist.load_any(path)
    except mlpersist.UntrustedContentError as exc:
        print(kind, "REFUSED", exc)
        continue
    matrix = xgb.DMatrix(data, enable_categorical=True)  # predicting is what crashed
    same = np.array_equal(loaded.predict(matrix), model.get_booster().predict(matrix))
    print(kind, "LOADED", "same" if same else "differs")
"""

_STRUCTURE_KINDS = {
    "multiclass": ["tree-info-past-outputs", "tree-info-far", "tree-info-negative", "iterations-negative",
                   "iterations-falling", "repeated-id"],
    "vector": ["leaf-index-far", "leaf-index-negative", "leaf-index-repeated", "leaf-weights-short",
               "base-weights-short", "leaf-vector-wider", "fewer-outputs"],
    "frame": ["offsets-past-values", "sorted-index-far", "sorted-index-negative", "sorted-index-repeated",
              "segments-past-end"],
    "linear": ["weights-short", "more-features"],
    "dart": ["weight-drop-short"],
}


@pytest.mark.parametrize("base", sorted(_STRUCTURE_KINDS))
def test_crafted_model_structure_is_refused(base: str, tmp_path: Path) -> None:
    require("xgboost")
    if base == "frame":
        require("pandas")
    (tmp_path / "structure.py").write_text(STRUCTURE)
    kinds = ["as-written", *_STRUCTURE_KINDS[base]]
    proc = run_python(f"import runpy, sys; sys.argv = ['x', {str(tmp_path)!r}, {base!r}, *{kinds!r}]; "
                      f"runpy.run_path({str(tmp_path / 'structure.py')!r})", check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a signal here: a kind reached XGBoost's predictor
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines.pop("as-written") == "LOADED same"  # the base model itself passes the check, unchanged
    assert set(lines) == set(_STRUCTURE_KINDS[base])
    for kind, outcome in lines.items():
        assert outcome.startswith(("REFUSED", "SKIPPED")), f"{kind}: {outcome}"
    if all(outcome.startswith("SKIPPED") for outcome in lines.values()):
        pytest.skip(f"this XGBoost writes none of the fields these {base} kinds change")  # `cats`: 3.1 and later
    if base == "multiclass":
        assert "tree 1: its id is 0, not its place in the list" in lines["repeated-id"]
        assert "tree_info names an output outside the model's 3" in lines["tree-info-far"]


def _vector_leaf_model(kind: str) -> tuple[Any, Any]:
    xgb, np = require("xgboost"), require("numpy")
    x = np.random.default_rng(0).normal(size=(200, 4))
    if kind == "regressor":
        return xgb.XGBRegressor(n_estimators=4, max_depth=3, tree_method="hist",
                                multi_strategy="multi_output_tree").fit(x, x[:, :3] * 2 + x[:, 3:]), x
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    return xgb.XGBClassifier(n_estimators=4, max_depth=3, tree_method="hist",
                             multi_strategy="multi_output_tree").fit(x, y), x


@pytest.mark.parametrize("fmt", ["ubj", "json"])
@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_vector_leaf_models_round_trip(kind: str, fmt: str, tmp_path: Path) -> None:
    """multi_strategy="multi_output_tree": one tree per round, a vector in each leaf (they were all refused)."""
    np = require("numpy")
    model, x = _vector_leaf_model(kind)
    save_any(model, tmp_path / "m", format=fmt)
    loaded = load_any(tmp_path / "m")
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    np.testing.assert_array_equal(load_any(tmp_path / "m", trusted=True).predict(x), model.predict(x))
    if kind == "classifier":
        np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("fmt", ["json", "ubj"])
def test_a_vector_leaf_tree_in_the_layout_before_3_2(fmt: str, trusted: bool, tmp_path: Path) -> None:
    """XGBoost 3.2 keeps leaf vectors in `leaf_weights` and crashed reading a vector-leaf model written before
    it: such a model is a VersionMismatchError there, and loads where an older XGBoost is installed. A trusted
    load skips the check, and finds that layout without parsing the file (XGBoost's own load would crash)."""
    xgb, np = require("xgboost"), require("numpy")
    model, x = _vector_leaf_model("regressor")
    doc = json.loads(bytes(model.get_booster().save_raw("json")))
    for tree in doc["learner"]["gradient_booster"]["model"]["trees"]:  # as XGBoost 3.1 and older write it
        for key in ("leaf_weights", "loss_changes", "sum_hessian"):
            tree.pop(key, None)
        tree["right_children"] = [-1 if left == -1 else right
                                  for left, right in zip(tree["left_children"], tree["right_children"], strict=True)]
    old = tmp_path / f"old.{fmt}"  # UBJSON with lengths as XGBoost writes them (int64)
    old.write_bytes(json.dumps(doc).encode() if fmt == "json" else encode(doc, "L"))
    if xgb_version() >= (3, 2):
        subject = "its trees are vector-leaf trees" if trusted else "tree 0 is a vector-leaf tree"
        with pytest.raises(VersionMismatchError, match=rf"{subject} .* before 3\.2.*xgboost<3\.2"):
            load_any(old, trusted=trusted)
    else:
        matrix = xgb.DMatrix(x)
        np.testing.assert_array_equal(load_any(old, trusted=trusted).predict(matrix),
                                      model.get_booster().predict(matrix))


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("objective", ["binary:logistic", "reg:squarederror", "multi:softprob"])
def test_a_base_score_per_output_loads_right_or_not_at_all(objective: str, trusted: bool, tmp_path: Path) -> None:
    """XGBoost 3.1 and later write `base_score` as a list, one per output; 2.x and 3.0 read a list as 0.5, and
    every prediction of such a model was off (by 4.5 for a regression), silently. A single score is set after
    loading; several are a VersionMismatchError there. Where XGBoost reads lists, the model loads as it is."""
    xgb, np = require("xgboost"), require("numpy")
    x = np.random.default_rng(0).normal(size=(200, 4))
    y = {"binary:logistic": (x[:, 0] > 0.7).astype(int), "reg:squarederror": x[:, 0] * 3 + 5,
         "multi:softprob": (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)}[objective]
    booster = xgb.train({"objective": objective, "max_depth": 2, **({"num_class": 3} if "multi" in objective else {})},
                        xgb.DMatrix(x, y), 3)
    doc = json.loads(bytes(booster.save_raw("json")))
    param = doc["learner"]["learner_model_param"]
    score = param["base_score"].strip("[]").split(",")[0]
    assert "multi" in objective or float(score) != 0.5  # else a misread score would go unnoticed
    if not param["base_score"].startswith("["):  # an XGBoost older than 3.1 wrote one number: as 3.1+ would
        param["base_score"] = f"[{','.join([score] * (3 if 'multi' in objective else 1))}]"
    (tmp_path / "m.json").write_text(json.dumps(doc))
    matrix = xgb.DMatrix(x)
    lists_read = xgb_version() >= (3, 1)
    if "multi" in objective and not lists_read:
        with pytest.raises(VersionMismatchError, match=r"base score per output \(3\).*install xgboost>=3\.1"):
            load_any(tmp_path / "m.json", trusted=trusted)
        return
    loaded = load_any(tmp_path / "m.json", trusted=trusted)
    np.testing.assert_array_equal(loaded.predict(matrix), booster.predict(matrix))


def _categorical_model_json(tmp_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    xgb, pd, np = require("xgboost"), require("pandas"), require("numpy")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"plan": pd.Categorical(rng.choice(["a", "b", "c", "d"], 300)), "x": rng.normal(size=300)})
    y = (df["plan"].isin(["b", "d"])).astype(int) ^ (df["x"] > 1).astype(int)
    model = xgb.XGBClassifier(n_estimators=3, max_depth=2, enable_categorical=True, tree_method="hist",
                              max_cat_to_onehot=1).fit(df, y)
    return model, df, json.loads(bytes(model.get_booster().save_raw("json")))


@pytest.mark.parametrize("kind", ["negative-category", "segment-past-end", "empty-segment", "node-unmarked",
                                  "node-order", "category-past-int64"])
def test_crafted_categorical_splits_are_refused(kind: str, tmp_path: Path) -> None:
    """XGBoost builds each categorical split's bit set from its slice of `categories` as it walks the nodes."""
    np = require("numpy")
    model, df, doc = _categorical_model_json(tmp_path)
    trees = doc["learner"]["gradient_booster"]["model"]["trees"]
    i, tree = next((i, t) for i, t in enumerate(trees) if len(t["categories_nodes"]) >= 1)
    (tmp_path / "good.json").write_text(json.dumps(doc))  # as written, it loads and predicts as the model does
    matrix = require("xgboost").DMatrix(df, enable_categorical=True)
    np.testing.assert_array_equal(load_any(tmp_path / "good.json").predict(matrix), model.get_booster().predict(matrix))
    if kind == "negative-category":
        tree["categories"][tree["categories_segments"][0]] = -5
    elif kind == "category-past-int64":  # numpy's OverflowError is not a ValueError
        tree["categories"][tree["categories_segments"][0]] = 2**70
    elif kind == "segment-past-end":
        tree["categories_sizes"][0] = len(tree["categories"]) + 1
    elif kind == "empty-segment":
        tree["categories_sizes"][0] = 0
    elif kind == "node-unmarked":  # listed as categorical, but split numerically
        tree["split_type"][tree["categories_nodes"][0]] = 0
    else:  # listed twice: XGBoost reads the list in node order
        for k in ("categories_nodes", "categories_segments", "categories_sizes"):
            tree[k] = tree[k] + tree[k][:1]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(UntrustedContentError, match=f"tree {i}: |out of range"):
        load_any(tmp_path / "bad.json")


def test_a_message_xgboost_cannot_decode_is_a_corrupt_artifact(tmp_path: Path) -> None:
    """XGBoost quotes the bytes it could not read; its Python side fails to decode them (UnicodeDecodeError)."""
    raw = bytearray(_ubj(tmp_path))
    raw[raw.index(b"learner") + 1] = 0xF0  # a key XGBoost cannot find, quoted in its error message
    (tmp_path / "m.ubj").write_bytes(bytes(raw))
    # before 3.1, a trusted load reads the document first (for what that XGBoost would misread): ours refuses it
    older = xgb_version() < (3, 1)
    with pytest.raises(CorruptArtifactError, match="not valid UBJSON" if older else "XGBoost could not read"):
        load_any(tmp_path / "m.ubj", trusted=True)


def _ubj(tmp_path: Path) -> bytes:
    x, y = data()
    require("xgboost").XGBClassifier(n_estimators=3).fit(x, y).save_model(str(tmp_path / "m.ubj"))
    return (tmp_path / "m.ubj").read_bytes()


def test_a_crafted_ubj_child_index_is_refused(tmp_path: Path) -> None:
    raw = bytearray(_ubj(tmp_path))
    key = b"\x0dleft_children[$l#L"
    at = raw.index(key) + len(key) + 8  # past the int64 count: the first int32 child index
    raw[at:at + 4] = struct.pack(">i", 10**6)
    (tmp_path / "bad.ubj").write_bytes(bytes(raw))
    with pytest.raises(UntrustedContentError, match=r"tree 0: .*outside its arrays"):
        load_any(tmp_path / "bad.ubj")


def _out_of_range_feature(tmp_path: Path) -> Any:
    """A classifier whose first split reads feature 99 of 6: XGBoost loads it; predicting would read past a row."""
    x, y = data()
    model = require("xgboost").XGBClassifier(n_estimators=3, max_depth=2).fit(x, y)
    doc = json.loads(bytes(model.get_booster().save_raw("json")))
    doc["learner"]["gradient_booster"]["model"]["trees"][0]["split_indices"][0] = 99
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    model.load_model(str(tmp_path / "bad.json"))  # XGBoost itself accepts it
    return model


@pytest.mark.parametrize("fmt", ["ubj", "json"])
def test_a_trusted_load_skips_the_tree_check(fmt: str, tmp_path: Path) -> None:
    """trusted=True (as a configured signature does) lifts the check, as it lifts scikit-learn's tree
    validation: the caller vouches for the author. Untrusted, the same artifact is refused."""
    save_any(_out_of_range_feature(tmp_path), tmp_path / "m", format=fmt)
    with pytest.raises(UntrustedContentError, match=r"tree 0: .*outside its arrays"):
        load_any(tmp_path / "m")
    loaded = load_any(tmp_path / "m", trusted=True)  # not asked to predict: that would read out of bounds
    assert type(loaded).__name__ == "XGBClassifier"
    assert json.loads(bytes(loaded.get_booster().save_raw("json")))["learner"]["gradient_booster"]["model"][
        "trees"][0]["split_indices"][0] == 99


@pytest.mark.parametrize("op", ["REDUCE", "OBJ", "INST"])
def test_a_pickle_cannot_call_a_booster_to_read_a_model_file(op: str, tmp_path: Path) -> None:
    """Booster(params, cache, model_file) reads and parses any file it is given: the classes of a framework
    with native state are rebuilt from their state only, never called by a pickle."""
    _ubj(tmp_path)  # m.ubj, a model the pickle points at
    path = str(tmp_path / "m.ubj").encode("raw_unicode_escape")
    raw = {"REDUCE": b"\x80\x02cxgboost.core\nBooster\nNNV" + path + b"\n\x87R.",
           "OBJ": b"(cxgboost.core\nBooster\nNNV" + path + b"\no.",
           "INST": b"(NNV" + path + b"\nixgboost.core\nBooster\n."}[op]
    (tmp_path / "evil.pkl").write_bytes(raw)
    with pytest.raises(UntrustedContentError, match=f"{op}.* would call xgboost.core.Booster.*state only"):
        load_any(tmp_path / "evil.pkl")


def test_a_crafted_step_inside_a_pipeline_is_refused(tmp_path: Path) -> None:
    from sklearn.pipeline import make_pipeline

    save_any(make_pipeline(_out_of_range_feature(tmp_path)), tmp_path / "p")
    with pytest.raises(UntrustedContentError, match="outside its arrays"):
        load_any(tmp_path / "p")


def test_an_older_xgboost_is_warned_that_it_does_not_recode_a_frames_categories(tmp_path: Path) -> None:
    """XGBoost 3.1+ keeps the training frame's categories and recodes a frame's to them when it predicts;
    2.x and 3.0 use each frame's own codes (a frame with the categories reordered was 0.78 off). That depends
    on the caller's frames: a VersionMismatchWarning says what to pass. Where XGBoost recodes, no warning."""
    xgb, pd, np = require("xgboost"), require("pandas"), require("numpy")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"plan": pd.Categorical(rng.choice(list("abcd"), 300), categories=list("abcd")),
                       "x": rng.normal(size=300)})
    y = df["plan"].isin(["b", "d"]).astype(int) ^ (df["x"] > 1).astype(int)
    model = xgb.XGBClassifier(n_estimators=5, max_depth=3, enable_categorical=True, tree_method="hist").fit(df, y)
    doc = json.loads(bytes(model.get_booster().save_raw("json")))
    trees = doc["learner"]["gradient_booster"]["model"]
    if "cats" not in trees:  # written before 3.1: the training frame's categories, as 3.1 and later keep them
        trees["cats"] = {"enc": [{"offsets": [0, 1, 2, 3, 4], "values": list(b"abcd")}, {"offsets": [], "values": []}],
                         "feature_segments": [0, 4, 4], "sorted_idx": [0, 1, 2, 3]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    older = xgb_version() < (3, 1)
    with (pytest.warns(VersionMismatchWarning, match=r"recodes .*training order, or install xgboost>=3\.1")
          if older else contextlib.nullcontext()):  # elsewhere, a warning fails the test
        loaded = load_any(tmp_path / "m.json")
    matrix = xgb.DMatrix(df, enable_categorical=True)
    np.testing.assert_array_equal(loaded.predict(matrix), model.get_booster().predict(matrix))


PICKLED_STEP = """
import pickle, struct, sys, numpy as np, xgboost as xgb, mlpersist
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
kind, out = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).normal(size=(200, 4))
if kind == "parent":
    step, y = xgb.XGBClassifier(n_estimators=3, max_depth=3), (x[:, 0] > 0).astype(int)
else:
    step = xgb.XGBRegressor(n_estimators=3, max_depth=3, tree_method="hist", multi_strategy="multi_output_tree")
    y = x[:, :3]
pipe = make_pipeline(StandardScaler(), step).fit(x, y)
handle = bytes(pipe[-1].get_booster().__getstate__()["handle"])  # XGBoost's serialisation, parsed by __setstate__
if kind == "parent":  # node 1 of the model's last tree names a parent far past its tree
    at = handle.rindex(b"\\x07parents[$l#L") + 13 + 8 + 4
    crafted = handle[:at] + struct.pack(">i", 2**24) + handle[at + 4:]
else:  # a key XGBoost 3.2 looks up unchecked: without it, setting the state segfaulted
    crafted = handle.replace(b"leaf_weights", b"leaf_weightz")
data = pickle.dumps(pipe, protocol=4)
assert data.count(handle) == 1 and crafted != handle
open(out, "wb").write(data.replace(handle, crafted))
try:
    mlpersist.load_any(out)
    print("LOADED")
except mlpersist.PersistError as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


@pytest.mark.parametrize("kind", ["parent", "leaf-weights"])
def test_a_pickled_xgboost_step_is_checked_before_xgboost_reads_it(kind: str, tmp_path: Path) -> None:
    """A Booster's pickled state is XGBoost's serialisation, which its __setstate__ parses: the adapter's
    check_state checks the model in it first, as a saved model is checked (in a fresh process: a crash ends it)."""
    if kind == "leaf-weights" and xgb_version() < (3, 2):
        pytest.skip("XGBoost writes leaf_weights from 3.2")
    (tmp_path / "craft.py").write_text(PICKLED_STEP)
    proc = run_python(f"import runpy, sys; sys.argv = ['x', {kind!r}, {str(tmp_path / 'p.pkl')!r}]; "
                      f"runpy.run_path({str(tmp_path / 'craft.py')!r})", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = {"parent": "REFUSED UntrustedContentError .*: tree 2: child, feature or category indices",
                "leaf-weights": "REFUSED VersionMismatchError .*: tree 0 is a vector-leaf tree"}[kind]
    assert re.match(expected, proc.stdout), proc.stdout


def test_a_pickled_step_whose_base_score_an_older_xgboost_would_misread_is_refused(tmp_path: Path) -> None:
    """XGBoost 3.1+ pickles a list base score; 2.x and 3.0 would set it as 0.5. A Booster's state cannot be
    given its score after it is set, so there the step is refused; where lists are read, it loads as it is."""
    xgb, np = require("xgboost"), require("numpy")
    from sklearn.pipeline import make_pipeline

    x = np.random.default_rng(0).normal(size=(200, 4))
    pipe = make_pipeline(xgb.XGBRegressor(n_estimators=3, max_depth=2)).fit(x, x[:, 0] * 3 + 5)
    handle = bytes(pipe[-1].get_booster().__getstate__()["handle"])
    crafted = handle
    for m in reversed(list(re.finditer(rb"base_scoreSL(.{8})", handle, re.S))):  # as 3.1+ writes it: a list
        n = struct.unpack(">q", m.group(1))[0]
        value = handle[m.end():m.end() + n]
        if not value.startswith(b"["):
            value = b"[" + value + b"]"
        crafted = crafted[:m.start(1)] + struct.pack(">q", len(value)) + value + crafted[m.end() + n:]
    data = pickle.dumps(pipe, protocol=4)
    head = b"B" + struct.pack("<I", len(handle))  # BINBYTES: the bytes a bytearray is rebuilt from
    assert data.count(head + handle) == 1
    (tmp_path / "p.pkl").write_bytes(data.replace(head + handle, b"B" + struct.pack("<I", len(crafted)) + crafted))
    if xgb_version() < (3, 1):
        with pytest.raises(VersionMismatchError, match=r"pickled by XGBoost 3\.1 or later.*install xgboost>=3\.1"):
            load_any(tmp_path / "p.pkl")
    else:
        np.testing.assert_array_equal(load_any(tmp_path / "p.pkl").predict(x), pipe.predict(x))


@pytest.mark.parametrize("mutate", [
    lambda raw: raw[: len(raw) // 2],                                       # truncated
    lambda raw: raw.replace(b"#L", b"#L\x00\x00\x01\x00", 1),               # a count of 2**40 and shifted bytes
    lambda raw: b"{" * 100_000,                                             # nested 100 000 deep
    lambda raw: raw + b"trailing",
], ids=["truncated", "huge-count", "deep", "trailing"])
def test_hostile_ubj_encodings_are_corrupt_artifacts_with_bounded_memory(mutate: Any, tmp_path: Path) -> None:
    raw = _ubj(tmp_path)
    (tmp_path / "bad.ubj").write_bytes(mutate(raw))
    with pytest.raises((CorruptArtifactError, UntrustedContentError)):
        load_any(tmp_path / "bad.ubj")


@pytest.mark.parametrize("text", ['{"learner": ' * 50_000 + "1" + "}" * 50_000,
                                  '{"learner": ' + "9" * 5000 + "}", '{"learner": {}}', '{"learner": NaN}'],
                         ids=["deep", "huge-int", "empty", "nan"])
def test_hostile_json_models_are_typed_errors(text: str, tmp_path: Path) -> None:
    require("xgboost")
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises((CorruptArtifactError, UntrustedContentError)):
        load_any(tmp_path / "bad.json")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300))
def test_fuzzed_ubj_files_raise_only_persist_errors(body: bytes, tmp_path: Path) -> None:
    require("xgboost")
    (tmp_path / "f.ubj").write_bytes(b"{L" + bytes(7) + b"\x07learner" + body)
    with contextlib.suppress(PersistError):
        load_any(tmp_path / "f.ubj")


# --- the UBJSON reader against an independent encoder ---------------------------------------------

def _arrays() -> Any:
    np = require("numpy")
    return st.sampled_from(list(ARRAY_MARKERS)).flatmap(lambda d: st.lists(
        st.integers(0, 255) if d == "uint8" else st.integers(-100, 100) if "int" in d else st.floats(width=32),
        max_size=8).map(lambda xs: np.asarray(xs, dtype=d)))


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=300) | _arrays(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=300), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=20), _VALUES, max_size=5), wide=st.sampled_from("UIL"),
       counted=st.booleans(), noop=st.booleans())
def test_the_ubjson_reader_reads_what_an_independent_encoder_wrote(doc: dict[str, Any], wide: str, counted: bool,
                                                                   noop: bool) -> None:
    from mlpersist._ubjson import loads

    raw = encode(doc, wide, counted, noop)
    assert same(loads(raw, "doc"), doc)
    assert same(read_arrays(loads(raw, "doc", lazy=True)), doc)  # the arrays the XGBoost check reads


@pytest.mark.parametrize("raw", [
    b"{U\x01a[$l#U\x05" + bytes(4),              # a typed array declaring more than the file holds
    b"{U\x01a[$l#L" + struct.pack(">q", -1),       # a negative count
    b"{U\x01a[$l#X\x01",                          # a count without a length marker
    b"{U\x01a[$lUU\x01" + bytes(4) + b"}",        # a typed array without its count marker
    b"{U\x02\xff\xfeZ}",                          # a key that is not UTF-8
    b"{U\x01aZU\x01aZ}",                          # a duplicate key
    b"{U\x09ab}",                                 # a key longer than the file
    b"{L" + struct.pack(">q", -3) + b"Z}",         # a negative key length
    b"{#U\x02U\x01aZ}",                           # a counted object one entry short
    b"{U\x01aZ",                                  # no end marker
    b"{xab}",                                     # a key without a length marker
    b"{U",                                        # cut inside a key's length
    b"{U\x01aNNN",                                # only no-ops where the value should be
], ids=["count-past-end", "negative-count", "count-marker", "no-count", "key-utf8", "duplicate-key", "key-past-end",
        "negative-key", "counted-short", "unterminated", "key-marker", "cut-key", "noops"])
def test_malformed_ubjson_objects_are_corrupt_artifacts(raw: bytes) -> None:
    """Every way an object's key or inline typed array can be malformed is a typed error, not an IndexError."""
    from mlpersist._ubjson import loads

    with pytest.raises(CorruptArtifactError, match="not valid UBJSON"):
        loads(raw, "doc")


def test_counted_typed_and_noop_objects_read_as_written() -> None:
    from mlpersist._ubjson import loads

    assert loads(b"{$Z#U\x02U\x01aU\x01b", "doc") == {"a": None, "b": None}  # one value type: no values
    assert loads(b"{#U\x01NU\x01aNT", "doc") == {"a": True}
    assert loads(b"{N}", "doc") == {}
    raw = b"{U\x01a[$I#U\x02\x01\x02\xff\xffU\x01bN[$U#U\x01\x07U\x01c[[$D#U\x01" + struct.pack(">d", 0.5) + b"]}"
    for lazy in (False, True):  # the inline path (after a key), the general one (inside a list)
        got = read_arrays(loads(raw, "doc", lazy=lazy))
        assert got["a"].tolist() == [258, -1] and got["b"].tolist() == [7] and got["c"][0].tolist() == [0.5]


def test_the_check_drops_the_parsed_document_before_the_collector_resumes(tmp_path: Path) -> None:
    """Parsed and checked with the collector paused, and freed before it resumes: with a collection due
    at every new container, a few start (the check's own first allocations), where parsing under its own
    pause and checking after it starts one per container the check makes."""
    x, y = data()
    require("xgboost").XGBClassifier(n_estimators=40, max_depth=4).fit(x, y).save_model(str(tmp_path / "m.ubj"))
    raw = (tmp_path / "m.ubj").read_bytes()
    from mlpersist.adapters.xgboost import parse, validate, vet

    vet(raw, "ubj", "m")  # imports done
    unpaused = collections_started(lambda: validate(parse(raw, "ubj", "m"), "m"))
    paused = collections_started(lambda: vet(raw, "ubj", "m"))
    assert unpaused >= 40  # about one per tree (40 here)
    assert paused < 10


# --- sibling objects: the entries the reader recognises from the last object read at their depth ---

_KINDS = ["uint8", "int32", "float32", "int64", "int", "float", "str", "object", "none"]


@st.composite
def _siblings(draw: Any) -> list[dict[str, Any]]:
    """A list of objects with the same keys, mostly of the same kinds (as XGBoost's trees): now and then
    a value of another kind, width or length, so that the reader's guess from the last sibling fails."""
    np = require("numpy")
    keys = draw(st.lists(st.text(max_size=6), unique=True, max_size=5))
    kinds = {k: draw(st.sampled_from(_KINDS)) for k in keys}

    def value(kind: str) -> Any:
        if kind in ARRAY_MARKERS:
            ints = st.integers(0, 255) if kind == "uint8" else st.integers(-(2**31), 2**31 - 1)
            return np.asarray(draw(st.lists(st.floats(width=32) if kind == "float32" else ints, max_size=6)),
                              dtype=kind)
        return {"int": lambda: draw(st.integers(-(2**40), 2**40)), "float": lambda: draw(st.floats()),
                "str": lambda: draw(st.text(max_size=5)), "none": lambda: None,
                "object": lambda: {"a": draw(st.integers(0, 300)), "b": draw(st.text(max_size=3))}}[kind]()

    return [{k: value(kinds[k] if draw(st.integers(0, 7)) else draw(st.sampled_from(_KINDS))) for k in keys}
            for _ in range(draw(st.integers(1, 4)))]


def _long_way(raw: bytes, lazy: bool) -> Any:
    """The reader with nothing learnt from siblings: every entry read the long way."""
    from mlpersist import _ubjson

    class LongWay(_ubjson._Reader):
        def object(self, n: int | None, pending: int | None, depth: int) -> dict[str, Any]:
            self.shapes.clear()
            return super().object(n, pending, depth)

    reader = LongWay(raw, "doc", lazy)
    value = reader.value(reader.marker(), 0)
    if reader.pos != len(raw):
        raise reader.bad("trailing bytes")
    return value


def _outcome(read: Any, raw: bytes, lazy: bool) -> Any:
    try:
        return ("read", read_arrays(read(raw, lazy)))
    except CorruptArtifactError:
        return ("corrupt",)


def _identical(a: Any, b: Any) -> bool:
    np = require("numpy")
    if isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=b.dtype.kind == "f"))
    if isinstance(b, (dict, list, tuple)):
        return (type(a) is type(b) and len(a) == len(b) and (not isinstance(b, dict) or list(a) == list(b))
                and all(_identical(a[k], b[k]) for k in (b if isinstance(b, dict) else range(len(b)))))
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


@settings(max_examples=400, deadline=None)
@given(doc=_siblings(), form=st.tuples(st.sampled_from("UIL"), st.booleans(), st.booleans()),
       damage=st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "drop", "insert", "cut"])))
def test_sibling_objects_read_as_the_long_way_reads_them_even_when_damaged(
        doc: list[dict[str, Any]], form: tuple[str, bool, bool], damage: tuple[int, int, str]) -> None:
    """What the reader recognises from a sibling, it reads exactly as the long way would: the same value,
    or, for any one byte set, dropped or inserted, or the file cut there, the same refusal."""
    from mlpersist._ubjson import loads

    raw = encode({"trees": doc}, *form)  # lengths' width, counted containers, no-ops
    assert same(loads(raw, "doc"), {"trees": doc})
    at, byte, edit = damage
    at %= len(raw)
    damaged = {"set": raw[:at] + bytes([byte]) + raw[at + 1:], "drop": raw[:at] + raw[at + 1:],
               "insert": raw[:at] + bytes([byte]) + raw[at:], "cut": raw[:at]}[edit]
    for lazy in (False, True):
        fast = _outcome(lambda raw, lazy: loads(raw, "doc", lazy=lazy), damaged, lazy)
        slow = _outcome(_long_way, damaged, lazy)
        assert fast[0] == slow[0] and (fast[0] == "corrupt" or _identical(fast[1], slow[1])), (fast, slow)


_TREE = b"{U\x01a[$l#U\x01" + struct.pack(">i", 7) + b"U\x01bSU\x02hiU\x01cU\x05U\x01d{U\x01xZ}}"


@pytest.mark.parametrize(("second", "expected"), [
    (b"{U\x01a[$l#U\x02" + bytes(4), None),                          # a count past the end
    (b"{U\x01bSU\x02hiU\x01bSU\x02hi}", None),                       # a key again, where its sibling had it
    (b"{U\x01a[$l#U\x01" + bytes(4) + b"U\x01bSU\x09hi}", None),      # a string longer than the file
    (b"{U\x01a[$l#U\x01" + bytes(4) + b"U\x01bSU\x02hiU\x01cU", None),  # cut inside a number
    (b"{U\x01a[$l#U\x01" + bytes(4) + b"U\x01bSU\x02\xff\xfe}", None),  # a string that is not UTF-8
    (b"{U\x01a[$l#U\x00U\x01bSU\x00U\x01cU\x01U\x01d{#U\x01U\x01xT}", {"a": [], "b": "", "c": 1, "d": {"x": True}}),
    (b"{U\x01a[$l#U\x00U\x01bSU\x00U\x01cU\x01U\x01d{N}}", {"a": [], "b": "", "c": 1, "d": {}}),
    (b"{U\x01a[$l#U\x00U\x01bSU\x00U\x01cU\x01U\x01d{$Z#U\x01U\x01y}", {"a": [], "b": "", "c": 1, "d": {"y": None}}),
], ids=["count-past-end", "duplicate", "string-past-end", "cut-number", "string-utf8", "counted-object",
        "noop-object", "typed-object"])
def test_an_object_that_starts_like_its_sibling_is_read_as_it_is(second: bytes, expected: Any) -> None:
    """After a sibling taught the reader its entries: a malformed entry is refused as the long way refuses
    it, and a nested object that begins otherwise (counted, typed, a no-op) is read as what it is."""
    from mlpersist._ubjson import loads

    raw = b"[" + _TREE + second + b"]"
    if expected is None:
        with pytest.raises(CorruptArtifactError, match="not valid UBJSON"):
            loads(raw, "doc")
        return
    first, got = read_arrays(loads(raw, "doc"))
    assert first["a"].tolist() == [7] and first["b"] == "hi" and first["d"] == {"x": None}
    assert {k: v.tolist() if k == "a" else v for k, v in got.items()} == expected


def test_a_crafted_child_index_in_the_last_tree_is_refused(tmp_path: Path) -> None:
    """The last tree is read as its siblings taught the reader: its indices are checked all the same."""
    x, y = data()
    require("xgboost").XGBClassifier(n_estimators=5).fit(x, y).save_model(str(tmp_path / "m.ubj"))
    raw = bytearray((tmp_path / "m.ubj").read_bytes())
    key = b"\x0dleft_children[$l#L"
    at = raw.rindex(key) + len(key) + 8
    raw[at:at + 4] = struct.pack(">i", 10**6)
    (tmp_path / "bad.ubj").write_bytes(bytes(raw))
    with pytest.raises(UntrustedContentError, match=r"tree 4: .*outside its arrays"):
        load_any(tmp_path / "bad.ubj")


@pytest.mark.parametrize("siblings", [1, 2])
def test_objects_nested_past_the_depth_limit_are_refused(siblings: int) -> None:
    """Objects in objects, or in lists: 64 levels are read, 65 refused, whether or not a sibling taught
    the reader that the entry holds an object."""
    from mlpersist._ubjson import MAX_DEPTH, loads

    def nested(levels: int) -> bytes:
        return b"{U\x01k" * (levels - 1) + b"{}" + b"}" * (levels - 1)

    ok, deep = (b"[" + nested(levels) * siblings + b"]" for levels in (MAX_DEPTH - 1, MAX_DEPTH))
    assert len(loads(ok, "doc")) == siblings
    with pytest.raises(CorruptArtifactError, match=f"nested deeper than {MAX_DEPTH}"):
        loads(deep, "doc")
    with pytest.raises(CorruptArtifactError, match=f"nested deeper than {MAX_DEPTH}"):
        loads(b"{U\x01k" * 100_000 + b"Z", "doc")
    in_lists = b"[" * (MAX_DEPTH - 1) + b"{}" * siblings + b"]" * (MAX_DEPTH - 1)  # objects in lists
    got = loads(in_lists, "doc")
    for _ in range(MAX_DEPTH - 2):
        got = got[0]
    assert got == [{}] * siblings
    with pytest.raises(CorruptArtifactError, match=f"nested deeper than {MAX_DEPTH}"):
        loads(b"[" + in_lists + b"]", "doc")


@settings(max_examples=200, deadline=None)
@given(values=st.lists(_arrays(), min_size=1, max_size=6), pad=st.text(max_size=3))
def test_joined_lazy_arrays_equal_their_concatenation(values: list[Any], pad: str) -> None:
    """Lazy arrays at any offsets (the key before each shifts them), of one dtype or several, join as numpy
    joins the arrays they stand for."""
    np = require("numpy")
    from mlpersist._ubjson import joined, loads

    doc = {f"{pad}{i}": v for i, v in enumerate(values)}
    got, want = joined(list(loads(encode(doc, "U"), "doc", lazy=True).values())), np.concatenate(values)
    assert got.dtype.newbyteorder("=") == want.dtype and np.array_equal(got, want, equal_nan=want.dtype.kind == "f")


# --- the parents check against its plain statement ------------------------------------------------------------

def _expected_parents_bad(sizes: list[int], left: Any, right: Any, parents: Any, vector: list[int]) -> int | None:
    """The rule `_first_bad_parents` checks, stated plainly: an array of each node's expected parent."""
    np = require("numpy")
    starts = np.cumsum(sizes) - np.asarray(sizes)
    for t, (start, n) in enumerate(zip(starts.tolist(), sizes, strict=True)):
        expected = [2**31 - 1 if t not in vector else -1] + [None] * (n - 1)
        times = [0] * n
        for i in range(n):
            if left[start + i] != -1:
                for child in (int(left[start + i]), int(right[start + i])):
                    expected[child], times[child] = i, times[child] + 1
        if any(times[i] != (i != 0) for i in range(n)) or any(
                int(parents[start + i]) != expected[i] for i in range(n)):
            return t
    return None


@st.composite
def _trees_with_parents(draw: Any) -> tuple[list[int], Any, Any, Any, list[int]]:
    """Random XGBoost-shaped trees (children after their node, right = left + 1), parents then damaged."""
    np = require("numpy")
    sizes, left, right, parents = [], [], [], []
    for _ in range(draw(st.integers(1, 4))):
        lt, rt, pt = grown_tree(draw, draw(st.integers(0, 6)))
        pt[0] = 2**31 - 1  # XGBoost's parent of a root
        sizes.append(len(lt))
        left += lt
        right += rt
        parents += pt
    vector = sorted(draw(st.sets(st.integers(0, len(sizes) - 1), max_size=2)))
    starts = np.cumsum(sizes) - np.asarray(sizes)
    for t in vector:
        parents[int(starts[t])] = -1
    total = len(left)
    for _ in range(draw(st.integers(0, 3))):  # damage: a parent anywhere, or a node taking another's children
        at = draw(st.integers(0, total - 1))
        if draw(st.booleans()):
            another = parents[draw(st.integers(0, total - 1))]
            parents[at] = draw(st.sampled_from([-1, 0, 1, 2, 3, 2**31 - 1, 2**24, another]))
        else:
            other = draw(st.integers(0, total - 1))
            left[at], right[at] = left[other], right[other]
    arrays = (np.asarray(a, dtype=">i4") for a in (left, right, parents))  # as the file holds them
    return (sizes, *arrays, vector)


@settings(max_examples=500, deadline=None)
@given(drawn=_trees_with_parents())
def test_the_parents_check_refuses_exactly_the_trees_its_plain_statement_does(drawn: Any) -> None:
    """Checked on trees whose children `first_bad_tree` takes (in their tree, after their node), as XGBoost's are."""
    xgb_adapter = require("mlpersist.adapters.xgboost")
    sizes, left, right, parents, vector = drawn
    np, trees = require("numpy"), require("mlpersist._trees")
    index = trees.local_index(np.asarray(sizes, dtype=np.int64))
    if trees.first_bad_tree(sizes, left, right, np.zeros(len(left), dtype=">i4"), 1, adjacent=True) is None:
        found = xgb_adapter._first_bad_parents(sizes, left, right, parents, vector, index=index)
        assert found == _expected_parents_bad(sizes, left, right, parents, vector)
