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


@keras.saving.register_keras_serializable(package="mlptest")
class CountedNormal(keras.initializers.Initializer):
    """Seeded normal values; counts its calls (`calls`, across instances), and raises while `failing` is set."""

    calls = 0
    failing = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, shape: Any, dtype: Any = None) -> Any:
        type(self).calls += 1
        if type(self).failing:
            raise RuntimeError("this initializer is broken")
        return keras.random.normal(shape, dtype=dtype, seed=self.seed)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="mlptest")
class HalfSaved(keras.layers.Layer):
    """Saves its kernel; its `offset` (not trainable) is drawn from a seeded initializer at every build."""

    def build(self, input_shape: Any) -> None:
        self.kernel = self.add_weight(shape=(input_shape[-1], 3), initializer=CountedNormal(1), name="kernel")
        self.offset = self.add_weight(shape=(3,), initializer=CountedNormal(2), trainable=False, name="offset")

    def call(self, x: Any) -> Any:
        return keras.ops.matmul(x, self.kernel) + self.offset

    def save_own_variables(self, store: Any) -> None:
        store["0"] = keras.ops.convert_to_numpy(self.kernel)

    def load_own_variables(self, store: Any) -> None:
        self.kernel.assign(store["0"])


@keras.saving.register_keras_serializable(package="mlptest")
class Noted(keras.layers.Layer):
    """A registered layer that keeps a note as an asset file (Keras's `save_assets`), as adapted lookups do."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.note = ""

    def call(self, x: Any) -> Any:
        return x + float(len(self.note))

    def save_assets(self, dir_path: str) -> None:
        with open(f"{dir_path}/note.txt", "w", encoding="utf-8") as f:
            f.write(self.note)

    def load_assets(self, dir_path: str) -> None:
        with open(f"{dir_path}/note.txt", encoding="utf-8") as f:
            self.note = f.read()
