"""Tutorial 5: a worked custom adapter, for a model class no built-in adapter knows.

An adapter is a class with `name`, `format_version`, `save` and `load`; `register_adapter` adds it
by import string, without editing mlpersist (a package would use the `mlpersist.adapters` entry
point instead: see docs/extending.md and examples/adapters/). The payload here is plain JSON: data,
never code, so loading it needs no trust.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import mlpersist
from mlpersist.errors import CorruptArtifactError


class PolynomialModel:
    """The team's own model: y = sum(c_i * x**i)."""

    def __init__(self, coefficients: list[float]) -> None:
        self.coefficients = coefficients

    def predict(self, xs: list[float]) -> list[float]:
        return [sum(c * x**i for i, c in enumerate(self.coefficients)) for x in xs]


class PolynomialAdapter:
    """Saves PolynomialModel as coefficients.json; rebuilds it without running anything from the file."""

    name: ClassVar[str] = "polynomial"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ()  # distributions whose versions the manifest records

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]:
        (dest / "coefficients.json").write_text(json.dumps(model.coefficients))
        return {"degree": len(model.coefficients) - 1}  # stored as the manifest's `info`

    def load(self, payload: mlpersist.Payload, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        coefficients = json.loads(payload.read_bytes("coefficients.json"))  # size and digest already checked
        if not isinstance(coefficients, list) or not all(isinstance(c, (int, float)) for c in coefficients):
            raise CorruptArtifactError("coefficients.json should be a list of numbers")
        return PolynomialModel(coefficients)


# This script is both the adapter's module and its user: register it under its import name.
sys.modules.setdefault("polynomial_adapter", sys.modules[__name__])
mlpersist.register_adapter("polynomial", "polynomial_adapter:PolynomialAdapter", claims=[__name__],
                           package="mlpersist", formats=["json"])

model = PolynomialModel([1.0, 0.5, -0.25])
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "poly"
    manifest = mlpersist.save_any(model, path, example=[0.0, 1.0, 2.0])
    print(manifest.adapter, manifest.format, sorted(manifest.files))
    loaded = mlpersist.load_any(path, check=0.0)  # reruns predict on the stored example, bit for bit
    assert loaded.predict([3.0]) == model.predict([3.0])
    print("custom adapter round trip ok:", loaded.predict([0.0, 1.0, 2.0, 3.0]))
