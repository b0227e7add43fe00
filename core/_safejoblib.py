"""joblib files through the guarded unpickler: its compressed streams and its arrays written after their headers."""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
from typing import Any, BinaryIO

from ._safepickle import Guard, PlainUnpickler, State, _Refused, guarded_dispatch
from .errors import CorruptArtifactError, MissingFrameworkError, PersistError

# A compressed stream may hold this many times the file's size (and 1 MiB whatever its size): more than zlib and
# gzip (deflate) can give at all (1,028 times, zeros at level 9), so no file they wrote is refused; bz2 and lzma
# inflate far more.
MAX_INFLATION = 1100
_FLOOR = 1 << 20


def decompressed(fileobj: BinaryIO, what: str, *, bounded: bool = True) -> tuple[BinaryIO, int | None]:
    """`fileobj` itself, or a reader of its decompressed stream (joblib's compressed formats); and its limit.

    `bounded`: a decompressed stream may not inflate past `MAX_INFLATION` times the file's size (or
    1 MiB); the limit is returned (None for an uncompressed file) and reading past it is refused. zlib
    and gzip inflate at most about 1,030 times, but bz2 and lzma much more: 400 MB of zeros is a 1 KB
    bz2 stream. A trusted load is not bounded.

    Raises:
        mlpersist.errors.CorruptArtifactError: joblib's pre-0.10 format, whose side files are never opened.
        mlpersist.errors.MissingFrameworkError: LZ4-compressed, and the lz4 package is not installed.

    """
    from joblib.numpy_pickle_utils import _COMPRESSORS, _ZFILE_PREFIX, _buffered_read_file, _detect_compressor

    kind = _detect_compressor(fileobj)
    if kind == "compat":
        raise CorruptArtifactError(f"{what} uses joblib's pre-0.10 format, whose side files mlpersist never "
                                   f"opens (prefix {_ZFILE_PREFIX!r}); re-save it with a current joblib")
    if kind not in _COMPRESSORS:
        return fileobj, None
    try:
        reader = _COMPRESSORS[kind].decompressor_file(fileobj)
    except ValueError:  # joblib's LZ4 wrapper, where the lz4 package is missing (or older than joblib needs)
        raise MissingFrameworkError(f"{what} is compressed with {kind}, which joblib reads only with the {kind} "
                                    f"package: pip install {kind}") from None
    if not bounded:
        return _buffered_read_file(reader), None
    size = _size_of(fileobj)
    limit = max(MAX_INFLATION * size, _FLOOR)
    return _buffered_read_file(_Bounded(reader, limit, f"{what}: its {kind} stream inflates past {limit} bytes, the "
                                                       f"most a compressed file of {size} bytes may give here "
                                                       f"({MAX_INFLATION} times its size, or 1 MiB): a decompression "
                                                       "bomb, refused. If you trust its author, load it with "
                                                       "trusted=True; a model is shared safely saved with compress=3 "
                                                       "(zlib) or uncompressed")), limit


_FAR_INFLATING = ("bz2", "lzma", "xz")  # deflate (zlib, gzip) gives at most 1,028 times, lz4 about 255 times


def check_inflation(path: str | os.PathLike[str], what: str) -> None:
    """Refuse, as a save, a compressed joblib file that a checked load would refuse as a decompression bomb.

    Only bz2, lzma and xz can inflate past `MAX_INFLATION`: their stream is read through once, through the
    very limit a load puts on it (a model that is mostly one value, say a sparse model's zeros, can).

    Raises:
        mlpersist.errors.PersistError: saying what to save instead.

    """
    from joblib.numpy_pickle_utils import _detect_compressor

    with open(path, "rb") as f:
        kind = _detect_compressor(f)
        if kind not in _FAR_INFLATING:
            return
        stream, limit = decompressed(f, what)
        try:
            while stream.read(1 << 20):
                pass
        except CorruptArtifactError:
            raise PersistError(f"{what}: the model compresses more than {MAX_INFLATION} times with {kind} (its "
                               f"{_size_of(f)} bytes inflate past {limit}), which load_any refuses from a file "
                               "it is not told to trust, as it would a decompression bomb; save it with compress=3 "
                               "(zlib, which never inflates that far) or uncompressed") from None


def _size_of(fileobj: BinaryIO) -> int:
    try:
        return os.fstat(fileobj.fileno()).st_size
    except (OSError, AttributeError, io.UnsupportedOperation):  # in memory
        at = fileobj.tell()
        size = fileobj.seek(0, io.SEEK_END)
        fileobj.seek(at)
        return size


class _Bounded(io.RawIOBase):
    """A decompressor's stream that raises `CorruptArtifactError(message)` once it would give more than `limit` bytes.

    `tell()` is the bytes given so far (the read position of the buffered reader over it, less its buffer).
    """

    def __init__(self, reader: io.BufferedIOBase, limit: int, message: str) -> None:
        self._reader, self._limit, self._message, self._given = reader, limit, message, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as view:  # at most one byte past the limit: enough to know it is passed
            n: int = self._reader.readinto(view[:self._limit - self._given + 1])
        self._given += n
        if self._given > self._limit:
            raise CorruptArtifactError(self._message)
        return n

    def tell(self) -> int:
        return self._given


class _Memmapped(_Refused):
    """What `numpy.memmap` stands for in a checked joblib read: the mark of an array memory-mapped when saved.

    joblib writes each array's class in its wrapper, and an array of a model loaded with `mmap_mode` is a
    `numpy.memmap`, which joblib reads back as a plain array. The class opens files when called and stays
    on the deny-floor, so a checked joblib read gets this stand-in for it: a wrapper's mark, read as a
    plain array (`_read_wrapped`); called, it is refused by name, as the class itself would be.
    """

    __slots__ = ("state",)

    def __init__(self, state: State) -> None:
        super().__init__(MEMMAP)
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Refused:
        self.state.refused.append(MEMMAP)
        self.state.floor.add(MEMMAP)
        return self


MEMMAP = "numpy.memmap"
_JOBLIB_CLASS: type | None = None


def unpickler_class() -> type:
    """The guarded subclass of joblib's reader, built once (joblib is imported only when needed)."""
    global _JOBLIB_CLASS
    if _JOBLIB_CLASS is None:
        from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler

        class _Joblib(Guard, NumpyUnpickler):  # type: ignore[misc]
            dispatch = guarded_dispatch(NumpyUnpickler.dispatch)

            def __init__(self, file: BinaryIO, state: State) -> None:
                NumpyUnpickler.__init__(self, "", file, **_native_order())
                self._s, self._file = state, file

            def find_class(self, module: str, name: str) -> Any:
                if f"{module}.{name}" != MEMMAP:
                    return Guard.find_class(self, module, name)
                if self._s.seen is not None:  # audited: a wrapper's mark is allowed (a call of it is refused)
                    self._s.seen.append((MEMMAP, True))
                return _Memmapped(self._s)

            def load_build(self) -> None:
                Guard.load_build(self)
                top = self.stack[-1]
                if isinstance(top, NumpyArrayWrapper):
                    self.stack[-1] = _read_wrapped(self.file_handle, self._s, top)

        _Joblib.dispatch[pickle.BUILD[0]] = _Joblib.load_build
        _JOBLIB_CLASS = _Joblib
    return _JOBLIB_CLASS


@functools.cache
def _native_order() -> dict[str, bool]:
    """The reader's option for arrays in native byte order, where joblib has one (1.5+; before, they always were)."""
    from joblib.numpy_pickle import NumpyUnpickler

    known = "ensure_native_byte_order" in NumpyUnpickler.__init__.__code__.co_varnames
    return {"ensure_native_byte_order": True} if known else {}


def trusted_load(stream: BinaryIO, state: State) -> Any:
    """Load a trusted joblib stream with the C unpickler, unguarded (what it names is imported and called).

    joblib writes each array as a `NumpyArrayWrapper` object, then the array's bytes outside the pickle;
    its pure-Python reader swaps the wrapper for the array read after it as it builds the wrapper (BUILD).
    The C unpickler (a forest: ~2.4 ms against ~8) has no such hook, so here:
    - it reads through `_Source`, which has no `peek`: the C unpickler then reads no further than the
      next opcode or frame. joblib ends a frame at each wrapper (its own reader needs it: it takes the
      array from the file, past the frame), as does mlpersist's writer, and an unframed pickle is read
      an opcode at a time: when the wrapper is built, the file is at its array;
    - `find_class` gives, for joblib's wrapper classes, a stand-in whose `__setstate__` reads the array
      there (`_read_wrapped`, or joblib's own `read` for an ndarray subclass or a pre-0.10 wrapper);
    - the source then gives the unpickler three opcodes of its own before the file's next one: POP (the
      wrapper), NONE and BINPERSID, whose `persistent_load` puts the array where the wrapper was. The pickle
      memo keeps the wrapper, as joblib's reader does.
    """
    import numpy as np
    from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler
    from joblib.numpy_pickle_compat import NDArrayWrapper

    source = _Source(stream)
    arrays: list[Any] = []
    stand_ins: dict[type, type] = {}

    def stand_in(real: type) -> type:
        def __setstate__(wrapper: Any, wrapper_state: Any) -> None:
            wrapper.__dict__.update(wrapper_state)
            if real is NumpyArrayWrapper and getattr(wrapper, "subclass", None) is np.ndarray:
                arrays.append(_read_wrapped(stream, state, wrapper))
            else:  # an ndarray subclass (np.matrix), or joblib <= 0.9's side-file wrapper: joblib's own read
                joblib_wrapper: Any = object.__new__(real)  # as pickle makes it (NEWOBJ)
                joblib_wrapper.__dict__.update(wrapper.__dict__)
                reader = NumpyUnpickler("", stream, **_native_order())
                arrays.append(joblib_wrapper.read(reader, *_native_order().values()) if real is NumpyArrayWrapper
                              else joblib_wrapper.read(reader))
            source.put_array()

        if real not in stand_ins:
            stand_ins[real] = type(real.__name__, (), {"__setstate__": __setstate__})
        return stand_ins[real]

    class _Trusted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = super().find_class(module, name)
            return stand_in(found) if found is NumpyArrayWrapper or found is NDArrayWrapper else found

        def persistent_load(self, pid: Any) -> Any:
            if pid is not None or not arrays:
                raise pickle.UnpicklingError("persistent IDs are not part of joblib's format")
            return arrays.pop()

    return _Trusted(source).load()


_PUT_ARRAY = pickle.POP + pickle.NONE + pickle.BINPERSID  # the wrapper off the stack; the array read after it on
_MERGED = 1 << 20  # a frame up to this size is given with those opcodes, in the same read (the unpickler reads any)


class _Source:
    """A stream as `trusted_load`'s C unpickler reads it: no `peek`, and opcodes it is given to put first."""

    __slots__ = ("_read", "after", "readinto", "readline")

    def __init__(self, stream: Any) -> None:
        self._read, self.readinto, self.readline = stream.read, stream.readinto, stream.readline
        self.after = b""  # bytes the unpickler's next read gives before the stream's

    def put_array(self) -> None:
        """After an array: give the unpickler's next read `_PUT_ARRAY`, with the frame that follows, if one does.

        The C unpickler keeps what a read gives past what it asked for, and reads on from it: one call
        instead of six (its opcodes, one at a time, then the frame's opcode, length and body). The frame
        is given whole, its header included, so the unpickler reads it as it reads a frame it fetched
        itself; a file cut inside it fails there as it did.
        """
        head = self._read(1)
        if head == pickle.FRAME:
            size = self._read(8)
            length = int.from_bytes(size, "little")
            head += size + (self._read(length) if len(size) == 8 and length <= _MERGED else b"")
        self.after = _PUT_ARRAY + head

    def read(self, n: int) -> bytes:
        after = self.after
        if not after:
            data: bytes = self._read(n)
            return data
        self.after = b""
        return after if len(after) >= n else after + self._read(n - len(after))


# An array of at most this many bytes is read without first asking how much the file holds: a file that
# ends inside it fails the read itself, having allocated no more than this.
_SMALL = 1 << 16
_INT = {int}


def _read_wrapped(f: Any, s: State, wrapper: Any) -> Any:
    """Read the array after a NumpyArrayWrapper, refusing shapes the file cannot hold.

    joblib's own `read_array`, minus its per-array numpy scalar arithmetic and chunked copies: the
    bytes go straight into the new array (a forest is hundreds of small arrays, so each step here is
    one C call where it can be).
    """
    import numpy as np

    fields = wrapper.__dict__  # what the wrapper's state set (its class has no such attributes)
    shape, dtype, order = fields.get("shape"), fields.get("dtype"), fields.get("order")
    subclass = fields.get("subclass")
    if isinstance(subclass, _Memmapped):  # joblib reads an array that was memory-mapped when saved as a plain one
        subclass = np.ndarray
    an_array = subclass is np.ndarray or (isinstance(subclass, type) and issubclass(subclass, np.ndarray))
    if (not isinstance(dtype, np.dtype) or not isinstance(shape, tuple)
            or (shape and (set(map(type, shape)) != _INT or min(shape) < 0)) or order not in ("C", "F")
            or not an_array):
        raise CorruptArtifactError(f"{s.what}: malformed joblib array header")
    array = _read_array(f, s, fields, shape=shape, dtype=dtype, order=order)
    # an allowed subclass (numpy.matrix: the mean of a scipy sparse matrix is one, which BisectingKMeans fit on a
    # csr_matrix keeps) is rebuilt from the plain array as joblib rebuilds it
    return array if subclass is np.ndarray else _as_joblib_subclass(array, subclass)


def _read_array(f: Any, s: State, fields: dict[str, Any], *, shape: tuple[int, ...], dtype: Any, order: str) -> Any:
    """The array a checked wrapper's header (`_read_wrapped`) declares, read from the file."""
    import numpy as np

    if dtype.hasobject:  # the inner stream goes through the same guarded unpickler (joblib GHSA-m62q-453p-gv66)
        return pickle.load(f) if s.policy.trusted else PlainUnpickler(f, s).load()
    if fields.get("numpy_array_alignment_bytes") is not None:  # joblib >= 1.2: padding, its length first
        pad = f.read(1)
        if len(pad) != 1 or len(f.read(pad[0])) != pad[0]:
            raise CorruptArtifactError(f"{s.what}: the file ends inside an array's padding")
    count = math.prod(shape)
    need = dtype.itemsize * count
    if need > _SMALL and need > s.remaining(f):
        raise _past_the_end(s, need)
    flat: Any = np.empty(count, dtype=dtype)
    if need and (got := f.readinto(flat.view(np.uint8))) != need:  # a BufferedReader: fills it, or the file ended
        # as the check above would have said it for a larger array
        raise _past_the_end(s, need) if need > s.remaining(f) + got else CorruptArtifactError(
            f"{s.what}: the file ends inside an array's data")
    if len(shape) != 1:
        flat = flat.reshape(shape[::-1]).transpose() if order == "F" else flat.reshape(shape)
    if dtype.isnative:
        return flat
    from joblib.numpy_pickle_utils import _ensure_native_byte_order  # joblib's conversion, for such arrays only

    return _ensure_native_byte_order(flat)


def _as_joblib_subclass(array: Any, subclass: type) -> Any:
    """An array joblib wrote as an ndarray subclass, as `joblib.load` gives it back.

    joblib rebuilds the subclass through `__array_prepare__`, which numpy 2 removed: there it gives the
    plain array, under numpy 1 a view of it as the subclass.
    """
    return array.view(subclass) if hasattr(array, "__array_prepare__") else array


def _past_the_end(s: State, need: int) -> CorruptArtifactError:
    return CorruptArtifactError(f"{s.what}: an array declares {need} bytes, more than the file holds" + (
        "" if s.inflation is None else f" once decompressed (at most {s.inflation} bytes, {MAX_INFLATION} times "
                                       "its size, or 1 MiB: a decompression bomb); if you trust its author, "
                                       "load it with trusted=True"))
