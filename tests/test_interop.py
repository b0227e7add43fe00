"""Every framework installed together (`nox -s interop`): bundles, dispatch precedence, stored examples
rerun with check=, and models saved without mlpersist recognised, loaded and converted."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from mlp_testkit import require, run_cli, run_python

from mlpersist import CheckFailedError, UntrustedContentError, inspect, load_any, save_any, verify

np = require("numpy")
torch = require("torch")
xgboost = require("xgboost")
lightgbm = require("lightgbm")
keras = require("keras")
pd = require("pandas")
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: E402

X, Y = make_classification(n_samples=300, n_features=6, random_state=0)
X32 = X.astype("float32")


def torch_net() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))


def keras_net() -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(X32, Y, epochs=1, verbose=0)
    return model


def frame() -> Any:
    return pd.DataFrame({"age": X[:, 0], "income": X[:, 1], "plan": np.where(X[:, 2] > 0, "gold", "basic")})


def column_pipeline() -> Any:
    pre = ColumnTransformer([("num", StandardScaler(), ["age", "income"]), ("cat", OneHotEncoder(), ["plan"])])
    return Pipeline([("pre", pre), ("clf", LogisticRegression())]).fit(frame(), Y)


def test_a_mixed_team_bundle_round_trips_and_checks_in_a_fresh_process(tmp_path: Path) -> None:
    pre = make_pipeline(StandardScaler()).fit(X32)
    net, knet = torch_net(), keras_net()
    booster = xgboost.XGBClassifier(n_estimators=5, max_depth=3).fit(X, Y)
    bundle = {"preprocess": pre, "model": net, "keras": knet, "trees": booster, "labels": ["stay", "churn"],
              "config": {"threshold": 0.4, "features": 6}}
    examples = {"preprocess": X32[:8], "model": torch.from_numpy(X32[:8]), "keras": X32[:8], "trees": X[:8]}
    m = save_any(bundle, tmp_path / "b", example=examples)
    assert {k: p.adapter for k, p in m.parts.items()} == {
        "preprocess": "sklearn", "model": "torch", "keras": "keras", "trees": "xgboost", "labels": "json",
        "config": "json"}
    assert set(m.environment["packages"]) >= {"scikit-learn", "torch", "keras", "numpy"}
    assert net.training  # the example ran in eval mode and the model was left as it was
    loaded = load_any(tmp_path / "b", check=0.0)
    assert list(loaded) == list(bundle) and loaded["config"] == bundle["config"]
    assert np.array_equal(loaded["preprocess"].transform(X32), pre.transform(X32))
    net.eval()
    with torch.no_grad():
        assert torch.equal(loaded["model"].eval()(torch.from_numpy(X32)), net(torch.from_numpy(X32)))
    assert np.array_equal(np.asarray(loaded["keras"](X32)), np.asarray(knet(X32)))
    assert np.array_equal(loaded["trees"].predict_proba(X), booster.predict_proba(X))
    proc = run_python(f"""
        import mlpersist, sys
        b = mlpersist.load_any({str(tmp_path / 'b')!r}, check=0.0)
        print(sorted(b), sorted(m for m in ("torch", "tensorflow", "xgboost", "sklearn") if m in sys.modules))
    """)
    assert proc.stdout.split("]")[0] == "['config', 'keras', 'labels', 'model', 'preprocess', 'trees'"
    out = run_cli("check", str(tmp_path / "b"))
    assert out.returncode == 0 and "5 of 5 output(s) within tolerance 1e-05" in out.stdout, out.stdout + out.stderr


def test_loading_one_part_framework_bundle_imports_only_that_framework(tmp_path: Path) -> None:
    save_any({"pre": make_pipeline(StandardScaler()).fit(X), "n": 3}, tmp_path / "b")
    proc = run_python(f"""
        import mlpersist, sys
        mlpersist.load_any({str(tmp_path / 'b')!r})
        print(sorted(m for m in ("torch", "tensorflow", "keras", "xgboost", "lightgbm") if m in sys.modules))
    """)
    assert proc.stdout.strip() == "[]"


# --- stored examples, for each framework ------------------------------------------------------------


def _booster() -> Any:
    return xgboost.train({"max_depth": 3, "objective": "binary:logistic"}, xgboost.DMatrix(X, label=Y), 5)


CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any], set[str]]] = {
    "sklearn-array": (lambda: LogisticRegression().fit(X, Y), lambda: X[:10], {"predict", "predict_proba"}),
    "sklearn-dataframe": (column_pipeline, lambda: frame().head(10), {"predict", "predict_proba"}),
    "sklearn-transform": (lambda: make_pipeline(StandardScaler()).fit(X), lambda: X[:5], {"transform"}),
    "torch": (torch_net, lambda: torch.from_numpy(X32[:10]), {"forward"}),
    "torch-bfloat16": (lambda: torch_net().to(torch.bfloat16), lambda: torch.from_numpy(X32[:4]).bfloat16(),
                       {"forward"}),
    "keras": (keras_net, lambda: X32[:10], {"call"}),
    "xgboost-booster": (_booster, lambda: X[:10], {"predict"}),
    "xgboost-classifier": (lambda: xgboost.XGBClassifier(n_estimators=5).fit(X, Y), lambda: X[:10],
                           {"predict", "predict_proba"}),
    "lightgbm": (lambda: lightgbm.LGBMClassifier(n_estimators=5, verbose=-1).fit(X, Y), lambda: X[:10],
                 {"predict", "predict_proba"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_stored_example_reruns_bit_for_bit_here(tmp_path: Path, case: str) -> None:
    make_model, make_input, outputs = CASES[case]
    m = save_any(make_model(), tmp_path / "m", example=make_input())
    assert m.example is not None and set(m.example["outputs"]) == outputs
    assert all(name.startswith("example/") for name in m.files if name.endswith(".npy"))
    load_any(tmp_path / "m", check=0.0)
    out = run_cli("check", str(tmp_path / "m"), "--tolerance", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(outputs)} of {len(outputs)} output(s) within tolerance 0" in out.stdout
    assert "example" in run_cli("inspect", str(tmp_path / "m")).stdout


def _replace(root: Path, name: str, data: bytes) -> None:
    """Change one payload file and re-seal the manifest: as if another environment had written the outputs."""
    (root / name).write_bytes(data)
    doc = json.loads((root / "manifest.json").read_text())
    doc["files"][name] = {"size": len(data), "digest": "sha256:" + hashlib.sha256(data).hexdigest()}
    (root / "manifest.json").write_text(json.dumps(doc))


def _npy(arr: Any) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_check_reports_the_largest_difference_and_fails_beyond_the_tolerance(tmp_path: Path) -> None:
    model = LogisticRegression().fit(X, Y)
    save_any(model, tmp_path / "m", example=X[:10])
    proba = model.predict_proba(X[:10])
    _replace(tmp_path / "m", "example/out-predict_proba.npy", _npy(proba + 3e-7))
    load_any(tmp_path / "m", check=True)  # within the default 1e-5
    with pytest.raises(CheckFailedError, match=r"predict_proba: max \|diff\| 3e-07") as info:
        load_any(tmp_path / "m", check=0.0)
    assert [(d.output, d.ok) for d in info.value.report] == [("predict", True), ("predict_proba", False)]
    assert "mlpersist requirements" in str(info.value)
    out = run_cli("check", str(tmp_path / "m"), "--tolerance", "1e-9")
    assert out.returncode == 1 and "FAILED predict_proba: max |diff| 3e-07" in out.stdout
    assert "1 of 2 output(s) within tolerance 1e-09" in out.stdout
    _replace(tmp_path / "m", "example/out-predict.npy", _npy(1 - model.predict(X[:10])))
    with pytest.raises(CheckFailedError, match=r"FAILED predict: max \|diff\| 1\n"):
        load_any(tmp_path / "m", check=True)
    _replace(tmp_path / "m", "example/out-predict.npy", _npy(model.predict(X[:9])))
    with pytest.raises(CheckFailedError, match=r"shape \(10,\), stored \(9,\)"):
        load_any(tmp_path / "m", check=True)


def test_examples_that_need_pickle_are_refused_at_save(tmp_path: Path) -> None:
    from mlpersist import PersistError

    with pytest.raises(PersistError, match="holds Python objects"):
        save_any(LogisticRegression().fit(X, Y), tmp_path / "m", example=np.array([[object()] * 6], dtype=object))
    with pytest.raises(PersistError, match="could not answer the example"):
        save_any(LogisticRegression().fit(X, Y), tmp_path / "m", example=X[:3, :2])
    assert not (tmp_path / "m").exists()


# --- models saved without mlpersist -----------------------------------------------------------------


def _bare(kind: str, where: Path) -> tuple[Path, Any, Callable[[Any], Any]]:
    """Write a native model file the way its framework's own docs say; return it, the model, a predict."""
    if kind in ("joblib", "pickle"):
        import joblib

        model = LogisticRegression().fit(X, Y)
        path = where / "model.bin"
        if kind == "joblib":
            joblib.dump(model, path, compress=3)
        else:
            path.write_bytes(pickle.dumps(model))
        return path, model, lambda m: m.predict_proba(X)
    if kind in ("keras", "h5"):
        model = keras_net()
        path = where / ("model.keras" if kind == "keras" else "model.h5")
        model.save(str(path))
        os.rename(path, where / f"{kind}-model.data")  # recognised by content, not by name
        return where / f"{kind}-model.data", model, lambda m: np.asarray(m(X32))
    if kind == "savedmodel":
        model = keras_net()
        model.export(str(where / "served"))
        return where / "served", model, lambda m: np.asarray(next(iter(m(X32).values())) if isinstance(
            m(X32), dict) else m(X32))
    if kind in ("pt", "pth", "safetensors"):
        net = torch_net()
        path = where / f"weights.{kind if kind != 'safetensors' else 'bin'}"
        if kind == "safetensors":
            from safetensors.torch import save_file

            save_file(net.state_dict(), str(path))
        else:
            torch.save(net.state_dict(), path)
        return path, net, lambda sd: sorted((k, tuple(v.shape)) for k, v in dict(sd).items())
    if kind in ("xgb-json", "xgb-ubj"):
        booster = _booster()
        path = where / "trees.bin"
        booster.save_model(str(where / ("t.json" if kind == "xgb-json" else "t.ubj")))
        os.rename(where / ("t.json" if kind == "xgb-json" else "t.ubj"), path)
        return path, booster, lambda b: b.predict(xgboost.DMatrix(X))
    if kind == "lightgbm":
        booster = lightgbm.LGBMClassifier(n_estimators=5, verbose=-1).fit(X, Y).booster_
        booster.save_model(str(where / "model.txt"))
        return where / "model.txt", booster, lambda b: b.predict(X)
    raise AssertionError(kind)


BARE = {"joblib": "sklearn", "pickle": "sklearn", "keras": "keras", "h5": "keras", "savedmodel": "keras",
        "pt": "torch", "pth": "torch", "safetensors": "torch", "xgb-json": "xgboost", "xgb-ubj": "xgboost",
        "lightgbm": "lightgbm"}


@pytest.mark.parametrize("kind", sorted(BARE))
def test_a_bare_model_is_recognised_loaded_and_converted(tmp_path: Path, kind: str) -> None:
    (tmp_path / "in").mkdir()
    path, original, answer = _bare(kind, tmp_path / "in")
    trust = {"trusted": True} if kind == "savedmodel" else {}
    if kind == "h5":
        require("tensorflow")  # legacy HDF5 model files are written by the TensorFlow backend
    want = answer(original.state_dict() if kind in ("pt", "pth", "safetensors") else original)
    assert _same(answer(load_any(path, **trust)), want)
    args = ["convert", str(path), str(tmp_path / "art"), *(["--trusted"] if trust else [])]
    out = run_cli(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    m = inspect(tmp_path / "art")
    assert m.adapter == BARE[kind] and m.info["converted_from"] == path.name and m.framework_version != "unknown"
    verify(tmp_path / "art")
    assert _same(answer(load_any(tmp_path / "art", **trust)), want)
    if path.is_file():  # the payload is the very bytes given
        (payload,) = m.files.values()
        assert payload.digest == "blake3:" + blake3(path.read_bytes()).hexdigest()
    assert "==" in run_cli("requirements", str(tmp_path / "art")).stdout


def _same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b))) if not isinstance(a, list) else a == b


def test_converting_a_hostile_pickle_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    import fault_models  # noqa: F401  (a module of tests/ the pickle names; never imported by the load)

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "evil.joblib").write_bytes(pickle.dumps(Evil(), protocol=4))
    out = run_cli("convert", str(tmp_path / "evil.joblib"), str(tmp_path / "art"))
    assert out.returncode == 2 and "system" in out.stderr and "nothing was run" in out.stderr
    assert not (tmp_path / "art").exists() and not (tmp_path / "pwned").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.joblib"]
    with pytest.raises(UntrustedContentError):
        load_any(tmp_path / "evil.joblib")


def test_converting_an_artifact_is_refused(tmp_path: Path) -> None:
    save_any(LogisticRegression().fit(X, Y), tmp_path / "m")
    out = run_cli("convert", str(tmp_path / "m"), str(tmp_path / "n"))
    assert out.returncode == 2 and "already an mlpersist artifact" in out.stderr


def test_requirements_lines_install_what_saved_the_bundle(tmp_path: Path) -> None:
    from importlib.metadata import version

    from packaging.requirements import Requirement

    save_any({"pre": make_pipeline(StandardScaler()).fit(X), "net": torch_net(),
              "trees": xgboost.XGBClassifier(n_estimators=2).fit(X, Y)}, tmp_path / "b")
    out = run_cli("requirements", str(tmp_path / "b"))
    reqs = [Requirement(line.split("#")[0]) for line in out.stdout.splitlines() if not line.startswith("#")]
    names = {r.name for r in reqs}
    assert {"scikit-learn", "torch", "numpy", "scipy", "mlpersist"} <= names
    assert names & {"xgboost", "xgboost-cpu"}
    for r in reqs:
        assert r.specifier.contains(version(r.name), prereleases=True), (r, version(r.name))
