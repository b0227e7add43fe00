"""joblib's file format, written by the C pickler (the sklearn adapter's): what `joblib.dump` writes, 3-4x faster.

`joblib.dump` walks the model with pickle's pure-Python pickler, so that each numpy array can be
written as a `NumpyArrayWrapper` object followed by the array's raw bytes. For a forest of 100 trees
that walk is most of the save: 12-13 ms, where the C pickler takes 1-2 ms for the same objects.

`dump` writes the same format with the C pickler. Each array is reduced to the wrapper joblib would
write (`reducer_override`), its state ending in one extra key, a marker object, which the pickler
writes as a persistent id: 8 bytes no other object writes (5 of them random per save). Once pickled,
the stream is taken apart at the markers (their count must be exactly the arrays', or the save goes to
`joblib.dump`), each marker is dropped and each array's bytes written after its wrapper, after the
padding byte and the padding joblib writes. `joblib.load` and mlpersist's reader read the file as one
`joblib.dump` wrote; what differs is only how it is spelled: a frame from one array to the next, where
joblib cuts frames at 64 KiB too (both end a frame at each wrapper), and the wrapper made by NEWOBJ_EX
(empty keyword arguments) rather than NEWOBJ.

As joblib does, an array met twice is written twice (joblib does not memoize arrays): the second time
as a wrapper spelled without the pickle memo, so that no memo index moves. What joblib writes in ways
this does not (a `numpy.matrix`, protocols below 4, compression) goes to `joblib.dump`, as does a model
holding a bytes, bytearray or str of 64 KiB or more (`_unframed`), such as the booster of an XGBoost step
in a pipeline. An array of a model loaded with `mmap_mode` (a `numpy.memmap`) is written as a plain one:
joblib reads it back as one either way.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from joblib.numpy_pickle import NUMPY_ARRAY_ALIGNMENT_BYTES, NumpyArrayWrapper

from mlpersist._writeback import Writeback

_LONG1_8 = b"\x8a\x08"  # LONG1 with 8 bytes: how the pickler writes a marker's persistent id, before BINPERSID
_BUFFER = 16 << 20  # an array that is not contiguous is written through this much at a time, as joblib does


class _Fallback(Exception):
    """Something joblib writes its own way: the save goes to `joblib.dump`."""


class _Marker:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def dump(model: Any, path: Path, *, compress: Any = 0, protocol: int | None = None) -> None:
    """Write `model` to `path` (a new file) as `joblib.dump(model, path, compress=..., protocol=...)` would."""
    proto = pickle.DEFAULT_PROTOCOL if protocol is None else protocol
    try:
        if compress or proto < 4:  # joblib's compressed streams; NEWOBJ_EX, which writes the wrapper, is protocol 4's
            raise _Fallback
        pickled = _pickled(model, proto)
    except _Fallback:
        joblib.dump(model, path, compress=compress, protocol=protocol)
        return
    with open(path, "x+b") as f, Writeback(f) as following:  # hashed and sent to the disk as it is written
        _write(f, following, pickled, proto)


def _pickled(model: Any, proto: int) -> tuple[memoryview, list[tuple[np.ndarray, bool]], list[int]]:
    """The pickle of `model`, unframed, with a marker after each array's wrapper; the arrays; where the markers are.

    Each array comes with whether it was met before. Raises `_Fallback` for what joblib writes its own way,
    and for a stream whose markers are not exactly where the arrays put them.
    """
    magic = (int.from_bytes(os.urandom(5), "little") | 1 << 38) & ((1 << 39) - 1)  # high bit clear: 8 bytes in all
    buf = io.BytesIO()
    pickler = _Pickler(buf, proto, magic << 24)  # the low 3 bytes count the arrays
    pickler.dump(model)
    arrays = pickler.arrays
    raw = _unframed(buf.getbuffer())
    if len(arrays) >= 1 << 24:
        raise _Fallback
    tag = magic.to_bytes(5, "little") + b"Q"  # a marker's high bytes, then BINPERSID
    cuts: list[int] = []
    at = 0
    for index, (_, again) in enumerate(arrays):
        hit = raw.find(tag, at)
        # the model's own bytes could hold the tag (about 2**-40 per byte): then joblib writes it
        if (hit < 5 or raw[hit - 5:hit - 3] != _LONG1_8 or int.from_bytes(raw[hit - 3:hit], "little") != index
                or (not again and raw[hit + 6:hit + 9] != b"Nub")):
            raise _Fallback
        cuts.append(hit - 5)
        at = hit + 6
    if raw.find(tag, at) != -1:
        raise _Fallback
    return memoryview(raw), arrays, cuts


_NEWOBJ_EX = copyreg.__newobj_ex__  # type: ignore[attr-defined]
_NO_KWARGS: dict[str, Any] = {}  # one object, memoized once: each later wrapper names it in 2 bytes (BINGET)


class _Pickler(pickle.Pickler):
    """The C pickler, each array reduced to joblib's wrapper, whose state ends with a marker."""

    def __init__(self, file: io.BytesIO, proto: int, high: int) -> None:
        super().__init__(file, protocol=proto)
        self.high = high
        self.arrays: list[tuple[np.ndarray, bool]] = []  # each array, and whether it was met before
        self.met: set[int] = set()  # ids of the arrays written (each held in `arrays` until the end)

    def persistent_id(self, obj: Any) -> int | None:  # asked before the memo: an array met again is written again
        kind = type(obj)
        if kind is _Marker:
            return self.high | int(obj.index)
        if kind is np.ndarray and id(obj) in self.met:
            self.arrays.append((obj, True))
            return self.high | (len(self.arrays) - 1)
        return None

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is np.ndarray or kind is np.memmap:  # a memmap (from mmap_mode) as joblib reads it back: plain
            self.met.add(id(obj))
            self.arrays.append((obj, False))
            state: dict[Any, Any] = {**_wrapper_state(obj), _Marker(len(self.arrays) - 1): None}
            return _NEWOBJ_EX, (NumpyArrayWrapper, (), _NO_KWARGS), state
        if kind is np.matrix:  # joblib wraps it as its subclass
            raise _Fallback
        return NotImplemented


def _fortran(array: np.ndarray) -> bool:
    """Whether joblib writes `array` in Fortran order (only when it is not in C order too)."""
    return bool(array.flags.f_contiguous and not array.flags.c_contiguous)


def _wrapper_state(array: np.ndarray) -> dict[str, Any]:
    """What joblib's `NumpyPickler._create_array_wrapper` records for an uncompressed file, in its order."""
    return {"subclass": np.ndarray, "shape": array.shape, "order": "F" if _fortran(array) else "C",
            "dtype": array.dtype, "allow_mmap": not array.dtype.hasobject,
            "numpy_array_alignment_bytes": NUMPY_ARRAY_ALIGNMENT_BYTES}


def _unframed(data: memoryview) -> bytes:
    """The pickle in `data` without its FRAME headers (protocol 4+ frames are read-ahead hints, optional).

    CPython's pickler frames everything after PROTO, in frames of 64 KiB and more, except a last piece
    under 4 bytes (too small to be framed) and a bytes, bytearray or str of 64 KiB or more, which it
    writes unframed between two frames. Where that was done (the unframed piece would be cut there as
    frames, or kept with the frame headers after it inside), the save goes to `joblib.dump`.
    """
    parts = [data[:2]]  # PROTO n
    at, end = 2, len(data)
    while at < end and data[at] == pickle.FRAME[0]:
        (size,) = struct.unpack_from("<Q", data, at + 1)
        parts.append(data[at + 9:at + 9 + size])
        at += 9 + size
    if end - at >= 4 or at > end:  # not the last small piece: an unframed payload
        raise _Fallback
    parts.append(data[at:])
    return b"".join(parts)


def _write(f: Any, following: Writeback, pickled: tuple[memoryview, list[tuple[np.ndarray, bool]], list[int]],
           proto: int) -> None:
    """The pickle cut at each marker; each array's wrapper, then its bytes, where its marker was.

    Each piece up to a wrapper is one frame, ending at the wrapper, as joblib frames it: a reader that
    reads a frame whole is then at the array's bytes when it builds the wrapper (mlpersist's trusted load
    reads so, with the C unpickler).
    """
    stream, arrays, cuts = pickled
    f.write(stream[:2])  # PROTO, before the first frame
    at = 2
    for (array, again), cut in zip(arrays, cuts, strict=True):
        if again:  # the persistent id (11 bytes) replaced by a whole wrapper, spelled without the memo
            _frame(f, stream[at:cut], _memoless(NumpyArrayWrapper(**_wrapper_state(array)), proto))
            at = cut + 11
        else:  # the marker key (11 bytes) and its None value dropped: SETITEMS and BUILD of the wrapper's state
            _frame(f, stream[at:cut], b"ub")
            at = cut + 14
        _write_array(f, following, array)
    _frame(f, stream[at:], b"")


def _frame(f: Any, *pieces: bytes | memoryview) -> None:
    """`pieces` as one pickle frame (FRAME and its length first), or as they are if under 4 bytes (as pickle does)."""
    size = sum(len(p) for p in pieces)
    if size >= 4:
        f.write(pickle.FRAME + struct.pack("<Q", size))
    for piece in pieces:
        f.write(piece)


def _memoless(wrapper: NumpyArrayWrapper, proto: int) -> bytes:
    """The opcodes that build `wrapper`, using and adding no memo entry (no PROTO, FRAME or STOP)."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=proto)
    pickler.fast = True  # no memo: these opcodes go in the middle of another pickle
    pickler.dump(wrapper)
    data = buf.getvalue()
    start = 2 + (9 if data[2] == pickle.FRAME[0] else 0)
    return data[start:-1]


def _write_array(f: Any, following: Writeback, array: np.ndarray) -> None:
    """The bytes joblib's `NumpyArrayWrapper.write_array` writes after the wrapper."""
    if array.dtype.hasobject:
        f.write(pickle.dumps(array, protocol=5))
        return
    pad = NUMPY_ARRAY_ALIGNMENT_BYTES - (f.tell() + 1) % NUMPY_ARRAY_ALIGNMENT_BYTES
    f.write(bytes([pad]) + b"\xff" * pad)
    if _fortran(array):
        array = array.T  # its C order is the F order joblib writes
    if not array.size or not array.dtype.itemsize:
        return
    if array.flags.c_contiguous:
        following.write(array.reshape(-1).view(np.uint8))  # a view: no copy
        return
    for chunk in np.nditer(array, flags=["external_loop", "buffered", "zerosize_ok"],  # neither C nor F order
                           buffersize=max(_BUFFER // array.itemsize, 1), order="C"):
        following.write(np.asarray(chunk).tobytes("C"))
