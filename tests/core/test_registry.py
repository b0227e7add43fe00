"""Registry, entry points and dispatch: data until used, most specific class wins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mlp_testkit import DummyModel, register_dummy

import mlpersist
from mlpersist import MissingFrameworkError, PersistError, UnsupportedModelError, _registry, load_any, save_any
from mlpersist._dispatch import detect


def test_builtin_adapters_are_listed_alphabetically() -> None:
    assert list(_registry._BUILTIN) == sorted(_registry._BUILTIN)


def test_builtin_targets_point_into_the_adapters_package() -> None:
    for name, spec in _registry._BUILTIN.items():
        assert spec.target == f"mlpersist.adapters.{name}:{spec.target.rpartition(':')[2]}"


def test_registering_a_taken_name_or_claim_is_refused() -> None:
    register_dummy()
    with pytest.raises(PersistError, match="taken"):
        mlpersist.register_adapter("dummy", "x:Y", claims=("other",))
    with pytest.raises(PersistError, match="claimed by adapter 'dummy'"):
        mlpersist.register_adapter("dummy2", "x:Y", claims=("mlp_testkit",))


def test_replace_takes_over_a_claim() -> None:
    register_dummy()
    mlpersist.register_adapter("dummy2", "mlp_testkit:DummyAdapter", claims=("mlp_testkit",), replace=True)
    assert detect(DummyModel()) == "dummy2"
    assert _registry.specs["dummy"].claims == ()


def test_target_must_name_a_class() -> None:
    with pytest.raises(PersistError, match="module:Class"):
        mlpersist.register_adapter("bad", "no_colon_here")


def test_dispatch_takes_the_first_class_in_the_mro_that_an_adapter_claims() -> None:
    register_dummy()
    mlpersist.register_adapter("builtin_int", "mlp_testkit:DummyAdapter", claims=("builtins",))
    # bool's MRO: bool -> int -> object, all in builtins; DummyModel's: mlp_testkit first
    assert detect(True) == "builtin_int"
    assert detect(DummyModel()) == "dummy"


def test_an_unclaimed_model_is_unsupported_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"no adapter claims mlp_testkit\.DummyModel"):
        save_any(DummyModel(), tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_list_adapters_reports_installation_without_importing(dummy: DummyModel) -> None:
    mlpersist.register_adapter("ghost", "ghost_adapter:Ghost", claims=("ghost_framework_xyz",))
    rows = {a.name: a for a in mlpersist.list_adapters()}
    assert rows["dummy"].installed and not rows["ghost"].installed
    assert "ghost_framework_xyz" not in sys.modules


def _plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    """An installed distribution whose one `mlpersist.adapters` entry point is `entry`; not read yet."""
    dist = tmp_path / "mlp_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlp-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[mlpersist.adapters]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_registry, "_entry_points_read", False)


def test_entry_points_register_adapters_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plugin_dist(tmp_path, monkeypatch, "mlp_testkit = mlp_testkit:DummyAdapter")
    sys.modules.pop("mlp_plugin_never_imported", None)
    assert detect(DummyModel()) == "mlp_testkit"
    assert "mlp_testkit" not in _registry._instances  # resolved by name only, not loaded yet
    save_any(DummyModel(5, 1), tmp_path / "art")
    assert load_any(tmp_path / "art").predict([1]) == [6]


def test_entry_points_are_read_only_for_what_the_built_in_adapters_do_not_claim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every installed distribution's entry points took ~2.5 ms of a process's first save or load (135
    distributions): a model, an artifact or a pickled object of a framework an adapter already claims skips it."""
    _plugin_dist(tmp_path, monkeypatch, "mlp_testkit = mlp_testkit:DummyAdapter")
    estimator = type("LogisticRegression", (), {"__module__": "sklearn.linear_model._logistic"})
    assert detect(estimator()) == "sklearn"
    assert _registry.get_spec("xgboost") is _registry._BUILTIN["xgboost"]
    assert _registry.claimed("torch.nn.modules.linear") == "torch"
    assert not _registry._entry_points_read
    assert _registry.claimed("mlp_testkit.models") == "mlp_testkit"  # not claimed yet: the entry points are read
    assert _registry._entry_points_read
    del _registry._specs["mlp_testkit"]  # as it was before the read (the fixture restores the registry)
    monkeypatch.setattr(_registry, "_entry_points_read", False)
    assert detect(DummyModel()) == "mlp_testkit"  # the model's own class is not claimed: the same
    assert _registry._entry_points_read


def test_an_entry_point_cannot_take_a_module_another_adapter_claims(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """So a claim found before the entry points are read is the one found after (`claimed`)."""
    mlpersist.register_adapter("mine", "mlp_testkit:DummyAdapter", claims=("mlp_testkit",))
    _plugin_dist(tmp_path, monkeypatch, "mlp_testkit = somebody_else:Adapter")
    assert _registry.claims()["mlp_testkit"] == "mine"
    assert "mlp_testkit" not in _registry.specs
    assert detect(DummyModel()) == "mine"


def test_loading_when_the_framework_is_missing_names_the_pip_line(tmp_path: Path, dummy: DummyModel) -> None:
    mlpersist.register_adapter("dummy", "mlp_testkit:DummyAdapter", claims=("mlp_testkit", "ghost_fw"),
                               package="ghost-fw", extra="ghost", replace=True)
    save_any(dummy, tmp_path / "a")  # saving needs only the adapter; loading checks every claim
    with pytest.raises(MissingFrameworkError, match=r"pip install 'ghost-fw'  \(or pip install 'mlpersist\[ghost\]'"):
        load_any(tmp_path / "a")


def test_the_missing_framework_error_pins_the_recorded_version() -> None:
    spec = _registry.AdapterSpec("m:C", ("fw",), "fw", "fw-dist")
    assert "pip install 'fw-dist==1.2.3'" in str(_registry.missing_framework(spec, "1.2.3"))
