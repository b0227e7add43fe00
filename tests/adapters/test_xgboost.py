"""XGBoost adapter: Booster and sklearn wrappers through UBJSON/JSON, vetted before XGBoost parses them."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from contract import AdapterContract
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlp_testkit import collections_started, require, run_python

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
elif kind == "right-past-end":  # adjacent children, the right one just past the tree's last node
    n = len(tree["left_children"])
    tree["left_children"][0], tree["right_children"][0] = n - 1, n
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


@pytest.mark.parametrize("kind", ["child", "adjacency", "right-past-end", "loop", "feature", "tree-info"])
def test_crafted_tree_indices_are_refused_before_xgboost_parses_them(kind: str, tmp_path: Path) -> None:
    require("xgboost")
    (tmp_path / "craft.py").write_text(CRAFT)
    proc = run_python(f"import runpy, sys; sys.argv = ['x', {kind!r}, {str(tmp_path)!r}]; "
                      f"runpy.run_path({str(tmp_path / 'craft.py')!r})")
    assert proc.stdout.startswith("REFUSED"), proc.stdout + proc.stderr
    if kind != "tree-info":
        assert "tree 1:" in proc.stdout  # the crafted tree is named, though all trees are checked at once


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


# --- the UBJSON reader against an independent encoder ---------------------------------------------

_INT_MARKERS = [(b"U", ">B", 0, 255), (b"i", ">b", -128, 127), (b"I", ">h", -(2**15), 2**15 - 1),
                (b"l", ">i", -(2**31), 2**31 - 1), (b"L", ">q", -(2**63), 2**63 - 1)]
_ARRAY_MARKERS = {"uint8": b"U", "int8": b"i", "int16": b"I", "int32": b"l", "int64": b"L", "float32": b"d",
                  "float64": b"D"}


def _length(n: int, wide: str) -> bytes:
    """A length as XGBoost writes it ('L': int64), or in one ('U') or two ('I') bytes."""
    if wide == "L":
        return b"L" + struct.pack(">q", n)
    return b"I" + struct.pack(">h", n) if wide == "I" or n > 255 else b"U" + bytes([n])


def _encode(v: Any, wide: str, counted: bool = False, noop: bool = False) -> bytes:
    """UBJSON draft 12 as XGBoost writes it, with lengths written as `wide` says; `counted` writes containers
    with a count (`#`) instead of an end marker, `noop` puts a no-op (`N`) before every key and value."""
    np = require("numpy")
    n = b"N" if noop else b""
    if v is None or isinstance(v, bool):
        return n + {None: b"Z", True: b"T", False: b"F"}[v]
    if isinstance(v, int):
        marker, fmt = next((m, f) for m, f, lo, hi in _INT_MARKERS if lo <= v <= hi)
        return n + marker + struct.pack(fmt, v)
    if isinstance(v, float):
        return n + b"D" + struct.pack(">d", v)
    if isinstance(v, str):
        data = v.encode()
        return n + b"S" + _length(len(data), wide) + data
    if isinstance(v, np.ndarray):
        big_endian = v.astype(v.dtype.newbyteorder(">")).tobytes()
        return n + b"[$" + _ARRAY_MARKERS[v.dtype.name] + b"#" + _length(len(v), wide) + big_endian
    head, tail = (b"#" + _length(len(v), wide), b"") if counted else (b"", None)
    if isinstance(v, list):
        return n + b"[" + head + b"".join(_encode(x, wide, counted, noop) for x in v) + (b"]" if tail is None else tail)
    return n + b"{" + head + b"".join(n + _length(len(k.encode()), wide) + k.encode() + _encode(x, wide, counted, noop)
                                      for k, x in v.items()) + (b"}" if tail is None else tail)


def _same(a: Any, b: Any) -> bool:
    np = require("numpy")
    if isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and a.dtype.newbyteorder("=") == b.dtype
                and np.array_equal(a, b, equal_nan=b.dtype.kind == "f"))
    if isinstance(b, dict):
        return isinstance(a, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, list):
        return isinstance(a, list) and len(a) == len(b) and all(map(_same, a, b))
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return bool(a == b) or both_nan


def _arrays() -> Any:
    np = require("numpy")
    return st.sampled_from(list(_ARRAY_MARKERS)).flatmap(lambda d: st.lists(
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

    raw = _encode(doc, wide, counted, noop)
    assert _same(loads(raw, "doc"), doc)
    assert _same(_read_arrays(loads(raw, "doc", lazy=True)), doc)  # the arrays the XGBoost check reads


def _read_arrays(value: Any) -> Any:
    """A lazily parsed document with every typed array read (numpy.asarray), as the XGBoost check does."""
    np = require("numpy")
    from mlpersist._ubjson import TypedArray

    if isinstance(value, TypedArray):
        array = np.asarray(value)
        assert len(value) == len(array)
        return array
    if isinstance(value, dict):
        return {k: _read_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_read_arrays(v) for v in value]
    return value


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
        got = _read_arrays(loads(raw, "doc", lazy=lazy))
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
