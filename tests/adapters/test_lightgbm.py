"""LightGBM through a third-party adapter (examples/adapters/lightgbm) registered by entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from contract import AdapterContract
from mlp_testkit import require, run_python

from mlpersist import UntrustedContentError, load_any, save_any


def data(n: int = 300, seed: int = 0) -> tuple[Any, Any]:
    return require("sklearn.datasets").make_classification(n, 6, n_informative=4, random_state=seed)


class TestLightGBM(AdapterContract):
    adapter = "lightgbm"
    framework_module = "lightgbm"

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


CRAFT = """
import sys, lightgbm as lgb, numpy as np, mlpersist
from sklearn.datasets import make_classification
kind, out = sys.argv[1], sys.argv[2]
x, y = make_classification(200, 5, random_state=0)
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
    elif kind == "feature" and key == "split_feature":
        v[0] = "99"
    else:
        continue
    lines[i] = key + "=" + " ".join(v)
open(out, "w").write(head + sep + "\\n".join(lines))
try:
    mlpersist.load_any(out)
    print("LOADED")
except mlpersist.PersistError as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


@pytest.mark.parametrize("kind", ["leaf-int-min", "inner-out-of-range", "feature"])
def test_crafted_text_models_are_refused_before_lightgbm_parses_them(kind: str, tmp_path: Path) -> None:
    require("mlpersist_lightgbm")
    (tmp_path / "craft.py").write_text(CRAFT)
    # a bare LightGBM text file is not sniffed: wrap it as an artifact payload instead
    proc = run_python(f"""
        import runpy, sys, json, hashlib, shutil, mlpersist, lightgbm as lgb
        from sklearn.datasets import make_classification
        sys.argv = ["x", {kind!r}, {str(tmp_path / 'model.txt')!r}]
        try:
            runpy.run_path({str(tmp_path / 'craft.py')!r})
        except BaseException:
            pass
        x, y = make_classification(200, 5, random_state=0)
        mlpersist.save_any(lgb.Booster(model_str=lgb.LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y)
                           .booster_.model_to_string()), {str(tmp_path / 'art')!r})
        raw = open({str(tmp_path / 'model.txt')!r}, "rb").read()
        open({str(tmp_path / 'art' / 'model.txt')!r}, "wb").write(raw)
        doc = json.load(open({str(tmp_path / 'art' / 'manifest.json')!r}))
        doc["files"]["model.txt"] = {{"size": len(raw), "digest": "sha256:" + hashlib.sha256(raw).hexdigest()}}
        json.dump(doc, open({str(tmp_path / 'art' / 'manifest.json')!r}, "w"))
        try:
            mlpersist.load_any({str(tmp_path / 'art')!r})
            print("LOADED")
        except mlpersist.UntrustedContentError as exc:
            print("REFUSED", exc)
    """)
    assert proc.stdout.strip().splitlines()[-1].startswith("REFUSED"), proc.stdout + proc.stderr


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
