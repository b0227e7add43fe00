"""CatBoost for mlpersist, written against the public adapter API only; registered with register_adapter()."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import catboost

from mlpersist import Payload, register_adapter
from mlpersist.errors import CorruptArtifactError, PersistError

MODEL = "model.cbm"
_WRAPPERS: dict[str, type] = {c.__name__: c for c in (catboost.CatBoost, catboost.CatBoostClassifier,
                                                       catboost.CatBoostRegressor, catboost.CatBoostRanker)}


class CatBoostAdapter:
    """CatBoost models in CatBoost's own binary format (.cbm): data only, read by CatBoost's native loader."""

    name: ClassVar[str] = "catboost"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("catboost", "numpy")

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]:
        """Write model.cbm with save_model; record which class to rebuild."""
        if type(model) not in _WRAPPERS.values():
            raise PersistError(f"{type(model).__qualname__} is not a CatBoost class this adapter rebuilds")
        model.save_model(str(dest / MODEL), format="cbm")
        return {"wrapper": type(model).__name__}

    def load(self, payload: Payload, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        """Rebuild the class from a fixed table and load the checked bytes."""
        cls = _WRAPPERS.get(str(info.get("wrapper")))
        if cls is None:
            raise CorruptArtifactError(f"unknown CatBoost class {info.get('wrapper')!r}")
        model = cls()
        try:
            model.load_model(blob=payload.read_bytes(MODEL))
        except catboost.CatBoostError as exc:
            raise CorruptArtifactError(f"CatBoost could not read {MODEL}: {exc}") from exc
        return model


def register() -> None:
    """Make mlpersist save CatBoost models with this adapter."""
    register_adapter("catboost", "mlpersist_catboost:CatBoostAdapter", claims=("catboost",), package="catboost",
                     formats=("cbm",))
