"""Payload digests (BLAKE3 by default, SHA-256 on request and still read) and how large files are hashed and flushed."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st
from mlp_testkit import DummyModel

from mlpersist import IntegrityError, PersistError, _checked, _copies, _digest, inspect, load_any, save_any, verify

INPUTS = [0.0, 1.5, -2.0]


def test_new_artifacts_record_the_blake3_digest_of_every_file(tmp_path: Path, dummy: DummyModel) -> None:
    m = save_any(dummy, tmp_path / "a")
    for name, entry in m.files.items():
        data = (tmp_path / "a" / name).read_bytes()
        assert entry.digest == "blake3:" + blake3(data).hexdigest() and entry.size == len(data)


def test_sha256_on_request_and_sha256_artifacts_keep_loading(tmp_path: Path, dummy: DummyModel,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPERSIST_DIGEST", "sha256")
    m = save_any(dummy, tmp_path / "a")
    for name, entry in m.files.items():
        assert entry.digest == "sha256:" + hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest()
    monkeypatch.delenv("MLPERSIST_DIGEST")  # a reader that writes BLAKE3 still reads what was written before
    verify(tmp_path / "a")
    assert load_any(tmp_path / "a").predict(INPUTS) == dummy.predict(INPUTS)
    (tmp_path / "a" / "params.json").write_text('{"scale": 9, "shift": 9}')
    with pytest.raises(IntegrityError, match=r"params\.json"):
        load_any(tmp_path / "a")


def test_an_unknown_digest_setting_is_refused_and_nothing_is_left(tmp_path: Path, dummy: DummyModel,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPERSIST_DIGEST", "md5")
    with pytest.raises(PersistError, match=r"MLPERSIST_DIGEST=.md5.*blake3, sha256"):
        save_any(dummy, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_a_large_file_hashes_the_same_mapped_as_read(tmp_path: Path, algo: str) -> None:
    data = os.urandom(max(_digest.MAP_BYTES, 2 * _digest.WINDOW) + 12345)  # three windows, the last partial
    (tmp_path / "big").write_bytes(data)
    expected = f"{algo}:" + (blake3(data) if algo == "blake3" else hashlib.sha256(data)).hexdigest()
    fd = os.open(tmp_path / "big", os.O_RDONLY)
    try:
        assert _digest.hash_fd(fd, len(data), algo) == expected
        # a file shorter than its declared size cannot be mapped: no crash, the bytes there are get read
        # (the size check before any hashing is what refuses it)
        assert _digest.hash_fd(fd, len(data) + 1, algo) == expected
    finally:
        os.close(fd)
    with open(tmp_path / "big", "rb") as f:  # a large file is hashed where it lies unless kept whole
        digest, leased = _checked.hash_file(f, len(data), algo)  # under a read lease (test_leases.py)
        assert digest == expected and isinstance(leased, _checked.Checked) and leased.leased
        assert leased.read() == data and leased.fileno() == f.fileno()
        leased.close()  # releases the lease
    with open(tmp_path / "big", "rb") as f, _checked.no_leases():
        digest, same = _checked.hash_file(f, len(data), algo)
        assert digest == expected and same is f
    with open(tmp_path / "big", "rb") as f:  # shorter than declared, kept whole: hashed as it is, no crash
        assert _checked.hash_file(f, len(data) + 1, algo, whole="memory")[0] == expected
    with open(tmp_path / "big", "rb") as f:
        digest, kept = _checked.hash_file(f, len(data), algo, whole="memory")
        assert digest == expected and isinstance(kept, _checked.Checked) and kept.data[:] == data
        (tmp_path / "big").write_bytes(bytes(len(data)))  # rewritten after the check: the kept bytes stay
        assert kept.read(10) == data[:10] and kept.seek(-5, os.SEEK_END) and kept.read() == data[-5:]
        assert kept.fileno() == f.fileno()
        kept.close()
        assert f.closed


@pytest.mark.parametrize("where", [0, 512, -1], ids=["first", "middle", "last"])
def test_a_changed_byte_of_a_large_payload_is_caught(tmp_path: Path, dummy: DummyModel, where: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_digest, "MAP_BYTES", 512)  # the dummy's 1 KiB extra.bin takes the mapped path
    save_any(dummy, tmp_path / "a")
    extra = tmp_path / "a" / "sub" / "extra.bin"
    data = bytearray(extra.read_bytes())
    data[where % len(data)] ^= 1
    extra.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"sub/extra\.bin"):
        verify(tmp_path / "a")
    assert inspect(tmp_path / "a").files["sub/extra.bin"].digest.startswith("blake3:")


def _write_followed(path: Path, chunk: bytes, count: int, mode: str = "x+b") -> None:
    from mlpersist import _writeback

    with open(path, mode) as f, _writeback.Writeback(f) as flushing:
        for _ in range(count):
            f.write(chunk)
            flushing.written()


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_a_large_file_is_hashed_as_it_is_written_and_the_digest_is_of_its_bytes(
        algo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlpersist import _storage, _writeback

    monkeypatch.setenv("MLPERSIST_DIGEST", algo)
    chunk = os.urandom(3 << 20)  # pieces that do not fall on page boundaries
    count = _writeback.STEP // len(chunk) * 2 + 3  # two whole disk steps and a tail
    with _storage.following() as followed:
        _write_followed(tmp_path / "big", chunk, count)
    data = (tmp_path / "big").read_bytes()
    assert data == chunk * count
    expected = f"{algo}:" + (blake3(data) if algo == "blake3" else hashlib.sha256(data)).hexdigest()
    assert next(iter(followed.values()))[-1] == expected
    assert _storage.digest_of(followed, os.stat(tmp_path / "big"), algo) == expected
    assert _storage.digest_of(followed, os.stat(tmp_path / "big"), "sha256" if algo == "blake3" else "blake3") is None
    with open(tmp_path / "big", "r+b") as f:  # changed after the writer was done, size and mtime kept
        st = os.fstat(f.fileno())
        f.write(b"x")
    os.utime(tmp_path / "big", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(tmp_path / "big").st_size == st.st_size
    assert _storage.digest_of(followed, os.stat(tmp_path / "big"), algo) is None  # the core hashes it again


def test_files_not_followed_to_the_end_are_left_to_the_core(tmp_path: Path) -> None:
    from mlpersist import _storage, _writeback

    chunk = os.urandom(1 << 20)
    with _storage.following() as followed:
        _write_followed(tmp_path / "small", chunk, 3)  # under a piece: no thread, the core hashes it
        _write_followed(tmp_path / "write-only", chunk, 40, mode="xb")  # cannot be read back: only sent early
        with pytest.raises(ZeroDivisionError), open(tmp_path / "failed", "x+b") as f, \
                _writeback.Writeback(f) as flushing:  # a writer that fails half way
            for i in range(40):
                f.write(chunk)
                flushing.written()
                if i == 30:
                    1 / 0  # noqa: B018
    assert followed == {}
    assert (tmp_path / "write-only").read_bytes() == chunk * 40
    assert (tmp_path / "small").read_bytes() == chunk * 3
    assert _writeback.supported() == sys.platform.startswith("linux")


def test_a_small_payload_rewritten_in_place_after_its_check_does_not_change_what_loads(
        tmp_path: Path, dummy: DummyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes hashed are the bytes the adapter reads: a writer racing the load (simulated right after
    the check of params.json, same size, different numbers) changes the file, not the model."""
    from mlpersist import _reading

    save_any(dummy, tmp_path / "a")
    params = tmp_path / "a" / "params.json"
    original = params.read_bytes()
    tampered = original.replace(b"3.0", b"9.0")
    assert tampered != original and len(tampered) == len(original)
    real = _reading.hash_file

    def check_then_rewrite(f: Any, size: int, algo: str | None = None, **kw: Any) -> Any:
        out = real(f, size, algo, **kw)
        if os.fstat(f.fileno()).st_ino == params.stat().st_ino:
            with open(params, "r+b") as w:  # in place: same inode, the handle already open sees it
                w.write(tampered)
        return out

    monkeypatch.setattr(_reading, "hash_file", check_then_rewrite)
    assert load_any(tmp_path / "a").predict(INPUTS) == dummy.predict(INPUTS)
    assert params.read_bytes() == tampered  # the rewrite did happen, after the check
    monkeypatch.undo()
    with pytest.raises(IntegrityError, match=r"params\.json"):
        load_any(tmp_path / "a")


def test_only_small_payloads_are_kept_in_memory(tmp_path: Path, dummy: DummyModel,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mlpersist import _reading
    from mlpersist._payload import Payload
    from mlpersist._policy import TrustPolicy

    save_any(dummy, tmp_path / "a")
    monkeypatch.setattr(_digest, "MAP_BYTES", 512)  # params.json (~30 bytes) stays small, extra.bin (1 KiB) not
    opened = _reading.open_artifact(tmp_path / "a", verify=True)
    try:
        payload = Payload(opened.handles, TrustPolicy())
        assert payload.checked_bytes("params.json") == (tmp_path / "a" / "params.json").read_bytes()
        assert payload.checked_bytes("sub/extra.bin") is None
        assert payload.read_bytes("sub/extra.bin") == bytes(range(256)) * 4
    finally:
        opened.close()


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 70_000), steps=st.lists(st.tuples(st.sampled_from(["read", "read1", "seek", "readinto"]),
                                                            st.integers(-1, 80_000)), max_size=6))
def test_a_kept_payload_reads_as_its_bytes_would(size: int, steps: list[tuple[str, int]]) -> None:
    """The handle on bytes kept in memory reads, seeks and reads to the end (in one copy) as io.BytesIO does."""
    data = bytearray(os.urandom(size))
    checked, reference = _checked.Checked(data, open(os.devnull, "rb")), io.BytesIO(bytes(data))  # noqa: SIM115
    with checked:
        for op, n in [*steps, ("read", -1)]:
            if op == "seek":
                assert checked.seek(max(n, 0)) == reference.seek(max(n, 0))
            elif op == "readinto":
                a, b = bytearray(max(n, 0)), bytearray(max(n, 0))
                assert checked.readinto(a) == reference.readinto(b) and a == b
            else:
                assert getattr(checked, op)(n) == getattr(reference, op)(n)
            assert checked.tell() == reference.tell()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the anonymous copy is Linux's")
@pytest.mark.parametrize("populate", [True, False], ids=["pages-allocated-ahead", "pages-faulted-by-reads"])
def test_an_anonymous_copy_filled_two_windows_at_a_time_hashes_them_in_order(
        tmp_path: Path, populate: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`whole="memory"` copies the file window by window on two threads: the digest must still be of the
    bytes in file order, the copy exact, and a file shorter than declared must not be taken as whole."""
    import mmap

    monkeypatch.setattr(_digest, "MAP_BYTES", 1 << 10)
    monkeypatch.setattr(_copies, "WINDOW", 1024)  # 4 KiB windows: ~50 of them, the last partial
    if not populate:
        monkeypatch.setattr(_copies, "_POPULATE_WRITE", -1)  # madvise refuses it, as an older kernel would
    data = os.urandom(200_000 + 123)
    (tmp_path / "f").write_bytes(data)
    expected = "blake3:" + blake3(data).hexdigest()
    for _ in range(5):  # the threads' interleaving varies from run to run
        with open(tmp_path / "f", "rb") as f:
            digest, kept = _checked.hash_file(f, len(data), "blake3", whole="memory")
            assert digest == expected
            assert isinstance(kept, _checked.Checked) and isinstance(kept.data, mmap.mmap) and kept.data[:] == data
            kept.close()
    with open(tmp_path / "f", "rb") as f:  # declared longer than it is: windows come up short, plain read
        digest, kept = _checked.hash_file(f, len(data) + 50_000, "blake3", whole="memory")
        assert digest == expected and isinstance(kept.data, bytearray)
        kept.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="sealed in-memory files are Linux's")
@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["small", "large"])
def test_a_file_read_by_path_is_a_sealed_copy_of_the_checked_bytes(tmp_path: Path, size: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`whole="file"` (a framework that reads by path), where no read lease is taken (a small file, or the
    load done again after one broke: test_leases.py): the path opens the bytes hashed, not the file; a
    rewrite of the file after the check does not reach it, and nothing can write to the copy."""
    monkeypatch.setattr(_digest, "MAP_BYTES", 1 << 20)  # 3 MiB takes the large path: the copy made in the kernel
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    f = open(tmp_path / "f", "rb")  # noqa: SIM115 - the Checked handle owns it
    with _checked.no_leases():
        digest, checked = _checked.hash_file(f, size, "blake3", whole="file")
    try:
        assert digest == "blake3:" + blake3(data).hexdigest()
        assert isinstance(checked, _checked.Checked)
        with open(tmp_path / "f", "r+b") as w:  # in place, after the check: same inode
            w.write(bytes(size))
        path = checked.path()
        assert path is not None and path.startswith("/proc/self/fd/")
        with open(path, "rb") as copy:
            assert copy.read() == data
        assert checked.read() == data
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(PermissionError):  # sealed: F_SEAL_WRITE
                os.pwrite(fd, b"x", 0)
            with pytest.raises(PermissionError):  # F_SEAL_SHRINK
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    finally:
        checked.close()


def test_a_file_read_by_path_shorter_than_declared_is_hashed_as_it_is(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_digest, "MAP_BYTES", 1 << 10)
    (tmp_path / "f").write_bytes(b"a" * 4000)
    with open(tmp_path / "f", "rb") as f:
        digest, checked = _checked.hash_file(f, 8000, "blake3", whole="file")
        assert digest == "blake3:" + blake3(b"a" * 4000).hexdigest()  # not the declared size: a mismatch
        checked.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="sealed in-memory files are Linux's")
def test_without_in_memory_files_a_file_read_by_path_falls_back_to_the_checked_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """memfd_create refused (a sandbox, no memory): the bytes are still checked and served from memory,
    and the path falls back to the file that was checked."""
    import errno

    from mlpersist._payload import Payload
    from mlpersist._policy import TrustPolicy

    def refuse(*args: Any) -> int:
        raise OSError(errno.ENOMEM, "refused")

    monkeypatch.setattr(os, "memfd_create", refuse)
    monkeypatch.setattr(_digest, "MAP_BYTES", 1 << 10)
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    for size in (5000, 100):  # the large path (copy made in the kernel), then a small one (copy on first use)
        f = open(tmp_path / "f", "rb")  # noqa: SIM115 - the Checked handle owns it
        with _checked.no_leases():  # no read lease (test_leases.py)
            digest, checked = _checked.hash_file(f, size, "blake3", whole="file")
        assert digest == "blake3:" + blake3(data[:size]).hexdigest()
        assert isinstance(checked, _checked.Checked) and bytes(checked.data) == data[:size]
        assert checked.path() is None
        path = Payload({"f": checked}, TrustPolicy()).local_path("f")
        assert os.path.samefile(path, tmp_path / "f")
        checked.close()
