from __future__ import annotations

from collections.abc import Iterator

import pytest
from mlp_testkit import DummyModel, register_dummy


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    """Every test starts and ends with the registry it found."""
    from mlpersist import _registry

    specs, instances, read = dict(_registry._specs), dict(_registry._instances), _registry._entry_points_read
    yield
    _registry._specs.clear()
    _registry._specs.update(specs)
    _registry._instances.clear()
    _registry._instances.update(instances)
    _registry._entry_points_read = read


@pytest.fixture
def dummy() -> DummyModel:
    """A registered framework-free model."""
    register_dummy()
    return DummyModel(3.0, 0.5)
