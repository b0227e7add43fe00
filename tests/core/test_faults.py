"""Crash-safety under the faults real teams meet: SIGKILL mid-save, full disks, I/O errors, racing writers.

The short versions run in every session; `nox -s faults` runs the long ones (`-m slow`) with
MLPERSIST_FAULT_TRIALS trials (default 200) across every installed framework.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlp_testkit import ROOT, DummyModel

from mlpersist import StorageError, _storage, load_any, save_any, verify

WRITER = """
import sys, json, mlpersist, fault_models as fm
kind, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
models = fm.make(kind)
open(out, "w").write(json.dumps([fm.outputs(kind, m) for m in models]))
mlpersist.save_any(models[0], path, overwrite=True, metadata={"which": 0})
print("ready", flush=True)
i = 1
while True:
    mlpersist.save_any(models[i % 2], path, overwrite=True, metadata={"which": i % 2})
    i += 1
"""

CHECK = """
import sys, json, mlpersist, fault_models as fm
kind, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
fm.make(kind)  # registers the dummy adapter in this process too
mlpersist.verify(path)
which = mlpersist.inspect(path).metadata["which"]
got = fm.outputs(kind, mlpersist.load_any(path))
assert got == json.load(open(out))[which], "loaded model is neither the old nor the new one"
print(which)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT / 'tests' / 'adapters'}",
            "TF_CPP_MIN_LOG_LEVEL": "3"}


def kill_trials(kind: str, trials: int, tmp: Path) -> dict[str, int]:
    """Kill a looping overwriter at random instants; after each kill the path must hold one whole model."""
    rng = random.Random(f"{kind}-{trials}")
    seen = {"0": 0, "1": 0}
    for t in range(trials):
        path, out = tmp / f"{kind}-{t % 3}", tmp / f"{kind}-outputs.json"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path), str(out)], env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready", writer.stderr
        time.sleep(rng.uniform(0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        writer.stderr.close()
        check = subprocess.run([sys.executable, "-c", CHECK, kind, str(path), str(out)], env=_env(),
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0, f"trial {t} ({kind}): {check.stderr[-2000:]}"
        seen[check.stdout.strip()] += 1
    return seen


def test_a_writer_killed_mid_overwrite_leaves_a_whole_old_or_new_artifact(tmp_path: Path) -> None:
    seen = kill_trials("dummy", 6, tmp_path)
    assert sum(seen.values()) == 6


@pytest.mark.slow
def test_many_kills_across_every_installed_framework(tmp_path: Path) -> None:
    import fault_models

    kinds = fault_models.available()
    total = int(os.environ.get("MLPERSIST_FAULT_TRIALS", "200"))
    report = {}
    for i, kind in enumerate(kinds):
        n = total // len(kinds) + (1 if i < total % len(kinds) else 0)
        report[kind] = kill_trials(kind, n, tmp_path)
    print(f"\nSIGKILL trials (kind: loaded old/new): {report}; total {sum(sum(v.values()) for v in report.values())}")
    assert sum(sum(v.values()) for v in report.values()) == total


SEAM = ("fsync", "rename", "write", "exchange")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("step", range(12))
def test_an_io_error_at_any_step_of_an_overwrite_keeps_the_old_artifact_and_no_litter(
        step: int, err: int, tmp_path: Path, dummy: DummyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    save_any(dummy, tmp_path / "a")
    calls: list[str] = []

    def faulty(name: str, real: Any) -> Any:
        def op(*args: Any) -> Any:
            calls.append(name)
            if len(calls) == step + 1:
                raise OSError(err, os.strerror(err))
            return real(*args)
        return op

    for name in ("fsync", "rename", "write"):
        monkeypatch.setattr(_storage, name, faulty(name, getattr(_storage, name)))
    monkeypatch.setattr(_storage, "_renameat2", faulty("exchange", _storage._renameat2))
    try:
        save_any(DummyModel(7, 7), tmp_path / "a", overwrite=True)
        failed = False
    except StorageError as exc:  # a PersistError, and the OSError it reports (errno kept)
        assert exc.errno == err and isinstance(exc, OSError)
        failed, message = True, str(exc)
    monkeypatch.undo()
    verify(tmp_path / "a")
    result = load_any(tmp_path / "a").predict([1])
    committed = "exchange" in calls[:step]  # the fault came after the swap: the new artifact is in place
    if failed:  # the message says which artifact the path holds
        assert ("the new artifact is in place" if committed else "nothing was replaced") in message, message
    assert result == ([14] if not failed or committed else dummy.predict([1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporaries left behind
    assert failed or step >= len(calls)  # every step up to the last one was faulted by some case


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first file", "second file", "both"])
def test_an_fsync_error_on_the_second_thread_fails_the_save_and_keeps_the_old_artifact(
        which: int, tmp_path: Path, dummy: DummyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large files are flushed on a second thread while the next is hashed: its error is the save's."""
    save_any(dummy, tmp_path / "a")
    monkeypatch.setattr(_storage, "_OVERLAP_BYTES", 0)  # every file flushed on the thread
    real, threads, on_thread = _storage.fsync, set(), []

    def fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():  # a file's flush
            threads.add(threading.current_thread().name)
            on_thread.append(fd)
            if which == 2 or len(on_thread) == which + 1:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(_storage, "fsync", fsync)
    with pytest.raises(StorageError) as info:
        save_any(DummyModel(7, 7), tmp_path / "a", overwrite=True)
    monkeypatch.undo()
    assert info.value.errno == errno.EIO and "nothing was replaced" in str(info.value)
    assert len(on_thread) == 2  # both files were flushed on the thread; the error surfaced after the walk
    assert threads and all(name.startswith("mlpersist-fsync") for name in threads)
    verify(tmp_path / "a")
    assert load_any(tmp_path / "a").predict([1]) == dummy.predict([1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


READER = """
import sys, time, mlpersist, mlp_testkit
mlp_testkit.register_dummy()
path, seconds = sys.argv[1], float(sys.argv[2])
end, reads = time.monotonic() + seconds, 0
while time.monotonic() < end:
    m = mlpersist.load_any(path)
    assert m.scale == m.shift, "a mix of two saves"
    reads += 1
print(reads)
"""

WRITE_LOOP = """
import sys, time, mlpersist, mlp_testkit
mlp_testkit.register_dummy()
path, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    mlpersist.save_any(mlp_testkit.DummyModel(seed * 1000 + i, seed * 1000 + i), path, overwrite=True)
    i += 1
print(i)
"""


def race(tmp: Path, writers: int, readers: int, seconds: float) -> tuple[int, int]:
    save_any(DummyModel(0, 0), tmp / "a")
    procs = [subprocess.Popen([sys.executable, "-c", WRITE_LOOP, str(tmp / "a"), str(seconds), str(w)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(writers)]
    procs += [subprocess.Popen([sys.executable, "-c", READER, str(tmp / "a"), str(seconds)], env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(readers)]
    results = [p.communicate(timeout=seconds + 120) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    writes = sum(int(out) for out, _ in results[:writers])
    reads = sum(int(out) for out, _ in results[writers:])
    verify(tmp / "a")
    assert [p.name for p in tmp.iterdir()] == ["a"]
    return writes, reads


def test_writers_and_readers_racing_on_one_path(tmp_path: Path, dummy: DummyModel) -> None:
    writes, reads = race(tmp_path, 2, 2, 3.0)
    assert writes > 0 and reads > 0


@pytest.mark.slow
def test_writers_and_readers_racing_for_a_minute(tmp_path: Path, dummy: DummyModel) -> None:
    writes, reads = race(tmp_path, 3, 3, float(os.environ.get("MLPERSIST_RACE_SECONDS", "60")))
    print(f"\nrace: {writes} overwrites, {reads} reads checked, 0 failures")
