"""URLs in the core: what happens without fsspec, and the memory:// store when fsspec is there (no server)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from mlp_testkit import DummyModel

from mlpersist import ArtifactExistsError, MissingFrameworkError, PersistError, inspect, load_any, save_any, verify
from mlpersist._convert import convert

HAS_FSSPEC = importlib.util.find_spec("fsspec") is not None
HAS_S3FS = importlib.util.find_spec("s3fs") is not None


@pytest.mark.skipif(HAS_FSSPEC and HAS_S3FS, reason="fsspec and s3fs are both installed here")
def test_an_s3_url_without_its_packages_names_the_pip_install_line(tmp_path: Path, dummy: DummyModel) -> None:
    for call in (lambda: save_any(dummy, "s3://bucket/model"), lambda: load_any("s3://bucket/model"),
                 lambda: inspect("s3://bucket/model")):
        with pytest.raises(MissingFrameworkError, match=r"pip install 'mlpersist\[s3\]'"):
            call()


def test_storage_options_on_a_local_path_are_refused(tmp_path: Path, dummy: DummyModel) -> None:
    with pytest.raises(PersistError, match="storage_options= applies to URLs"):
        save_any(dummy, tmp_path / "m", storage_options={"key": "k"})
    assert not (tmp_path / "m").exists()


def test_convert_reads_its_source_from_a_local_path_only(tmp_path: Path) -> None:
    with pytest.raises(PersistError, match="convert's source takes a local path"):
        convert("s3://bucket/model.joblib", tmp_path / "m")


def test_a_file_url_is_a_local_artifact(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(dummy, f"file://{tmp_path / 'm'}")
    assert (tmp_path / "m" / "manifest.json").is_file()
    assert load_any(f"file://{tmp_path / 'm'}").predict([1.0]) == dummy.predict([1.0])


@pytest.mark.skipif(not HAS_FSSPEC, reason="fsspec is not installed here")
def test_a_memory_url_round_trips_with_the_manifest_last(tmp_path: Path, dummy: DummyModel,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    monkeypatch.setenv("MLPERSIST_CACHE_DIR", str(tmp_path / "cache"))
    url = f"memory://core-tests/{tmp_path.name}/m"
    manifest = save_any(dummy, url)
    fs = fsspec.filesystem("memory")
    root = f"/core-tests/{tmp_path.name}/m"
    assert sorted(fs.find(root)) == sorted([f"{root}/manifest.json"] + [
        f"{root}/blobs/{e.digest.replace(':', '/')}" for e in manifest.files.values()])
    assert inspect(url) == manifest
    verify(url)
    assert load_any(url).predict([2.0]) == dummy.predict([2.0])
    with pytest.raises(ArtifactExistsError):
        save_any(DummyModel(1.0, 0.0), url)
    save_any(DummyModel(1.0, 0.0), url, overwrite=True)
    assert load_any(url).predict([2.0]) == [2.0]
    fs.rm(root, recursive=True)
