"""The artifact on disk: atomic saves, integrity before deserialisation, typed errors for every bad input."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from mlp_testkit import DummyModel, ExplodingModel

from mlpersist import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    CorruptArtifactError,
    IntegrityError,
    PersistError,
    StorageError,
    UnsupportedModelError,
    VersionMismatchError,
    VersionMismatchWarning,
    _storage,
    inspect,
    load_any,
    save_any,
    verify,
)


def litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mlpersist-" in p.name)


def test_round_trip_keeps_predictions_and_writes_a_complete_manifest(tmp_path: Path, dummy: DummyModel) -> None:
    m = save_any(dummy, tmp_path / "a", metadata={"owner": "team", "auc": 0.91})
    loaded = load_any(tmp_path / "a")
    assert loaded.predict([0.0, 1.5, -2.0]) == dummy.predict([0.0, 1.5, -2.0])
    assert m.adapter == "dummy" and m.model_class == "mlp_testkit:DummyModel"
    assert set(m.files) == {"params.json", "sub/extra.bin"}
    assert m.metadata == {"owner": "team", "auc": 0.91} and m.info["kind"] == "DummyModel"
    assert m.environment["python"] and m.created_at.endswith("Z")
    assert inspect(tmp_path / "a") == m
    assert litter(tmp_path) == []


def test_a_parent_directory_is_created(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(dummy, tmp_path / "team" / "churn" / "v3")
    verify(tmp_path / "team" / "churn" / "v3")


def test_a_file_where_a_parent_directory_must_be_is_a_storage_error(tmp_path: Path, dummy: DummyModel) -> None:
    (tmp_path / "team").write_text("notes")
    with pytest.raises(StorageError, match=r"cannot save to .*team/churn: .*team: File exists; choose a path") as info:
        save_any(dummy, tmp_path / "team" / "churn")
    assert isinstance(info.value, OSError) and info.value.errno == errno.EEXIST  # an OSError too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team"] and (tmp_path / "team").read_text() == "notes"


UNREADABLE = """
import os, sys, mlp_testkit, mlpersist
mlp_testkit.register_dummy()
base = sys.argv[1]
mlpersist.load_any(base + "/readable"), mlpersist.verify(base + "/readable")  # every import made while allowed
if os.geteuid() == 0:
    os.setuid(65534)  # root reads any file: as nobody, the mode bits apply
for case, call in (("payload", lambda: mlpersist.load_any(base + "/payload")),
                   ("verify", lambda: mlpersist.verify(base + "/payload")),
                   ("directory", lambda: mlpersist.inspect(base + "/directory")),
                   ("bare", lambda: mlpersist.load_any(base + "/bare.pkl"))):
    try:
        call()
        print(case, "READ")
    except OSError as exc:
        print(case, type(exc).__name__, isinstance(exc, mlpersist.PersistError), exc.errno, exc)
"""


def test_a_file_this_user_may_not_read_is_a_storage_error(tmp_path: Path, dummy: DummyModel) -> None:
    """A payload, an artifact directory or a bare file the user may not read: a StorageError (a PersistError, and
    still the PermissionError's OSError with its errno) that names it, not a raw PermissionError."""
    import shutil
    import tempfile

    from mlp_testkit import run_python

    base = Path(tempfile.mkdtemp(prefix="mlpersist-unreadable-"))  # not under tmp_path: nobody may pass through it
    try:
        base.chmod(0o755)
        for name in ("readable", "payload", "directory"):
            save_any(dummy, base / name)
        (base / "payload" / "params.json").chmod(0)
        (base / "directory").chmod(0)
        (base / "bare.pkl").write_bytes(b"\x80\x04N.")
        (base / "bare.pkl").chmod(0)
        out = run_python(UNREADABLE.replace("base = sys.argv[1]", f"base = {str(base)!r}")).stdout
    finally:
        for p in (base / "payload" / "params.json", base / "directory", base / "bare.pkl"):
            p.chmod(0o755)
        shutil.rmtree(base)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert set(lines) == {"payload", "verify", "directory", "bare"}, out
    for case, named in (("payload", "payload: params.json"), ("verify", "payload: params.json"),
                        ("directory", "directory"), ("bare", "bare.pkl")):
        assert lines[case].startswith(f"StorageError True {errno.EACCES} cannot read "), (case, lines[case])
        assert named in lines[case] and "Permission denied; check that this user may read it" in lines[case], case


def test_an_existing_artifact_is_kept_without_overwrite(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(dummy, tmp_path / "a")
    before = (tmp_path / "a" / "manifest.json").read_bytes()
    with pytest.raises(ArtifactExistsError, match="overwrite=True"):
        save_any(DummyModel(9, 9), tmp_path / "a")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == before
    assert litter(tmp_path) == []


def test_overwrite_replaces_the_artifact_whole(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(dummy, tmp_path / "a")
    save_any(DummyModel(9, 9), tmp_path / "a", overwrite=True)
    assert load_any(tmp_path / "a").predict([1]) == [18]
    assert litter(tmp_path) == []


def test_overwrite_never_replaces_something_that_is_not_an_artifact(tmp_path: Path, dummy: DummyModel) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("x")
    for target in ("home", "file"):
        with pytest.raises(ArtifactExistsError, match="not an mlpersist artifact"):
            save_any(dummy, tmp_path / target, overwrite=True)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"


def test_an_empty_directory_receives_the_artifact(tmp_path: Path, dummy: DummyModel) -> None:
    (tmp_path / "a").mkdir()
    save_any(dummy, tmp_path / "a")
    verify(tmp_path / "a")


def test_a_failure_inside_the_framework_leaves_nothing(tmp_path: Path, dummy: DummyModel) -> None:
    with pytest.raises(UnsupportedModelError, match="the framework failed while writing"):
        save_any(ExplodingModel(), tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_overwriting_keeps_the_old_artifact(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(dummy, tmp_path / "a")
    with pytest.raises(UnsupportedModelError):
        save_any(ExplodingModel(), tmp_path / "a", overwrite=True)
    assert load_any(tmp_path / "a").predict([1]) == dummy.predict([1])
    assert litter(tmp_path) == []


def test_metadata_that_is_not_json_is_refused_before_writing(tmp_path: Path, dummy: DummyModel) -> None:
    for bad in ({"t": (1, 2)}, {1: "x"}, {"f": float("nan")}, {"o": object()}):
        with pytest.raises(PersistError, match="metadata"):
            save_any(dummy, tmp_path / "a", metadata=bad)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_without_an_atomic_exchange_still_replaces(tmp_path: Path, dummy: DummyModel,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_storage, "_renameat2", lambda *a: False)
    save_any(dummy, tmp_path / "a")
    save_any(DummyModel(9, 9), tmp_path / "a", overwrite=True)
    assert load_any(tmp_path / "a").predict([1]) == [18]
    assert litter(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_cleaned_but_live_ones_kept(tmp_path: Path,
                                                                           dummy: DummyModel) -> None:
    host = _storage._host()
    dead = tmp_path / f".a.mlpersist-tmp-{host}-999999999-abc"
    live = tmp_path / f".a.mlpersist-tmp-{host}-{os.getpid()}-def"
    dead_old = tmp_path / f".a.mlpersist-old-{host}-999999999-abc"  # a dead overwrite's previous artifact
    other_host = tmp_path / ".a.mlpersist-tmp-otherhost-999999999-abc"
    other_target = tmp_path / f".b.mlpersist-tmp-{host}-999999999-abc"
    for d in (dead, live, dead_old, other_host, other_target):
        d.mkdir()
    save_any(dummy, tmp_path / "a")
    assert not dead.exists() and not dead_old.exists()
    assert live.exists() and other_host.exists() and other_target.exists()


def test_readers_racing_an_overwriting_writer_always_see_a_whole_artifact(tmp_path: Path,
                                                                           dummy: DummyModel) -> None:
    save_any(DummyModel(0, 0), tmp_path / "a")
    stop, errors, reads = threading.Event(), [], [0]

    def writer() -> None:
        for i in range(1, 60):
            save_any(DummyModel(i, i), tmp_path / "a", overwrite=True)
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            try:
                m = load_any(tmp_path / "a")
                assert m.scale == m.shift  # a mix of two saves would break this
                reads[0] += 1
            except Exception as exc:  # collected: the assertion below reports them
                errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and reads[0] > 0
    assert litter(tmp_path) == []


# --- integrity: checked before the adapter sees anything ------------------------------------------------

@pytest.fixture
def art(tmp_path: Path, dummy: DummyModel) -> Path:
    save_any(dummy, tmp_path / "a")
    return tmp_path / "a"


def flip_middle_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", [
    flip_middle_byte,
    lambda p: p.write_bytes(p.read_bytes()[:-1]),
    lambda p: p.write_bytes(p.read_bytes() + b"\0"),
    lambda p: p.write_bytes(bytes(reversed(p.read_bytes()))),
], ids=["flip", "truncate", "append", "same-size-other-content"])
def test_a_changed_payload_is_an_integrity_error_naming_the_file(art: Path, tamper: Any) -> None:
    tamper(art / "sub" / "extra.bin")
    with pytest.raises(IntegrityError, match=r"sub/extra.bin") as info:
        load_any(art)
    assert info.value.path == "sub/extra.bin"
    with pytest.raises(IntegrityError):
        verify(art)


def test_a_changed_payload_of_the_same_size_loads_with_verify_off(art: Path) -> None:
    flip_middle_byte(art / "params.json")
    with pytest.raises(IntegrityError):
        load_any(art)
    with pytest.raises(ValueError):  # the dummy's own JSON parse fails: the check was really skipped
        load_any(art, verify=False)


def test_a_missing_payload_file_is_an_integrity_error(art: Path) -> None:
    (art / "params.json").unlink()
    with pytest.raises(IntegrityError, match=r"params.json.*no such file"):
        load_any(art)


def test_an_unlisted_file_fails_verification_and_is_never_opened(art: Path) -> None:
    (art / "evil.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(IntegrityError, match=r"evil.pkl"):
        verify(art)


def test_a_missing_manifest_is_artifact_not_found(art: Path) -> None:
    (art / "manifest.json").unlink()
    with pytest.raises(ArtifactNotFoundError, match=r"no manifest\.json, nor a model directory an adapter "
                                                    r"recognises .*pass the artifact's directory"):
        load_any(art)


def test_a_missing_path_is_artifact_not_found(tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFoundError, match="does not exist"):
        load_any(tmp_path / "nope")
    with pytest.raises(ArtifactNotFoundError):
        inspect(tmp_path / "nope")


def test_an_unrecognised_bare_file_is_artifact_not_found(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactNotFoundError, match="no adapter recognises"):
        load_any(tmp_path / "notes.txt")


def test_a_symlinked_payload_is_refused(art: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("id_rsa")
    (art / "params.json").unlink()
    (art / "params.json").symlink_to(secret)
    with pytest.raises(CorruptArtifactError, match="symlink"):
        load_any(art)


def test_a_symlinked_directory_inside_is_refused(art: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (art / "sub").rename(elsewhere)
    (art / "sub").symlink_to(elsewhere)
    with pytest.raises(CorruptArtifactError, match="symlink"):
        load_any(art)


def test_a_symlinked_manifest_is_refused(art: Path, tmp_path: Path) -> None:
    (art / "manifest.json").rename(tmp_path / "m.json")
    (art / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(CorruptArtifactError, match="symlink"):
        load_any(art)


def test_a_fifo_payload_is_refused_without_hanging(art: Path) -> None:
    (art / "params.json").unlink()
    os.mkfifo(art / "params.json")
    with pytest.raises(CorruptArtifactError, match="not a regular file"):
        load_any(art)


def test_a_hard_linked_payload_is_refused(art: Path, tmp_path: Path) -> None:
    os.link(art / "params.json", tmp_path / "outside")
    with pytest.raises(CorruptArtifactError, match="hard-linked"):
        load_any(art)


def edit_manifest(art: Path, **changes: Any) -> None:
    d = json.loads((art / "manifest.json").read_text())
    d.update(changes)
    (art / "manifest.json").write_text(json.dumps(d))


def test_a_manifest_naming_a_path_outside_is_refused_before_opening(art: Path) -> None:
    d = json.loads((art / "manifest.json").read_text())
    d["files"]["../outside"] = d["files"].pop("params.json")
    (art / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CorruptArtifactError, match="not a relative path inside"):
        load_any(art)


def test_a_huge_declared_size_is_refused(art: Path) -> None:
    d = json.loads((art / "manifest.json").read_text())
    d["files"]["params.json"]["size"] = 10**15
    (art / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(IntegrityError, match=r"params.json"):
        load_any(art)


def test_a_manifest_from_an_unregistered_adapter_is_refused(art: Path) -> None:
    edit_manifest(art, adapter="evil")
    with pytest.raises(CorruptArtifactError, match=r"'evil'.*not registered"):
        load_any(art)


def test_a_newer_adapter_payload_version_says_to_upgrade(art: Path) -> None:
    edit_manifest(art, info={"adapter_format_version": 99})
    with pytest.raises(CorruptArtifactError, match="upgrade mlpersist"):
        load_any(art)


def test_a_different_framework_version_warns_and_strict_refuses(art: Path) -> None:
    edit_manifest(art, framework={"name": "pytest", "version": "0.0.1"})
    with pytest.warns(VersionMismatchWarning, match=r"saved with pytest 0\.0\.1 and is loaded with"):
        load_any(art)
    with pytest.raises(VersionMismatchError, match=r"pip install 'pytest==0\.0\.1'"):
        load_any(art, strict=True)

