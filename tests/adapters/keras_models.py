"""Keras objects for the tests (imported only once keras is known to be installed)."""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="mlptest")
class Scale(keras.layers.Layer):
    """A registered custom layer."""

    def __init__(self, factor: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x: Any) -> Any:
        return x * self.factor

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor}


class Unregistered(keras.layers.Layer):
    """A custom layer nobody registered: loading needs custom_objects=."""

    def call(self, x: Any) -> Any:
        return x + 1.0


@keras.saving.register_keras_serializable(package="mlptest")
class TwoTower(keras.Model):
    """A subclassed model."""

    def __init__(self, units: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.a, self.b = keras.layers.Dense(units, activation="tanh"), keras.layers.Dense(2)

    def call(self, x: Any) -> Any:
        return self.b(self.a(x))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}
