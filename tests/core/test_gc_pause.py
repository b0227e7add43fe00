"""Readers that build thousands of objects pause the garbage collector, and always restore it as it was."""

from __future__ import annotations

import gc
import io
import pickle
import threading
from collections.abc import Callable

import pytest
from mlp_testkit import collections_started

from mlpersist import CorruptArtifactError, _gc, _safepickle, _ubjson
from mlpersist._policy import TrustPolicy


@pytest.fixture
def collections() -> Callable[[Callable[[], object]], int]:
    """Count the collections that start during a call, with one due at every new container.

    A reader's own few allocations before its pause, and the first ones after it (which collect, as they
    should), add a handful whatever the size of what is read; a reader without the pause, thousands.
    """
    return collections_started


def _ubjson_doc(n: int) -> bytes:
    entry = b"{" + b"U\x01aU\x01" + b"U\x01bSU\x02hi" + b"}"
    return b"[" + entry * n + b"]"


def test_a_ubjson_parse_triggers_no_collection(collections: Callable[[Callable[[], object]], int]) -> None:
    raw = _ubjson_doc(2000)
    assert collections(lambda: [{"a": 1, "b": "hi"} for _ in range(2000)]) > 300  # the count works
    assert _ubjson.loads(raw, "doc") == [{"a": 1, "b": "hi"}] * 2000  # and its imports are done
    assert collections(lambda: _ubjson.loads(raw, "doc")) < 20


def test_an_unpickle_triggers_no_collection(collections: Callable[[Callable[[], object]], int]) -> None:
    doc = [{"a": i, "b": [i, str(i)]} for i in range(2000)]
    raw = pickle.dumps(doc, protocol=4)
    # the count works, on the pure-Python unpickler the guarded one is built on (3.13's C one triggers none)
    assert collections(lambda: pickle._loads(raw)) > 300  # type: ignore[attr-defined]
    load = lambda: _safepickle.load(io.BytesIO(raw), TrustPolicy(), what="doc", joblib_format=False)  # noqa: E731
    assert load() == doc  # and its imports are done
    assert collections(load) < 20


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_restored_as_it_was_even_after_a_failed_read(enabled: bool) -> None:
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        _ubjson.loads(_ubjson_doc(10), "doc")
        assert gc.isenabled() is enabled
        with pytest.raises(CorruptArtifactError):
            _ubjson.loads(_ubjson_doc(10)[:-1], "doc")  # truncated
        assert gc.isenabled() is enabled
        with pytest.raises(CorruptArtifactError):
            _safepickle.load(io.BytesIO(b"\x80\x04]\x94(K\x01"), TrustPolicy(), what="doc", joblib_format=False)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_overlapping_pauses_on_two_threads_end_with_the_collector_on() -> None:
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _gc.paused():
            inside.set()
            release.wait(10)

    other = threading.Thread(target=hold)
    other.start()
    inside.wait(10)
    with _gc.paused():  # starts while the other thread's pause holds, ends before it
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread is still reading
    release.set()
    other.join(10)
    assert gc.isenabled()
