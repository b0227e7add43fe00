"""CatBoost through a third-party adapter (examples/adapters/catboost) registered with register_adapter()."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any, ClassVar

import pytest
from contract import AdapterContract
from mlp_testkit import require

from mlpersist import CorruptArtifactError, UntrustedContentError, load_any, save_any


@pytest.fixture(autouse=True)
def _registered() -> None:
    require("mlpersist_catboost").register()  # the conftest fixture restores the registry afterwards


def data(n: int = 200, seed: int = 0) -> tuple[Any, Any]:
    return require("sklearn.datasets").make_classification(n, 5, random_state=seed)


def classifier() -> Any:
    x, y = data()
    return require("catboost").CatBoostClassifier(iterations=20, verbose=False, allow_writing_files=False).fit(x, y)


class TestCatBoost(AdapterContract):
    adapter = "catboost"
    framework_module = "catboost"
    load_options: ClassVar[dict[str, Any]] = {"trusted": True}  # CatBoost's reader is not for hostile bytes

    setup_code = "import mlpersist_catboost; mlpersist_catboost.register()"

    def make_model(self) -> Any:
        return classifier()

    def make_input(self) -> Any:
        return data(30, seed=1)[0]

    def outputs(self, model: Any, x: Any) -> Any:
        return model.predict_proba(x)


def test_a_signed_regressor_loads_under_the_default_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The way to share CatBoost models: the author signs, the reader configures the author's key."""
    np = require("numpy")
    require("cryptography")
    from mlpersist import _signing

    x, y = data()
    model = require("catboost").CatBoostRegressor(iterations=10, verbose=False, allow_writing_files=False).fit(x, y)
    save_any(model, tmp_path / "m")
    _signing.keygen(tmp_path / "author.key")
    _signing.sign(tmp_path / "m", tmp_path / "author.key")
    monkeypatch.setenv(_signing.KEYS_ENV, f"{tmp_path / 'author.key'}.pub")
    loaded = load_any(tmp_path / "m")
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def _rewritten(path: Path, payload: bytes) -> Path:
    """The artifact with model.cbm replaced by `payload` and its manifest rewritten to match."""
    (path / "model.cbm").write_bytes(payload)
    doc = json.loads((path / "manifest.json").read_text())
    doc["files"]["model.cbm"] = {"size": len(payload), "digest": "sha256:" + sha256(payload).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(doc))
    return path


def test_under_the_default_rules_catboost_never_reads_the_file(tmp_path: Path) -> None:
    """Refused before CatBoost's reader runs: bytes it could not read give the same refusal as a real model."""
    save_any(classifier(), tmp_path / "m")
    with pytest.raises(UntrustedContentError, match=r"trusted=True .* sign") as real:
        load_any(tmp_path / "m")
    assert real.value.names == ("catboost.CatBoostClassifier",)
    with pytest.raises(UntrustedContentError, match="crashes on crafted files"):
        load_any(_rewritten(tmp_path / "m", b"CBM1 not a model"))


@pytest.mark.parametrize("damage", ["garbage", "metadata"])
def test_a_trusted_load_of_bytes_catboost_cannot_read_is_a_corrupt_artifact(damage: str, tmp_path: Path) -> None:
    """CatBoost raises CatBoostError, or, for its metadata, raw UnicodeDecodeError and JSONDecodeError."""
    save_any(classifier(), tmp_path / "m")
    blob = bytearray((tmp_path / "m" / "model.cbm").read_bytes())
    if damage == "garbage":
        blob = bytearray(b"CBM1" + bytes(64))
    else:  # a byte that is not UTF-8 inside the training parameters CatBoost keeps as JSON text
        at = blob.index(b'"loss_function"')
        blob[at] = 0xFF
    with pytest.raises(CorruptArtifactError, match=r"CatBoost could not read model\.cbm"):
        load_any(_rewritten(tmp_path / "m", bytes(blob)), trusted=True)
