"""XGBoost adapter: Booster and sklearn wrappers through UBJSON/JSON, vetted before XGBoost parses them."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from contract import AdapterContract
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlp_testkit import require, run_python

from mlpersist import CorruptArtifactError, PersistError, UntrustedContentError, load_any, save_any


def data(n: int = 300, features: int = 6, seed: int = 0) -> tuple[Any, Any]:
    return require("sklearn.datasets").make_classification(n, features, n_informative=4, random_state=seed)


class TestXGBoost(AdapterContract):
    adapter = "xgboost"
    framework_module = "xgboost"

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


@pytest.mark.parametrize("suffix", ["json", "ubj"])
def test_a_bare_model_file_loads_as_a_booster(suffix: str, tmp_path: Path) -> None:
    xgb, np = require("xgboost"), require("numpy")
    x, y = data()
    model = xgb.XGBClassifier(n_estimators=5).fit(x, y)
    model.save_model(str(tmp_path / f"model.{suffix}"))
    loaded = load_any(tmp_path / f"model.{suffix}")
    assert isinstance(loaded, xgb.Booster)
    np.testing.assert_array_equal(loaded.predict(xgb.DMatrix(x)), model.get_booster().predict(xgb.DMatrix(x)))


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
elif kind == "loop":
    tree["left_children"][0], tree["right_children"][0] = 0, 1
elif kind == "feature":
    tree["split_indices"][0] = 99
elif kind == "tree-info":
    doc["learner"]["gradient_booster"]["model"]["tree_info"].append(0)
json.dump(doc, open(out + "/model.json", "w"))
try:
    mlpersist.load_any(out + "/model.json")
    print("LOADED")
except mlpersist.UntrustedContentError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("kind", ["child", "adjacency", "loop", "feature", "tree-info"])
def test_crafted_tree_indices_are_refused_before_xgboost_parses_them(kind: str, tmp_path: Path) -> None:
    require("xgboost")
    (tmp_path / "craft.py").write_text(CRAFT)
    proc = run_python(f"import runpy, sys; sys.argv = ['x', {kind!r}, {str(tmp_path)!r}]; "
                      f"runpy.run_path({str(tmp_path / 'craft.py')!r})")
    assert proc.stdout.startswith("REFUSED"), proc.stdout + proc.stderr


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
    with pytest.raises(UntrustedContentError, match="outside its arrays"):
        load_any(tmp_path / "bad.ubj")


def test_a_crafted_step_inside_a_pipeline_is_refused(tmp_path: Path) -> None:
    from sklearn.pipeline import make_pipeline

    x, y = data()
    step = require("xgboost").XGBClassifier(n_estimators=3, max_depth=2).fit(x, y)
    doc = json.loads(bytes(step.get_booster().save_raw("json")))
    doc["learner"]["gradient_booster"]["model"]["trees"][0]["split_indices"][0] = 99
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    step.load_model(str(tmp_path / "bad.json"))  # XGBoost itself accepts it
    save_any(make_pipeline(step), tmp_path / "p")
    with pytest.raises(UntrustedContentError, match="outside its arrays"):
        load_any(tmp_path / "p")


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
