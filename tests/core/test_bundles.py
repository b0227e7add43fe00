"""Bundles: a dict of models and JSON values under one manifest, without any framework installed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mlp_testkit import DummyModel, ExplodingModel, run_cli

from mlpersist import (
    CorruptArtifactError,
    IntegrityError,
    Manifest,
    PersistError,
    UnsupportedModelError,
    inspect,
    load_any,
    register_adapter,
    save_any,
    verify,
)


def _bundle() -> dict[str, Any]:
    return {"scaler": DummyModel(2.0, 0.0), "model": DummyModel(3.0, 1.0), "labels": ["no", "yes"],
            "threshold": 0.5, "nested": {"inner": DummyModel(5.0, -1.0), "notes": {"v": 3}}}


def test_a_bundle_round_trips_every_part_in_its_order(tmp_path: Path, dummy: DummyModel) -> None:
    bundle = _bundle()
    m = save_any(bundle, tmp_path / "b")
    assert (m.adapter, m.format, m.model_class) == ("bundle", "bundle", "builtins:dict")
    loaded = load_any(tmp_path / "b")
    assert list(loaded) == list(bundle) and list(loaded["nested"]) == ["inner", "notes"]
    assert loaded["labels"] == ["no", "yes"] and loaded["threshold"] == 0.5 and loaded["nested"]["notes"] == {"v": 3}
    for key in ("scaler", "model"):
        assert loaded[key].predict([1.0, 2.5]) == bundle[key].predict([1.0, 2.5])
    assert loaded["nested"]["inner"].predict([4.0]) == [19.0]


def test_one_manifest_lists_every_file_of_every_part(tmp_path: Path, dummy: DummyModel) -> None:
    m = save_any(_bundle(), tmp_path / "b")
    assert sorted(m.files) == sorted(f"{d}/{n}" for d in ("scaler", "model", "nested/inner")
                                     for n in ("params.json", "sub/extra.bin"))
    assert set(m.parts) == {"scaler", "model", "labels", "threshold", "nested"}
    assert m.parts["model"].adapter == "dummy" and m.parts["model"].dir == "model"
    assert m.parts["labels"].value == ["no", "yes"]
    assert m.parts["nested"].parts["inner"].dir == "nested/inner" and m.parts["nested"].parts["notes"].value == {"v": 3}
    verify(tmp_path / "b")
    (tmp_path / "b" / "nested" / "inner" / "params.json").write_text('{"scale": 9, "shift": 9}')
    with pytest.raises(IntegrityError, match=r"nested/inner/params\.json"):
        load_any(tmp_path / "b")


def test_inspect_and_the_cli_show_every_part(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(_bundle(), tmp_path / "b")
    out = run_cli("inspect", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    for text in ("parts", "scaler: mlp_testkit:DummyModel (dummy default", "labels: JSON [\"no\", \"yes\"]",
                 "nested: builtins:dict (bundle", "    inner: mlp_testkit:DummyModel", "in nested/inner/"):
        assert text in out.stdout
    doc = json.loads(run_cli("inspect", "--json", str(tmp_path / "b")).stdout)
    assert doc["parts"]["nested"]["parts"]["notes"] == {"value": {"v": 3}}


def test_keys_that_are_not_file_names_get_safe_directories(tmp_path: Path, dummy: DummyModel) -> None:
    bundle = {"../evil": DummyModel(), "a/b": DummyModel(), "Model": DummyModel(), "model": DummyModel(),
              "manifest.json": DummyModel(), "": DummyModel()}
    m = save_any(bundle, tmp_path / "b")
    dirs = sorted(p.dir for p in m.parts.values())
    assert dirs == sorted(["part-0", "part-1", "Model", "model_", "part-4", "part-5"])
    assert list(load_any(tmp_path / "b")) == list(bundle)


def test_options_go_to_each_part_by_key(tmp_path: Path, dummy: DummyModel) -> None:
    with pytest.raises(PersistError, match=r"parts=.*not compress="):
        save_any(_bundle(), tmp_path / "b", compress=3)
    with pytest.raises(PersistError, match="must map some of its keys"):
        save_any(_bundle(), tmp_path / "b", parts={"nope": {}})
    with pytest.raises(PersistError, match="plain JSON value"):
        save_any(_bundle(), tmp_path / "b", parts={"labels": {"x": 1}})
    with pytest.raises(PersistError, match="format is 'bundle'"):
        save_any(_bundle(), tmp_path / "b", format="joblib")
    assert not os.path.exists(tmp_path / "b")
    save_any(_bundle(), tmp_path / "b", parts={"model": {"format": "default"}})
    with pytest.raises(PersistError, match="pass load options per part"):
        load_any(tmp_path / "b", device="cpu")


def test_a_part_that_fails_leaves_nothing_behind(tmp_path: Path, dummy: DummyModel) -> None:
    with pytest.raises(UnsupportedModelError, match="bundle part 'bad' \\(ExplodingModel\\)"):
        save_any({"good": DummyModel(), "bad": ExplodingModel()}, tmp_path / "b")
    with pytest.raises(UnsupportedModelError, match=r"no adapter claims builtins\.object"):
        save_any({"good": DummyModel(), "odd": object()}, tmp_path / "b")
    with pytest.raises(PersistError, match="must be strings"):
        save_any({1: DummyModel()}, tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_check_without_a_stored_example_says_how_to_store_one(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(_bundle(), tmp_path / "b")
    with pytest.raises(PersistError, match="saved without example="):
        load_any(tmp_path / "b", check=True)
    with pytest.raises(PersistError, match="tolerance >= 0"):
        load_any(tmp_path / "b", check=-1.0)


def _rewrite(root: Path, edit: Any) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    edit(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["parts"]["model"].update(dir="../model"), "not a relative path"),
    (lambda d: d["parts"]["model"].update(dir="scaler"), "distinct directories"),
    (lambda d: d["parts"]["nested"]["parts"]["inner"].update(dir="inner"), "directly under nested/"),
    (lambda d: d["parts"]["model"].update(dir="elsewhere"), "every file inside one part"),
    (lambda d: d["parts"]["model"].pop("framework"), "an object with adapter"),
    (lambda d: d["parts"]["model"].update(adapter="../x"), "an adapter name"),
    (lambda d: d["parts"]["model"].update(framework="torch"), "name"),
    (lambda d: d["parts"].update(model=[1]), "an object with adapter"),
    (lambda d: d.update(parts=[]), "parts should be a JSON object"),
    (lambda d: d["parts"]["model"].update(info=[]), "info should be a JSON object"),
    (lambda d: d["parts"]["model"].update(example={"inputs": [], "outputs": {"predict": "../x.npy"}}),
     "files listed in the manifest"),
    (lambda d: d["parts"]["model"].update(example={"inputs": [{"kind": "array"}], "outputs": {"p": "x"}}),
     "objects naming their files"),
    (lambda d: d["parts"]["model"].update(example=[]), "inputs"),
])
def test_a_damaged_bundle_manifest_is_refused_before_any_part_loads(tmp_path: Path, dummy: DummyModel, edit: Any,
                                                                    message: str) -> None:
    save_any(_bundle(), tmp_path / "b")
    _rewrite(tmp_path / "b", edit)
    with pytest.raises(CorruptArtifactError, match=message):
        load_any(tmp_path / "b", verify=False)


def test_bundles_nest_only_so_deep(tmp_path: Path, dummy: DummyModel) -> None:
    deep: dict[str, Any] = {"m": DummyModel()}
    for _ in range(16):
        deep = {"d": deep}
    with pytest.raises(PersistError, match="more than 16 deep"):
        save_any(deep, tmp_path / "b")
    save_any(deep["d"], tmp_path / "b")  # 16 levels: the most a reader accepts
    assert load_any(tmp_path / "b")["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["d"]["m"]

    doc = json.loads((tmp_path / "b" / "manifest.json").read_text())
    inner: dict[str, Any] = {}
    for level in range(17, 0, -1):  # 17 bundles inside the top one, no files: deeper than any writer goes
        inner = {"x": {"dir": "/".join(["x"] * level), "adapter": "bundle", "format": "bundle", "info": {},
                       "class": "builtins:dict", "framework": {"name": "mlpersist", "version": "0"}, "parts": inner}}
    doc.update(parts=inner, files={})
    with pytest.raises(CorruptArtifactError, match="nested at most 16 deep"):
        Manifest.from_json(json.dumps(doc).encode())


def test_a_bundle_of_json_values_only_needs_no_framework(tmp_path: Path) -> None:
    save_any({"labels": ["a", "b"], "config": {"lr": 0.1, "layers": [3, 4]}}, tmp_path / "b")
    assert load_any(tmp_path / "b") == {"labels": ["a", "b"], "config": {"lr": 0.1, "layers": [3, 4]}}
    m = inspect(tmp_path / "b")
    assert m.files == {} and Manifest.from_json(m.raw) == m


def test_requirements_pin_the_saving_environment(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(_bundle(), tmp_path / "b")
    out = run_cli("requirements", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if not ln.startswith("#")]
    from importlib.metadata import version

    assert lines == [f"pytest=={version('pytest')}", f"mlpersist>={version('mlpersist')}"]
    assert out.stdout.startswith(f"# requirements of {tmp_path / 'b'}, saved ")


def test_the_recorded_platform_is_platform_platform_without_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`environment.platform` is read from uname and the C library: `platform.platform()` ran `uname -p` (7-8 ms
    of a process's first save here), whose answer it drops on Linux anyway."""
    import platform
    import subprocess

    from mlpersist import _environment

    expected = platform.platform()

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(_environment, "_ENV_CACHE", {})
    if sys.platform.startswith("linux"):
        assert _environment._platform() == expected
    assert _environment.environment([])["platform"] == expected


def test_versions_are_read_from_the_metadata_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """importlib.metadata's `version` parses the whole METADATA (2.4 ms for scikit-learn's): only its headers are
    read; the body (a long description) cannot give a version, and a file without one falls back to the parse."""
    from importlib import metadata

    from mlpersist import _environment

    for dist, headers, body in (("mlp-headed", "Version: 1.2.3", "Version: 6.6.6\n"),
                                ("mlp-spaced", "Summary: x\nversion:  4.5 ", ""),
                                ("mlp-bare", "Summary: no version", "Version: 6.6.6\n")):
        info = tmp_path / f"{dist.replace('-', '_')}-0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\n{headers}\n\n{body}")
    monkeypatch.syspath_prepend(str(tmp_path))
    _environment.version.cache_clear()
    assert _environment.version("mlp-headed") == "1.2.3"
    assert _environment.version("mlp-spaced") == "4.5"
    assert _environment.version("mlp-bare") is None
    assert _environment.version("mlp-not-installed") is None
    for dist in ("pytest", "mlpersist", "blake3"):
        assert _environment.version(dist) == metadata.version(dist)


def test_an_adapter_registered_again_records_its_new_distribution(tmp_path: Path) -> None:
    """The versions an adapter records are looked up once per process, per adapter as it is registered: one
    registered again under its name (`replace=True`) for another distribution records that one's version."""
    from importlib.metadata import version

    register_adapter("dummy", "mlp_testkit:DummyAdapter", claims=("mlp_testkit",), package="ghost-fw")
    save_any(DummyModel(), tmp_path / "a")
    assert "ghost-fw" not in inspect(tmp_path / "a").environment["packages"]  # not installed
    register_adapter("dummy", "mlp_testkit:DummyAdapter", claims=("mlp_testkit",), package="pytest", replace=True)
    save_any(DummyModel(), tmp_path / "b")
    assert inspect(tmp_path / "b").environment["packages"]["pytest"] == version("pytest")
