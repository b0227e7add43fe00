"""Vetting a Keras file before Keras opens it: the archive, the HDF5 links, and every object its config names."""

from __future__ import annotations

import importlib
import io
import json
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import keras

from mlpersist._zips import no_overlap
from mlpersist.errors import CorruptArtifactError, PersistError, UntrustedContentError

_MEMBERS = {"config.json", "metadata.json", "model.weights.h5"}
_MAX_CONFIG = 64 << 20
_MAX_RATIO = 1000  # deflated members: uncompressed / compressed
_DATA_CLASSES = {"__keras_tensor__", "__tuple__", "__typespec__", "__numpy__", "__tensor__", "__bytes__",
                 "__ellipsis__", "__slice__"}
_REFUSED_CLASSES = {"Lambda", "__lambda__", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer"}
_REFUSED_MODULE_PARTS = {"saving", "utils", "config", "export", "backend"}  # file, code and global-state helpers


def vet_zip(f: Any) -> tuple[Any, int]:
    """Refuse archive tricks before Keras reads it: unknown, duplicate or escaping members, bombs, HDF5 links.

    Returns the config and the number of values the weights file declares (`vet_hdf5`).
    """
    try:
        zf = zipfile.ZipFile(f)
    except zipfile.BadZipFile as exc:
        raise CorruptArtifactError(f"model.keras is not a zip archive: {exc}") from None
    try:
        return _vet_members(zf, f)
    except PersistError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as exc:  # CRC, inflate, cut
        raise CorruptArtifactError(f"model.keras is damaged: {type(exc).__name__}: {exc}") from None


def _vet_members(zf: zipfile.ZipFile, f: Any) -> tuple[Any, int]:
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(names) != len(set(names)) or len(names) > 10_000:
            raise CorruptArtifactError("model.keras has duplicate members or too many of them")
        for i in infos:
            bad_name = (i.filename not in _MEMBERS and not i.filename.startswith("assets/")) or ".." in i.filename \
                or i.filename.startswith("/") or "\\" in i.filename
            if bad_name:
                raise UntrustedContentError(f"model.keras holds an unexpected member {i.filename!r}; a .keras file "
                                            f"holds {', '.join(sorted(_MEMBERS))} and assets/", [i.filename])
            if i.compress_type != zipfile.ZIP_STORED and i.file_size > _MAX_RATIO * max(i.compress_size, 1):
                raise CorruptArtifactError(f"model.keras member {i.filename} inflates {i.file_size} bytes from "
                                           f"{i.compress_size} (a decompression bomb)")
        no_overlap(infos, f, "model.keras")  # Keras extracts every member to disk
        if "config.json" not in names:
            raise CorruptArtifactError("model.keras has no config.json")
        if zf.getinfo("config.json").file_size > _MAX_CONFIG:
            raise CorruptArtifactError("model.keras config.json is larger than 64 MiB")
        config = _json(zf.read("config.json"), "config.json")
        declared = 0
        if "model.weights.h5" in names:
            with _member(zf, f, zf.getinfo("model.weights.h5")) as weights:
                declared = vet_hdf5(weights, "model.weights.h5")
    return config, declared


def _member(zf: zipfile.ZipFile, f: Any, info: zipfile.ZipInfo) -> Any:
    """A stored (uncompressed) member as a window onto `f`; a deflated one through zipfile.

    HDF5 vetting then reads only the file's metadata, not all its weights through zipfile's stream.
    """
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return zf.open(info)
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CorruptArtifactError(f"model.keras: the local header of {info.filename} is damaged")
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return _Window(f, start, info.file_size)


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a seekable binary file, read-only."""

    def __init__(self, f: Any, start: int, size: int) -> None:
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(view[:want]) if want else 0
        self._pos += got or 0
        return got or 0


def h5_config(f: Any) -> tuple[Any, int]:
    """The config of a legacy .h5 model, and the number of values its datasets declare (`vet_hdf5`)."""
    declared = vet_hdf5(f, "model.h5")
    f.seek(0)
    try:
        with h5py.File(f, "r") as h5:
            raw = h5.attrs.get("model_config")
    except Exception as exc:  # as in vet_hdf5: damaged metadata raises more than OSError
        raise CorruptArtifactError(f"model.h5 is not a readable HDF5 file: {type(exc).__name__}: {exc}") from None
    if raw is None:
        raise CorruptArtifactError("model.h5 has no model_config: it holds weights only; load them with "
                                   "model.load_weights into a model you build")
    return _json(raw.encode() if isinstance(raw, str) else bytes(raw), "model_config"), declared


MAX_UNSTORED = 64 << 20
# The filters libhdf5 has built in: shuffle, fletcher32, nbit, scale-offset, and deflate (built with zlib, as in
# every h5py wheel). For any other (szip included, which a build may leave out) HDF5 opens every library in its
# plugin path when the data is read, and a library runs its own code as it is opened (CVE-2026-2492).
_HDF5_FILTERS = frozenset({1, 2, 3, 5, 6})


def vet_hdf5(f: Any, what: str) -> int:
    """Refuse external storage, soft/external links, virtual datasets, plugin filters and shape bombs.

    Links and storage that reach other files: CVE-2026-1669; shape bombs: CVE-2026-0897 and -12570; plugin
    filters: `_HDF5_FILTERS`. Reading a dataset's filter list (its creation property list) loads nothing.

    Each object is looked into once, however many hard links reach it: 30 groups of 34 KB, each linking
    8 times to the next, were 8**29 paths to walk (a hang), and a group linked into itself a cycle.
    Keras reads a weight whole before it compares its shape: the datasets together may declare at most
    `MAX_UNSTORED` bytes more than they store (Keras writes every weight in full, uncompressed). A 13 KB
    file with one 3.6 GB dataset never written took 65 s and 15 GB to be refused.

    Returns the number of values the datasets declare (the budget of `_keras_variables.loading_variables`).
    """
    seen: set[Any] = set()  # h5py object ids: equal when they are the same object in the file
    unstored = declared = 0

    def visit(group: Any, prefix: str) -> None:
        nonlocal unstored, declared
        for key in group:
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise UntrustedContentError(f"{what}: {prefix}{key} is a {type(link).__name__}, which reaches "
                                            "outside the file; refusing it", [f"{prefix}{key}"])
            obj = group[key]
            if obj.id in seen:
                continue
            seen.add(obj.id)
            if isinstance(obj, h5py.Group):
                visit(obj, f"{prefix}{key}/")
            elif isinstance(obj, h5py.Dataset):
                if obj.external or obj.is_virtual:
                    raise UntrustedContentError(f"{what}: dataset {prefix}{key} uses external or virtual storage, "
                                                "which reads other files; refusing it", [f"{prefix}{key}"])
                plugin = _plugin_filter(obj)
                if plugin is not None:
                    raise UntrustedContentError(
                        f"{what}: dataset {prefix}{key} names HDF5 filter {plugin}, which is none of HDF5's own; "
                        "reading it would load plugin libraries from HDF5's plugin path (code from outside the "
                        "file). Keras writes its weights without filters; refusing it", [f"{prefix}{key}"])
                declared += obj.size
                unstored += max(0, obj.size * obj.dtype.itemsize - obj.id.get_storage_size())
                if unstored > MAX_UNSTORED:
                    raise UntrustedContentError(
                        f"{what}: dataset {prefix}{key} brings the data its datasets declare to more than "
                        f"{MAX_UNSTORED >> 20} MiB beyond what they store (Keras writes its weights whole; reading "
                        "them would allocate it); refusing it", [f"{prefix}{key}"])

    try:
        with h5py.File(f, "r") as h5:
            seen.add(h5.id)
            visit(h5, "/")
            seen.clear()  # before the file closes
    except PersistError:
        raise
    except Exception as exc:  # h5py's OSError, and RuntimeError/KeyError/ValueError for damaged metadata
        raise CorruptArtifactError(f"{what} is not a readable HDF5 file: {type(exc).__name__}: {exc}") from None
    return declared


def _plugin_filter(dataset: Any) -> int | None:
    """The first filter of `dataset`'s pipeline that HDF5 would look for among plugin libraries, or None."""
    plist = dataset.id.get_create_plist()
    return next((code for code in (plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
                 if code not in _HDF5_FILTERS), None)


def vet_config(config: Any, custom_objects: Mapping[str, Any], *, legacy: bool = False) -> None:
    """Refuse anything in a Keras config that is not a built-in Keras object or an allowed custom object.

    Raises:
        mlpersist.errors.UntrustedContentError: naming the first offending entry.

    """
    registered = keras.saving.get_custom_objects()
    for node in _walk(config):
        if isinstance(node, str):
            if node.startswith(("/", "\\")) or "://" in node or "../" in node or "..\\" in node:
                raise UntrustedContentError(f"the model config holds the path or URL {node[:80]!r}; refusing to "
                                            "let Keras read outside the artifact", [node[:80]])
            continue
        cls, module, reg = node.get("class_name"), node.get("module"), node.get("registered_name")
        if not isinstance(cls, str) or cls in _DATA_CLASSES:
            continue
        label = reg or (f"{module}.{cls}" if module else cls)
        if cls in _REFUSED_CLASSES:
            raise UntrustedContentError(f"the model contains a {cls} ({label}), which runs code or reads files "
                                        "when loaded; pass trusted=True only if you trust its author", [label])
        if (reg and reg != cls) or (module and module.partition(".")[0] != "keras"):
            if not (reg in registered or cls in custom_objects or reg in custom_objects):
                raise UntrustedContentError(
                    f"the model uses the custom object {label!r}, which is neither registered nor passed: import "
                    f"the module that defines it (decorated with @keras.saving.register_keras_serializable()), or "
                    f"pass custom_objects={{{cls!r}: {cls}}} to load_any", [label])
            continue
        if not module:
            if legacy and _public_class(cls):  # legacy HDF5 configs never name modules
                continue
            raise UntrustedContentError(f"the model config entry {cls!r} names no module; refusing an entry Keras "
                                        "would resolve by name alone (a .keras file always names modules)", [cls])
        _check_builtin(module, cls, node.get("config"), label)


_PUBLIC = ("layers", "models", "initializers", "optimizers", "losses", "metrics", "regularizers", "constraints")


def _public_class(name: str) -> bool:
    if name == "Functional":  # what keras.Model(inputs, outputs) builds; not exported under that name
        return True
    return any(isinstance(getattr(getattr(keras, ns), name, None), type) for ns in _PUBLIC)


def _check_builtin(module: str, name: str, config: Any, label: str) -> None:
    """A class entry must name a Keras class; a function entry a Keras function (activations, losses, ...).

    Functions from saving/utils/config/export/backend modules are refused (file, code and global-state
    helpers); a class from such a module only if it is a Keras layer, optimizer, loss, metric, ...
    (the torch backend's optimizers live in `keras.src.backend.torch.optimizers`).
    """
    is_function = name == "function"
    target = config if is_function else name
    helper_module = bool(set(module.split(".")) & _REFUSED_MODULE_PARTS)
    obj: Any = None
    if isinstance(target, str) and "." not in target and not (is_function and helper_module):
        try:
            obj = getattr(importlib.import_module(module), target, None)
        except ImportError:
            obj = None
    ok = callable(obj) and isinstance(obj, type) != is_function
    if ok and not is_function and helper_module:
        ok = issubclass(obj, _saveable_bases())
    if not ok:
        raise UntrustedContentError(f"the model config names {label!r}, which is not a built-in Keras "
                                    f"{'function' if is_function else 'class'}; refusing it", [label])


def _saveable_bases() -> tuple[type, ...]:
    return (keras.layers.Layer, keras.optimizers.Optimizer, keras.losses.Loss, keras.metrics.Metric,
            keras.initializers.Initializer, keras.regularizers.Regularizer, keras.constraints.Constraint,
            keras.optimizers.schedules.LearningRateSchedule, keras.DTypePolicy)


def _walk(node: Any) -> Iterator[Any]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            yield item


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptArtifactError(f"{what} is not valid JSON: {str(exc)[:120]}") from None
