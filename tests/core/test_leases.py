"""A large file a framework reads by path is read where it lies under a read lease, or loaded again from a copy."""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from blake3 import blake3
from mlp_testkit import run_python, write_refused, write_when_let_in

from mlpersist import (
    CorruptArtifactError,
    IntegrityError,
    _checked,
    _copies,
    _digest,
    load_any,
    register_adapter,
    save_any,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="read leases and memfds are Linux's")


class Blob:
    """A framework-free model whose one file a framework would read by path."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class ByPathAdapter:
    """Saves a Blob as `blob.bin`, named in `read_by_path`; its load reads the path `local_path` gives."""

    name: ClassVar[str] = "bypath"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ()
    read_by_path: ClassVar[tuple[str, ...]] = ("blob.bin",)
    hooks: ClassVar[list[Callable[[Path], None]]] = []  # each load calls the next one with its path, then reads
    seen: ClassVar[list[tuple[str, bytes]]] = []  # per load: where the path led, and what it read

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]:
        (dest / "blob.bin").write_bytes(model.data)
        return {}

    def load(self, payload: Any, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        path = payload.local_path("blob.bin")
        if self.hooks:
            self.hooks.pop(0)(path)
        data = path.read_bytes()
        self.seen.append((os.readlink(path), data))
        return Blob(data)


class StreamAdapter(ByPathAdapter):
    """The same artifact read through the checked handle (as a pickle or an XGBoost model is), not by path."""

    read_by_path: ClassVar[tuple[str, ...]] = ()
    streams: ClassVar[list[tuple[bool, bytes]]] = []  # per load: read under a lease, and what it read

    def load(self, payload: Any, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        f = payload.open("blob.bin")
        if self.hooks:
            self.hooks.pop(0)(Path(f"/proc/self/fd/{f.fileno()}"))
        data = f.read()
        self.streams.append((isinstance(f, _checked.Checked) and f.leased, data))
        return Blob(data)


@pytest.fixture
def streamed(saved: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    """The artifact of `saved`, loaded through StreamAdapter."""
    register_adapter("bypath", f"{__name__}:StreamAdapter", claims=(__name__,), package="pytest", replace=True)
    monkeypatch.setattr(StreamAdapter, "streams", [])
    return saved


@pytest.fixture
def saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    """An artifact of a 3 MiB Blob, with files over 1 MiB taken as large (as 16 MiB are normally)."""
    register_adapter("bypath", f"{__name__}:ByPathAdapter", claims=(__name__,), package="pytest")
    monkeypatch.setattr(_digest, "MAP_BYTES", 1 << 20)
    monkeypatch.setattr(ByPathAdapter, "hooks", [])
    monkeypatch.setattr(ByPathAdapter, "seen", [])
    data = os.urandom(3 << 20)
    save_any(Blob(data), tmp_path / "a")
    return tmp_path / "a" / "blob.bin", data


def test_a_large_file_read_by_path_is_hashed_and_read_where_it_lies_under_a_read_lease(
        saved: tuple[Path, bytes]) -> None:
    """No copy: the path opens the very inode that was hashed. A writer in another process is refused
    while the lease is held (a blocking one would wait), its request breaks the lease, which `unchanged`
    then reports; once the handle is closed it can write."""
    target, data = saved
    f = open(target, "rb")  # noqa: SIM115 - the Checked handle owns it
    digest, checked = _checked.hash_file(f, len(data), "blake3", whole="file")
    try:
        assert digest == "blake3:" + blake3(data).hexdigest()
        assert isinstance(checked, _checked.Checked) and checked.leased and checked.data is None
        path = checked.path()
        assert path is not None and os.path.samefile(path, target)
        assert checked.read() == data
        _checked.unchanged([checked])  # nobody asked to write: no error
        probe = (f"import os\ntry:\n    os.open({str(target)!r}, os.O_WRONLY | os.O_NONBLOCK)\n"
                 "except BlockingIOError:\n    print('refused')")
        assert run_python(probe).stdout.strip() == "refused"
        with pytest.raises(_checked.LeaseBroken, match=r"blob\.bin"):
            _checked.unchanged([checked])
    finally:
        checked.close()
    assert not write_refused(target)


def test_a_file_open_for_writing_gets_no_lease_and_is_copied_sealed(saved: tuple[Path, bytes]) -> None:
    """A writer already holds the file: the lease is refused, so its bytes are copied into a sealed
    in-memory file as they are hashed, and what that writer writes next does not reach the copy."""
    target, data = saved
    with open(target, "r+b") as writer:
        f = open(target, "rb")  # noqa: SIM115 - the Checked handle owns it
        digest, checked = _checked.hash_file(f, len(data), "blake3", whole="file")
        try:
            assert digest == "blake3:" + blake3(data).hexdigest() and not checked.leased
            writer.write(bytes(len(data)))
            writer.flush()
            path = checked.path()
            assert path is not None and os.readlink(path).startswith("/memfd:")
            assert Path(path).read_bytes() == data
        finally:
            checked.close()


def test_a_broken_lease_makes_the_load_start_again_from_a_sealed_copy(saved: tuple[Path, bytes]) -> None:
    """Someone asks to write while the framework reads the file in place: that model is dropped and the
    load done again from a copy of the file, which still matches (the writer wrote nothing)."""
    target, data = saved
    ByPathAdapter.hooks.append(lambda path: None if write_refused(target) else pytest.fail("no lease was held"))
    assert load_any(target.parent).data == data
    (first, read_first), (second, read_second) = ByPathAdapter.seen
    assert first == str(target.resolve()) and read_first == data  # the file itself, under the lease
    assert second.startswith("/memfd:") and read_second == data  # then a sealed copy
    assert not write_refused(target)  # nothing keeps a lease once the load is over


def test_a_load_that_fails_after_its_lease_broke_is_done_again_from_a_copy(saved: tuple[Path, bytes]) -> None:
    """Past the lease's break time a writer gets in, and what it wrote may be why the framework failed:
    the failure is not reported as the artifact's, the load is done again from a copy."""
    target, data = saved

    def break_then_fail(path: Path) -> None:
        assert write_refused(target)
        raise CorruptArtifactError("the framework could not read what it found")

    ByPathAdapter.hooks.append(break_then_fail)
    assert load_any(target.parent).data == data
    ((second, _),) = ByPathAdapter.seen  # the first load failed before reading
    assert second.startswith("/memfd:")


def test_a_failed_load_with_its_lease_held_fails_as_it_is(saved: tuple[Path, bytes]) -> None:
    target, _ = saved

    def fail(path: Path) -> None:
        raise CorruptArtifactError("the framework could not read what it found")

    ByPathAdapter.hooks.append(fail)
    with pytest.raises(CorruptArtifactError, match="could not read"):
        load_any(target.parent)
    assert not write_refused(target)


def test_a_load_without_writers_reads_in_place_once(saved: tuple[Path, bytes]) -> None:
    target, data = saved
    assert load_any(target.parent).data == data
    assert ByPathAdapter.seen == [(str(target.resolve()), data)]


def test_a_writer_let_through_after_the_first_read_makes_the_load_fail_its_digest(
        saved: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer waits for the lease, so the framework's read is whole and untouched; once the first
    load lets go, it writes. The load done again finds a file that no longer matches its digest."""
    target, data = saved
    writer: list[threading.Event] = []

    def start_writer(path: Path) -> None:
        assert write_refused(target)  # breaks the lease, so that the load is done again whenever the writer gets in
        writer.append(write_when_let_in(target, b"X" * 100))  # gets in once the first load lets go

    real = _copies.named_copy

    def copy_once_written(*args: Any) -> Any:
        assert writer[0].wait(60)
        return real(*args)

    ByPathAdapter.hooks.append(start_writer)
    monkeypatch.setattr(_copies, "named_copy", copy_once_written)
    with pytest.raises(IntegrityError, match=r"blob\.bin"):
        load_any(target.parent)
    assert ByPathAdapter.seen == [(str(target.resolve()), data)]  # what the framework read was whole and unchanged
    assert target.read_bytes()[:100] == b"X" * 100


def test_a_lease_refused_by_the_kernel_falls_back_to_the_copy(saved: tuple[Path, bytes],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem or a sandbox without leases (EINVAL), or a file owned by someone else (EACCES)."""
    import fcntl

    target, data = saved
    real = fcntl.fcntl

    def refuse_leases(fd: int, cmd: int, arg: int = 0) -> Any:
        if cmd == fcntl.F_SETLEASE:
            raise OSError(errno.EINVAL, "leases are disabled")
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refuse_leases)
    assert load_any(target.parent).data == data
    ((where, _),) = ByPathAdapter.seen
    assert where.startswith("/memfd:")


def test_any_large_file_is_read_where_it_lies_under_a_lease(streamed: tuple[Path, bytes]) -> None:
    """Not only files read by path: one read through its handle is guarded the same way."""
    target, data = streamed
    assert load_any(target.parent).data == data
    assert StreamAdapter.streams == [(True, data)]
    assert not write_refused(target)


def test_a_file_read_through_its_handle_whose_lease_broke_is_read_again(streamed: tuple[Path, bytes]) -> None:
    target, data = streamed
    ByPathAdapter.hooks.append(lambda path: None if write_refused(target) else pytest.fail("no lease was held"))
    assert load_any(target.parent).data == data
    assert StreamAdapter.streams == [(True, data), (False, data)]  # again, without a lease


def test_a_writer_waits_for_a_read_through_the_handle_then_fails_the_load_done_again(
        streamed: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the lease the writer's bytes would have reached the framework's read (the file is read where
    it lies); with it, the read is whole and untouched, and the load done again sees a changed file."""
    target, data = streamed
    writer: list[threading.Event] = []

    def start_writer(path: Path) -> None:
        assert write_refused(target)
        writer.append(write_when_let_in(target, b"X" * 100))

    real, calls = _checked.hash_fd, []

    def hash_once_written(*args: Any) -> Any:
        calls.append(args)
        if len(calls) > 1:  # the load done again hashes the file once the writer is through
            assert writer[0].wait(60)
        return real(*args)

    ByPathAdapter.hooks.append(start_writer)
    monkeypatch.setattr(_checked, "hash_fd", hash_once_written)
    with pytest.raises(IntegrityError, match=r"blob\.bin"):
        load_any(target.parent)
    assert StreamAdapter.streams == [(True, data)]
    assert target.read_bytes()[:100] == b"X" * 100
