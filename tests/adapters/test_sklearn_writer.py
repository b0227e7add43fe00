"""The sklearn adapter's joblib writer: the file `joblib.dump` writes, read back the same by joblib and by load_any."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlp_testkit import require
from test_sklearn import _array_zoo, data

from mlpersist import UntrustedContentError, _safepickle, load_any, save_any

np = require("numpy")
joblib = require("joblib")
_joblib_write = require("mlpersist.adapters._joblib_write")


def _same_arrays(got: Any, want: Any, where: str = "") -> None:
    """Arrays equal in dtype, shape, layout and every byte a field holds (a record's padding is not a field)."""
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _same_arrays(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same_arrays(g, w, f"{where}[{i}]")
    elif isinstance(want, np.ndarray):
        assert (got.dtype, got.shape, got.flags.f_contiguous, got.flags.c_contiguous) == (
            want.dtype, want.shape, want.flags.f_contiguous, want.flags.c_contiguous), where
        if want.dtype.hasobject:  # their bytes are pointers: their objects compared
            _same_arrays(list(got.ravel()), list(want.ravel()), where)
        elif want.dtype.names:
            for name in want.dtype.names:
                assert got[name].tobytes() == want[name].tobytes(), f"{where}.{name}"
        else:
            assert got.tobytes() == want.tobytes(), where
    else:
        assert got == want, where


def _zoo() -> dict[str, Any]:
    """The reader's array zoo, and what joblib writes its own way: an array met twice, arrays inside objects."""
    zoo = _array_zoo()
    shared = np.arange(5.0)
    zoo.update({"shared": shared, "shared_again": [shared, {"inner": shared}], "dates": np.arange(3).astype("M8[D]"),
                "nested_objects": np.array([np.arange(3), None], dtype=object), "text": "not an array",
                "tiny_ints": np.arange(3, dtype=np.uint8)})
    return zoo


@pytest.mark.parametrize("protocol", [None, 4, 5])
def test_the_file_reads_back_as_the_one_joblib_dump_writes(protocol: int | None, tmp_path: Path) -> None:
    """Every layout, dtype and byte order, through joblib.load, the checked reader and the trusted one."""
    zoo = _zoo()
    joblib.dump(zoo, tmp_path / "joblib.joblib", protocol=protocol)
    _joblib_write.dump(zoo, tmp_path / "ours.joblib", protocol=protocol)
    expected = joblib.load(tmp_path / "joblib.joblib")
    _same_arrays(joblib.load(tmp_path / "ours.joblib"), expected)
    _same_arrays(load_any(tmp_path / "ours.joblib", trusted=True), expected)
    _same_arrays(load_any(tmp_path / "ours.joblib"), expected)


@pytest.mark.parametrize("compress", [0, 3])
@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_a_trusted_load_reads_joblib_dumps_file_of_any_protocol(protocol: int, compress: int, tmp_path: Path) -> None:
    """The trusted load's C unpickler finds each array where joblib's reader does: an unframed pickle (0-3) is
    read an opcode at a time, a framed one (4, 5) a frame at a time, and joblib ends a frame at each wrapper."""
    zoo = _zoo()
    joblib.dump(zoo, tmp_path / "m.joblib", protocol=protocol, compress=compress)
    _same_arrays(load_any(tmp_path / "m.joblib", trusted=True), joblib.load(tmp_path / "m.joblib"))


def test_each_array_ends_a_frame_as_joblib_frames_it(tmp_path: Path) -> None:
    """The writer frames its pickle from one array to the next, each frame ending at the wrapper's BUILD, then the
    array's padding and bytes: a reader that takes a frame whole (the trusted load) is then at the array."""
    first, second = np.arange(6.0), np.arange(3, dtype=np.int32)
    _joblib_write.dump({"a": first, "b": second, "name": "after the arrays"}, tmp_path / "ours.joblib")
    raw = (tmp_path / "ours.joblib").read_bytes()
    at = 2  # after PROTO
    for array in (first, second, None):
        assert raw[at] == pickle.FRAME[0]
        (size,) = struct.unpack_from("<Q", raw, at + 1)
        at += 9 + size
        if array is None:
            assert at == len(raw) and raw[-1] == pickle.STOP[0]
            break
        assert raw[at - 1] == pickle.BUILD[0]
        at += 1 + raw[at]  # the padding's length, then the padding
        assert raw[at:at + array.nbytes] == array.tobytes()
        at += array.nbytes


@pytest.mark.parametrize("names", [10, 100_000], ids=["a short frame", "a frame over 1 MiB"])
def test_a_trusted_load_reads_the_frame_after_an_array_whatever_its_length(names: int, tmp_path: Path) -> None:
    """After an array, the trusted load gives the unpickler the frame that follows with the opcodes that put the
    array in, in one read; a frame over `_MERGED` it leaves the unpickler to read itself. Both as joblib reads them."""
    from mlpersist import _safejoblib

    model = {"a": np.arange(6.0), "names": [f"feature {i}" for i in range(names)], "b": np.arange(3, dtype=np.int32)}
    _joblib_write.dump(model, tmp_path / "ours.joblib")
    raw = (tmp_path / "ours.joblib").read_bytes()
    after = raw.index(model["a"].tobytes()) + model["a"].nbytes  # the frame after the first array
    assert raw[after] == pickle.FRAME[0]
    assert (struct.unpack_from("<Q", raw, after + 1)[0] > _safejoblib._MERGED) == (names > 10)
    _same_arrays(load_any(tmp_path / "ours.joblib", trusted=True), joblib.load(tmp_path / "ours.joblib"))


def test_a_trusted_load_reads_a_pre_0_10_wrapper_from_its_side_file_as_joblib_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """joblib <= 0.9 kept each array in a side file, named by an NDArrayWrapper (the checked load refuses it):
    trusted, it is read by joblib's own code, from where joblib.load reads it given the file's bare name."""
    from joblib.numpy_pickle_compat import NDArrayWrapper

    monkeypatch.chdir(tmp_path)
    array = np.arange(5.0)
    np.save(tmp_path / "old.joblib_01.npy", array)
    (tmp_path / "old.joblib").write_bytes(pickle.dumps(
        {"w": NDArrayWrapper("old.joblib_01.npy", np.ndarray, allow_mmap=False), "after": [1, 2]}, protocol=2))
    with pytest.warns(DeprecationWarning, match="less than 0.10"):
        expected = joblib.load("old.joblib")
    assert expected["w"].tolist() == array.tolist()
    _same_arrays(load_any("old.joblib", trusted=True), expected)
    with pytest.raises(_safepickle.UntrustedContentError):
        load_any("old.joblib")


def test_an_array_met_twice_is_written_twice_as_joblib_writes_it(tmp_path: Path) -> None:
    """joblib does not memoize arrays: each place that held the same array gets its own copy back."""
    shared = np.arange(4.0)
    model = {"a": shared, "b": [shared, shared], "c": {"d": shared}}
    joblib.dump(model, tmp_path / "joblib.joblib")
    _joblib_write.dump(model, tmp_path / "ours.joblib")
    for path in ("joblib.joblib", "ours.joblib"):
        loaded = joblib.load(tmp_path / path)
        copies = [loaded["a"], *loaded["b"], loaded["c"]["d"]]
        assert len({id(c) for c in copies}) == 4, path
        assert all(c.tolist() == shared.tolist() for c in copies), path


def test_a_fitted_pipeline_saved_by_save_any_predicts_the_same_through_plain_joblib(tmp_path: Path) -> None:
    """The payload is joblib's format: a colleague without mlpersist reads it with joblib.load."""
    ensemble, pipeline, preprocessing = (require("sklearn.ensemble"), require("sklearn.pipeline"),
                                         require("sklearn.preprocessing"))
    x, y = data(300, 8)
    model = pipeline.make_pipeline(preprocessing.StandardScaler(),
                                   ensemble.RandomForestClassifier(n_estimators=12, random_state=0)).fit(x, y)
    save_any(model, tmp_path / "art")
    plain = joblib.load(tmp_path / "art" / "model.joblib")
    np.testing.assert_array_equal(plain.predict_proba(x), model.predict_proba(x))
    np.testing.assert_array_equal(load_any(tmp_path / "art").predict_proba(x), model.predict_proba(x))
    with open(tmp_path / "art" / "model.joblib", "rb") as f:
        names = {name for name, _ in _safepickle.audit(f, what="model.joblib")}
    joblib.dump(model, tmp_path / "joblib.joblib")
    with open(tmp_path / "joblib.joblib", "rb") as f:
        assert names == {name for name, _ in _safepickle.audit(f, what="joblib.joblib")}  # the same globals, no more


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("case", ["matrix", "protocol-2", "protocol-3"])
def test_what_joblib_writes_its_own_way_is_written_by_joblib(case: str, tmp_path: Path) -> None:
    """A matrix (joblib wraps its subclass), or protocols 2 and 3: joblib.dump's very bytes."""
    grid = np.arange(6.0).reshape(2, 3)
    protocol = int(case[-1]) if case.startswith("protocol") else None
    model = {"grid": np.asmatrix(grid) if case == "matrix" else grid, "plain": grid}
    joblib.dump(model, tmp_path / "joblib.joblib", protocol=protocol)
    _joblib_write.dump(model, tmp_path / "ours.joblib", protocol=protocol)
    assert (tmp_path / "ours.joblib").read_bytes() == (tmp_path / "joblib.joblib").read_bytes()


def test_a_model_loaded_with_mmap_mode_is_saved_and_loaded_as_joblib_reads_it_back(tmp_path: Path) -> None:
    """`joblib.load(..., mmap_mode="r")` gives a model of numpy.memmap arrays. joblib writes each such array's
    class (numpy.memmap) in its wrapper and reads it back as a plain array; a checked load refused that name
    (it opens files when called) as a malformed header, so such a model saved by save_any never loaded. Now
    the writer writes them as the plain arrays they load as, and a checked load reads the name in a wrapper,
    in a file joblib wrote, as the mark it is."""
    sklearn_linear = require("sklearn.linear_model")
    x, y = data()
    model = sklearn_linear.LogisticRegression().fit(x, y)
    model.extra_ = np.arange(20_000.0)  # joblib maps only arrays that fill pages; the fitted ones may not
    joblib.dump(model, tmp_path / "dumped.joblib")
    mapped = joblib.load(tmp_path / "dumped.joblib", mmap_mode="r")
    assert isinstance(mapped.extra_, np.memmap)  # the premise
    save_any(mapped, tmp_path / "m")
    assert b"memmap" not in (tmp_path / "m" / "model.joblib").read_bytes()
    joblib.dump(mapped, tmp_path / "m.joblib")  # joblib's own file of it names numpy.memmap in wrappers
    assert b"memmap" in (tmp_path / "m.joblib").read_bytes()
    for loaded in (load_any(tmp_path / "m"), load_any(tmp_path / "m.joblib")):
        assert type(loaded.extra_) is np.ndarray and loaded.extra_.tolist() == model.extra_.tolist()
        assert (loaded.predict(x) == model.predict(x)).all()


def test_a_joblib_file_calling_numpy_memmap_is_refused(tmp_path: Path) -> None:
    """The mark a checked joblib read gets for numpy.memmap is no callable: a file that calls it is refused, by
    name, as the class itself was (the file it names is never opened)."""
    class _Opens:
        def __reduce__(self) -> Any:
            return np.memmap, (str(tmp_path / "secret.bin"),)

    (tmp_path / "secret.bin").write_bytes(bytes(64))
    joblib.dump({"data": _Opens()}, tmp_path / "m.joblib")
    with pytest.raises(UntrustedContentError, match=r"No allow= admits numpy\.memmap") as refused:
        load_any(tmp_path / "m.joblib")
    assert refused.value.names == ("numpy.memmap",)


@pytest.mark.parametrize("kind", [bytes, bytearray, str])
def test_a_model_holding_64_kib_of_bytes_or_text_in_one_object_is_written_by_joblib(kind: type,
                                                                                  tmp_path: Path) -> None:
    """The pickler writes such an object outside its frames, where the writer cannot take them apart: joblib.dump.

    (An XGBoost step in a pipeline holds its booster so.) Cut as frames, the arrays after it did not load.
    """
    blob = kind("x" * (1 << 16)) if kind is str else kind(b"x" * (1 << 16))
    model = {"before": np.arange(5.0), "blob": blob, "after": np.arange(3)}
    joblib.dump(model, tmp_path / "joblib.joblib")
    _joblib_write.dump(model, tmp_path / "ours.joblib")
    assert (tmp_path / "ours.joblib").read_bytes() == (tmp_path / "joblib.joblib").read_bytes()
    _same_arrays(joblib.load(tmp_path / "ours.joblib"), model)
    model["blob"] = blob[:(1 << 16) - 1]  # one byte less: framed, and the writer's own file
    _joblib_write.dump(model, tmp_path / "small.joblib")
    joblib.dump(model, tmp_path / "joblib-small.joblib")
    assert (tmp_path / "small.joblib").read_bytes() != (tmp_path / "joblib-small.joblib").read_bytes()
    _same_arrays(joblib.load(tmp_path / "small.joblib"), model)


def test_a_model_whose_bytes_hold_a_marker_is_written_by_joblib(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The 8 bytes that mark where an array goes, found in the model's own data, send the save to joblib.dump.

    With the random bytes of the marker fixed, the model holds exactly what the writer would cut at for its
    first array: cut there, the file would not load.
    """
    monkeypatch.setattr(os, "urandom", lambda n: b"\x11" * n)
    magic = (int.from_bytes(b"\x11" * 5, "little") | 1 << 38) & ((1 << 39) - 1)
    fake = b"\x8a\x08\x00\x00\x00" + magic.to_bytes(5, "little") + b"QNub"
    model = {"blob": b"x" + fake + b"y", "weights": np.arange(8.0)}
    joblib.dump(model, tmp_path / "joblib.joblib")
    _joblib_write.dump(model, tmp_path / "ours.joblib")
    assert (tmp_path / "ours.joblib").read_bytes() == (tmp_path / "joblib.joblib").read_bytes()
    _same_arrays(joblib.load(tmp_path / "ours.joblib"), model)
    del model["blob"]  # without it the writer's own file is written, not joblib's
    _joblib_write.dump(model, tmp_path / "own.joblib")
    joblib.dump(model, tmp_path / "joblib2.joblib")
    assert (tmp_path / "own.joblib").read_bytes() != (tmp_path / "joblib2.joblib").read_bytes()
    _same_arrays(joblib.load(tmp_path / "own.joblib"), model)


def _arrays() -> Any:
    """Arrays of numpy's kinds and byte orders, in C order, Fortran order, or a strided view of either."""
    hnp = require("hypothesis.extra.numpy")
    dtypes = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                       hnp.complex_number_dtypes(), hnp.boolean_dtypes(), hnp.byte_string_dtypes(max_len=4),
                       hnp.unicode_string_dtypes(max_len=3), hnp.datetime64_dtypes())
    base = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))

    def laid_out(array: Any, layout: str) -> Any:
        if layout == "fortran":
            return np.asfortranarray(array)
        if layout == "strided" and array.ndim:
            return array[::2]
        return array

    return st.builds(laid_out, base, st.sampled_from(["c", "fortran", "strided"]))


def _models() -> Any:
    """Nested dicts, lists and tuples of arrays and plain values; an array may sit in several places."""
    leaves = st.one_of(_arrays(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.binary(max_size=8),
                       st.none())
    tree = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                                                        st.dictionaries(st.text(max_size=3), inner, max_size=4)),
                        max_leaves=12)
    return st.tuples(tree, st.lists(st.integers(0, 11), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=_models())
def test_any_nesting_of_arrays_reads_back_as_joblib_dumps_file_does(drawn: Any, tmp_path: Path) -> None:
    """Whatever arrays and containers a model holds, joblib.load gives from this file what it gives from joblib's."""
    model, again = drawn
    arrays: list[Any] = []

    def collect(value: Any) -> None:
        if isinstance(value, np.ndarray):
            arrays.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    collect(model)
    model = [model, *(arrays[i % len(arrays)] for i in again if arrays)]  # the same arrays, met again
    joblib.dump(model, tmp_path / "joblib.joblib")
    _joblib_write.dump(model, tmp_path / "ours.joblib")
    try:
        expected = joblib.load(tmp_path / "joblib.joblib")
        _same_arrays(joblib.load(tmp_path / "ours.joblib"), expected)
        _same_arrays(load_any(tmp_path / "ours.joblib", trusted=True), expected)
        _same_arrays(load_any(tmp_path / "joblib.joblib", trusted=True), expected)
    finally:
        for name in ("joblib.joblib", "ours.joblib"):
            (tmp_path / name).unlink()
