"""CatBoost through a third-party adapter (examples/adapters/catboost) registered with register_adapter()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from contract import AdapterContract
from mlp_testkit import require

from mlpersist import load_any, save_any


@pytest.fixture(autouse=True)
def _registered() -> None:
    require("mlpersist_catboost").register()  # the conftest fixture restores the registry afterwards


def data(n: int = 200, seed: int = 0) -> tuple[Any, Any]:
    return require("sklearn.datasets").make_classification(n, 5, random_state=seed)


class TestCatBoost(AdapterContract):
    adapter = "catboost"
    framework_module = "catboost"

    setup_code = "import mlpersist_catboost; mlpersist_catboost.register()"

    def make_model(self) -> Any:
        x, y = data()
        return require("catboost").CatBoostClassifier(iterations=20, verbose=False, allow_writing_files=False).fit(x, y)

    def make_input(self) -> Any:
        return data(30, seed=1)[0]

    def outputs(self, model: Any, x: Any) -> Any:
        return model.predict_proba(x)


def test_a_regressor_round_trips(tmp_path: Path) -> None:
    np = require("numpy")
    x, y = data()
    model = require("catboost").CatBoostRegressor(iterations=10, verbose=False, allow_writing_files=False).fit(x, y)
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
