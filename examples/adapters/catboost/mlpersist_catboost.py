"""CatBoost for mlpersist, written against the public adapter API only; registered with register_adapter()."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import catboost

from mlpersist import Payload, register_adapter
from mlpersist.errors import CorruptArtifactError, PersistError, UntrustedContentError

MODEL = "model.cbm"
_WRAPPERS: dict[str, type] = {c.__name__: c for c in (catboost.CatBoost, catboost.CatBoostClassifier,
                                                       catboost.CatBoostRegressor, catboost.CatBoostRanker)}


class CatBoostAdapter:
    """CatBoost models in CatBoost's own binary format (.cbm), read by CatBoost's native loader.

    That loader is not written for hostile input: of 400 copies of a small model with one to four
    bytes changed, 7 made it segfault (6 while loading, 1 in predict), and its JSON loader did too
    on changed numbers. Nothing here can check the format as CatBoost reads it, so only a load the
    caller vouches for reaches it: `trusted=True`, or a manifest signed by a key the caller
    configured. Under the default trust rules the load is refused before CatBoost sees a byte.
    """

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
        """Rebuild the class from a fixed table and load the checked bytes, if the caller vouches for them."""
        cls = _WRAPPERS.get(str(info.get("wrapper")))
        if cls is None:
            raise CorruptArtifactError(f"unknown CatBoost class {info.get('wrapper')!r}")
        if not payload.policy.trusted:
            raise UntrustedContentError(
                f"{payload.label(MODEL)}: CatBoost's model reader is native code that crashes on crafted files, and "
                "nothing can check a .cbm as it reads it; load it with trusted=True if you trust its author, or have "
                "the author sign it (mlpersist sign) and configure their public key", [f"catboost.{cls.__name__}"])
        model = cls()
        try:
            model.load_model(blob=payload.read_bytes(MODEL))
        except Exception as exc:  # CatBoostError, and its metadata's UnicodeDecodeError or JSONDecodeError
            raise CorruptArtifactError(f"CatBoost could not read {payload.label(MODEL)}: {type(exc).__name__}: "
                                       f"{exc}") from exc
        return model


def register() -> None:
    """Make mlpersist save CatBoost models with this adapter."""
    register_adapter("catboost", "mlpersist_catboost:CatBoostAdapter", claims=("catboost",), package="catboost",
                     formats=("cbm",))
