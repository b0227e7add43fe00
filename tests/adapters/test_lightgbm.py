"""LightGBM through a third-party adapter (examples/adapters/lightgbm) registered by entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from contract import AdapterContract
from mlp_testkit import require, run_python

from mlpersist import UntrustedContentError, load_any, save_any


def data(n: int = 300, seed: int = 0) -> tuple[Any, Any]:
    return require("sklearn.datasets").make_classification(n, 6, n_informative=4, random_state=seed)


class TestLightGBM(AdapterContract):
    adapter = "lightgbm"
    framework_module = "lightgbm"
    mutants: ClassVar[tuple[tuple[str, int], ...]] = (("lightgbm", 400), ("lightgbm-linear", 200))

    def make_model(self) -> Any:
        require("mlpersist_lightgbm")
        x, y = data()
        return require("lightgbm").LGBMClassifier(n_estimators=20, verbose=-1).fit(x, y)

    def make_input(self) -> Any:
        return data(40, seed=1)[0]

    def outputs(self, model: Any, x: Any) -> Any:
        return model.predict_proba(x)


def test_the_adapter_comes_from_an_entry_point_and_is_imported_only_when_used() -> None:
    require("mlpersist_lightgbm")
    out = run_python("""
        import sys, mlpersist
        from mlpersist import _registry
        spec = _registry.get_spec("lightgbm")
        print(spec.target, "mlpersist_lightgbm" in sys.modules)
    """)
    assert out.stdout.split() == ["mlpersist_lightgbm:LightGBMAdapter", "False"]


@pytest.mark.parametrize("kind", ["LGBMRegressor", "Booster"])
def test_regressors_and_boosters_round_trip(kind: str, tmp_path: Path) -> None:
    lgb, np = require("lightgbm"), require("numpy")
    require("mlpersist_lightgbm")
    x, y = data()
    if kind == "Booster":
        model = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(x, y), num_boost_round=10)
    else:
        model = lgb.LGBMRegressor(n_estimators=10, verbose=-1).fit(x, y)
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_a_ranker_round_trips(tmp_path: Path) -> None:
    lgb, np = require("lightgbm"), require("numpy")
    require("mlpersist_lightgbm")
    x, y = data()
    model = lgb.LGBMRanker(n_estimators=10, verbose=-1).fit(x, y, group=[10] * 30)
    save_any(model, tmp_path / "m")
    np.testing.assert_array_equal(load_any(tmp_path / "m").predict(x), model.predict(x))


def test_linear_trees_round_trip(tmp_path: Path) -> None:
    """`linear_tree=True`: a linear model in each leaf, its features checked with the tree."""
    lgb, np = require("lightgbm"), require("numpy")
    require("mlpersist_lightgbm")
    x, _ = data()
    model = lgb.LGBMRegressor(n_estimators=5, verbose=-1, linear_tree=True).fit(x, x[:, 0] * 2 + x[:, 1])
    lines = model.booster_.model_to_string().splitlines()
    assert any(line.startswith("leaf_features=") and line.partition("=")[2].strip() for line in lines)
    save_any(model, tmp_path / "m")
    np.testing.assert_array_equal(load_any(tmp_path / "m").predict(x), model.predict(x))


CRAFT = """
import sys, lightgbm as lgb, numpy as np, re
from sklearn.datasets import make_classification
kind, out = sys.argv[1], sys.argv[2]
x, y = make_classification(200, 5, random_state=0)
if kind.startswith("cat-"):  # tree 1 splits first on a category (num_cat=1, cat_boundaries=0 1)
    x[:, 0] = np.arange(200) % 10
    y = np.isin(x[:, 0], [1, 3, 5, 7]).astype(int) ^ (x[:, 1] > 1)
    text = lgb.LGBMClassifier(n_estimators=3, verbose=-1, min_data_per_group=5, cat_smooth=1).fit(
        x, y, categorical_feature=[0]).booster_.model_to_string()
    tree = text.partition("\\nTree=1\\n")[2].partition("\\n\\n")[0]
    assert "\\nnum_cat=1\\n" in tree and "\\ndecision_type=1 " in tree and "\\ncat_boundaries=0 1\\n" in tree, tree
elif kind.startswith("linear"):  # leaf models: `linear_tree=True`
    text = lgb.LGBMRegressor(n_estimators=3, verbose=-1, linear_tree=True).fit(x, x[:, 0] * 2 + x[:, 1]).booster_
    text = text.model_to_string()
    assert "num_features=0 0" not in text.partition("\\nTree=1\\n")[2].partition("\\nTree=2")[0]
else:
    text = lgb.LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y).booster_.model_to_string()
head, sep, rest = text.partition("\\nTree=1\\n")
lines = rest.split("\\n")
for i, line in enumerate(lines):
    key, _, values = line.partition("=")
    v = values.split()
    if kind == "leaf-int-min" and key == "left_child":
        v[0] = str(-2**31)
    elif kind == "inner-out-of-range" and key == "right_child":
        v[0] = "1000"
    elif kind == "inner-backward" and key == "left_child":  # node 1 back to node 0: a predict that never ends
        v[1] = "0"
    elif kind == "shared-child" and key == "left_child":
        root_left = v[0]
        continue
    elif kind == "shared-child" and key == "right_child":  # the root's two children one node
        v[0] = root_left
    elif kind == "cat-threshold-past" and key == "threshold":  # indexes cat_boundaries past its num_cat + 1
        v[0] = "1"
    elif kind == "cat-boundaries-past" and key == "cat_boundaries":  # a bitset read past cat_threshold's words
        v[-1] = "5"
    elif kind == "cat-boundaries-backward" and key == "cat_boundaries":  # a bitset of negative length
        v[:] = ["1", "0"]
    elif kind == "feature" and key == "split_feature":
        v[0] = "99"
    elif kind == "underscore-digits" and key == "split_feature":  # Python reads 1, LightGBM 0
        v[0] = "0_1"
    elif kind == "categorical-without-categories" and key == "decision_type":  # tree 1 has num_cat=0
        v[0] = str(int(v[0]) | 1)
    elif kind == "huge-index" and key == "left_child":
        v[0] = "9" * 30
    elif kind == "tree-line-inside" and key == "shrinkage":  # LightGBM: one tree, whose left_child is the last one
        lines[i] = line + "\\nTree=9\\nleft_child=1000 1000 1000 1000 1000 1000"
        break
    elif kind == "key-twice" and key == "shrinkage":
        lines[i] = line + "\\nleft_child=1000 1000 1000 1000 1000 1000"
        break
    elif kind == "no-leaf-value" and key == "leaf_value":
        lines[i] = "leaf_weight_x=1"
        break
    elif kind == "linear-feature-far" and key == "leaf_features":  # read from the row at this index (segfault)
        v[0] = str(10**9)
    elif kind == "linear-feature-negative" and key == "leaf_features":
        v[0] = "-5"
    elif kind == "linear-count-negative" and key == "num_features":  # the same total, cut at -1
        first = next(j for j, c in enumerate(v) if c != "0")
        v[first], v[-1] = "-1", str(int(v[-1]) + int(v[first]) + 1)
    else:
        continue
    lines[i] = key + "=" + " ".join(v)
text = head + sep + "\\n".join(lines)
sizes = [len(b.encode()) for b in re.split(r"(?=^Tree=)", text.partition("\\nend of trees")[0] + "\\n", flags=re.M)[1:]]
text = re.sub(r"tree_sizes=.*", "tree_sizes=" + " ".join(map(str, sizes)), text)  # as a careful forger would
if kind == "tree-sizes":  # every tree sound, the first size far past the text
    text = re.sub(r"tree_sizes=(\\d+)", lambda m: "tree_sizes=" + str(int(m.group(1)) + 10**6), text)
elif kind == "carriage-return":
    text = text.replace("\\nTree=1\\n", "\\nTree=1\\r\\n")
elif kind == "nul":
    text = text.replace("\\nend of trees", "\\x00\\nend of trees")
elif kind == "no-end":  # the text ends with tree 1's last line: no blank line, no "end of trees"
    text = text[:text.index("\\n\\n", text.index("Tree=1")) + 1]
elif kind == "wrapping-feature-count":  # 2**32 + 4: LightGBM's int32 reads 4, which its 5 feature names fit
    text = text.replace("max_feature_idx=4", "max_feature_idx=4294967300")
elif kind == "no-class":
    text = text.replace("num_tree_per_iteration=1", "num_tree_per_iteration=0")
elif kind == "trees-per-iteration-past-classes":  # each adds to its own output of a row of num_class=1 (heap)
    text = text.replace("num_tree_per_iteration=1", "num_tree_per_iteration=5")
elif kind == "end-of-parameters":  # one byte changed: a section line without ":" (it segfaulted LightGBM)
    text = text.replace("end of parameters", "efd of parameters")
elif kind == "parameter-without-colon":  # LightGBM takes the second part of each line split at ":", unchecked
    text = text.replace("[num_leaves: 31]", "[num_leaves 31]")
open(out, "wb").write(text.encode().replace(b"Tree=1", b"Tree=1\\xff") if kind == "not-utf8" else text.encode())
"""


def _load_crafted(kind: str, tmp_path: Path, trusted: bool = False) -> str:
    """Load, in a fresh process, an artifact whose model.txt was crafted as CRAFT's `kind`: what happened.

    Its own process: a LightGBM that aborts or crashes must fail the test, not end the test run.
    """
    require("mlpersist_lightgbm")
    tmp_path = tmp_path / f"{kind}-{trusted}"
    tmp_path.mkdir()
    (tmp_path / "craft.py").write_text(CRAFT)
    proc = run_python(f"""
        import runpy, sys, json, hashlib, mlpersist, lightgbm as lgb
        from sklearn.datasets import make_classification
        sys.argv = ["x", {kind!r}, {str(tmp_path / 'model.txt')!r}]
        runpy.run_path({str(tmp_path / 'craft.py')!r})
        x, y = make_classification(200, 5, random_state=0)
        mlpersist.save_any(lgb.LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y).booster_,
                           {str(tmp_path / 'art')!r})
        raw = open({str(tmp_path / 'model.txt')!r}, "rb").read()
        open({str(tmp_path / 'art' / 'model.txt')!r}, "wb").write(raw)
        doc = json.load(open({str(tmp_path / 'art' / 'manifest.json')!r}))
        doc["files"]["model.txt"] = {{"size": len(raw), "digest": "sha256:" + hashlib.sha256(raw).hexdigest()}}
        json.dump(doc, open({str(tmp_path / 'art' / 'manifest.json')!r}, "w"))
        try:
            model = mlpersist.load_any({str(tmp_path / 'art')!r}, trusted={trusted!r})
            print("LOADED", *([] if {trusted!r} else model.predict(x[:5], raw_score=True).round(6).tolist()))
        except mlpersist.PersistError as exc:
            print("REFUSED", type(exc).__name__, exc)
    """)
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else f"nothing printed; stderr: {proc.stderr[-2000:]}"


@pytest.mark.parametrize("kind", ["leaf-int-min", "inner-out-of-range", "inner-backward", "shared-child", "feature",
                                  "cat-threshold-past", "cat-boundaries-past", "cat-boundaries-backward",
                                  "underscore-digits",
                                  "tree-line-inside", "key-twice", "carriage-return", "nul", "no-class",
                                  "no-end", "categorical-without-categories", "huge-index",
                                  "wrapping-feature-count", "end-of-parameters", "parameter-without-colon",
                                  "trees-per-iteration-past-classes", "linear-feature-far", "linear-feature-negative",
                                  "linear-count-negative"])
def test_crafted_text_models_are_refused_before_lightgbm_parses_them(kind: str, tmp_path: Path) -> None:
    assert _load_crafted(kind, tmp_path).startswith("REFUSED UntrustedContentError")


def test_tree_sizes_are_not_followed(tmp_path: Path) -> None:
    """LightGBM jumps by `tree_sizes` without bounds (a size past the text read outside it, then aborted the
    process): it is handed the text without them, and reads the same trees one after another."""
    sound = _load_crafted("none", tmp_path)
    assert sound.startswith("LOADED ") and _load_crafted("tree-sizes", tmp_path) == sound


@pytest.mark.parametrize("kind", ["no-leaf-value", "not-utf8"])
def test_a_text_lightgbm_cannot_read_is_an_error_not_an_abort(kind: str, tmp_path: Path) -> None:
    """Read tree after tree, LightGBM raises on a tree without leaf values (on its parallel path it aborted
    the process); a text that is not UTF-8 is a typed error too."""
    assert _load_crafted(kind, tmp_path).startswith("REFUSED CorruptArtifactError")


def test_a_trusted_load_skips_the_tree_check(tmp_path: Path) -> None:
    """trusted=True (as a configured signature does) lifts the check, as it does in the built-in adapters:
    LightGBM reads a split on feature 99 of 5 (predicting would read past a row: nothing predicts here)."""
    assert _load_crafted("feature", tmp_path, trusted=True) == "LOADED"


def test_a_pickled_lightgbm_step_in_a_pipeline_is_allowed_and_checked(tmp_path: Path) -> None:
    np = require("numpy")
    require("mlpersist_lightgbm")
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = data()
    pipe = make_pipeline(StandardScaler(), require("lightgbm").LGBMClassifier(n_estimators=5, verbose=-1)).fit(x, y)
    m = save_any(pipe, tmp_path / "p")
    assert m.adapter == "sklearn"
    np.testing.assert_array_equal(load_any(tmp_path / "p").predict_proba(x), pipe.predict_proba(x))


def test_without_an_adapter_that_checks_it_a_pickled_lightgbm_step_is_refused(tmp_path: Path) -> None:
    from sklearn.pipeline import make_pipeline

    from mlpersist import _registry

    x, y = data()
    save_any(make_pipeline(require("lightgbm").LGBMClassifier(n_estimators=3, verbose=-1)).fit(x, y), tmp_path / "p")
    _registry.claims()
    del _registry._specs["lightgbm"]  # as if mlpersist-lightgbm were not installed (conftest restores it)
    with pytest.raises(UntrustedContentError, match="only its adapter can check"):
        load_any(tmp_path / "p")
    assert load_any(tmp_path / "p", trusted=True).predict(x) is not None


STEP = """
import re, sys, lightgbm as lgb, mlpersist
from sklearn.datasets import make_classification
from sklearn.pipeline import make_pipeline
kind, out = sys.argv[1], sys.argv[2]
x, y = make_classification(200, 5, random_state=0)
pipe = make_pipeline(lgb.LGBMClassifier(n_estimators=3, verbose=-1)).fit(x, y)
sound = lgb.Booster.__getstate__

def crafted(self):  # what a forger would pickle as the step's Booster
    state = sound(self)
    if kind == "tree-sizes":  # sound trees, the first size far past the text
        state["_handle"] = re.sub(r"tree_sizes=(\\d+)", lambda m: "tree_sizes=" + str(int(m.group(1)) + 10**6),
                                  state["_handle"])
    elif kind == "child":  # a Tree= line inside tree 1: LightGBM takes the left_child after it
        state["_handle"] = state["_handle"].replace(
            "\\n\\n\\nTree=2\\n", "\\nTree=9\\nleft_child=1000 1000 1000\\n\\n\\nTree=2\\n")
    return state

lgb.Booster.__getstate__ = crafted
mlpersist.save_any(pipe, out)
lgb.Booster.__getstate__ = sound
try:
    loaded = mlpersist.load_any(out)
    print("SAME" if (loaded.predict_proba(x) == pipe.predict_proba(x)).all() else "DIFFERENT")
except mlpersist.PersistError as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


@pytest.mark.parametrize(("kind", "expected"), [
    ("tree-sizes", "SAME"),  # LightGBM followed them out of the text, then aborted: now it reads tree after tree
    ("child", "REFUSED UntrustedContentError"),
])
def test_a_pickled_booster_is_checked_before_lightgbm_parses_it(kind: str, expected: str, tmp_path: Path) -> None:
    """A pipeline step's Booster is parsed by its __setstate__, during unpickling: its model text goes through
    the adapter's check_state first (in its own process: an abort must fail the test, not end the run)."""
    require("mlpersist_lightgbm")
    (tmp_path / "step.py").write_text(STEP)
    proc = run_python(f"import runpy, sys; sys.argv = ['x', {kind!r}, {str(tmp_path / 'p')!r}]; "
                      f"runpy.run_path({str(tmp_path / 'step.py')!r})")
    assert proc.stdout.strip().splitlines()[-1].startswith(expected), proc.stdout + proc.stderr
