"""Two distinguishable models per framework for the fault-injection writers (run in their own processes)."""

from __future__ import annotations

import importlib.util
from typing import Any


def _x() -> Any:
    import numpy as np

    return np.random.default_rng(0).normal(size=(8, 4)).astype("float32")


def available() -> list[str]:
    """The kinds whose framework is installed here (the dummy needs none)."""
    kinds = ["dummy"]
    for kind, module in (("sklearn", "sklearn"), ("torch", "torch"), ("xgboost", "xgboost"), ("keras", "keras")):
        if importlib.util.find_spec(module) is not None:
            kinds.append(kind)
    return kinds


def make(kind: str) -> tuple[Any, Any]:
    """Two models of `kind` that answer differently."""
    if kind == "dummy":
        from mlp_testkit import DummyModel, register_dummy

        register_dummy()
        return DummyModel(1.0, 0.0), DummyModel(2.0, 5.0)
    X = _x()
    y = (X[:, 0] > 0).astype(int)
    if kind == "sklearn":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=0.1).fit(X, y), LogisticRegression(C=10.0).fit(X, y)
    if kind == "torch":
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.nn.Sequential(torch.nn.Linear(4, 3))
    if kind == "xgboost":
        import xgboost

        return (xgboost.XGBRegressor(n_estimators=3).fit(X, y), xgboost.XGBRegressor(n_estimators=6).fit(X, y))
    import keras

    keras.utils.set_random_seed(0)
    return tuple(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2))  # type: ignore[return-value]


def outputs(kind: str, model: Any) -> list[Any]:
    """The model's answer on a fixed input, as (JSON-able, exactly comparable) nested lists."""
    if kind == "dummy":
        return list(model.predict([0.5, -1.0, 3.0]))
    X = _x()
    if kind == "torch":
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(X)).numpy().tolist()  # type: ignore[no-any-return]
    if kind == "keras":
        return model.predict(X, verbose=0).tolist()  # type: ignore[no-any-return]
    return model.predict(X).tolist()  # type: ignore[no-any-return]
