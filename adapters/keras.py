"""Keras 3: the `.keras` format, with its config and weights vetted before Keras opens the file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import keras

from mlpersist import Payload, PersistError
from mlpersist._environment import release
from mlpersist._writeback import Stream, Writeback
from mlpersist._zips import ZipOut
from mlpersist.adapters._keras_variables import loading_variables
from mlpersist.adapters._keras_vet import h5_config, vet_config, vet_zip
from mlpersist.errors import CorruptArtifactError, UntrustedContentError

_FILES = {"keras": "model.keras", "h5": "model.h5"}
_ARCHIVE_RELEASES = ((3, 6), (3, 15))  # the Keras releases whose `_save_model_to_fileobj` _write_archive repeats


class KerasAdapter:
    """Sequential, functional and subclassed Keras 3 models on any backend."""

    name: ClassVar[str] = "keras"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("keras", "tensorflow", "tensorflow-cpu", "torch", "jax", "numpy",
                                               "h5py")
    # Keras reads only by path: it gets the very bytes whose config was vetted (a large .keras file where
    # it lies, under a read lease, else a sealed in-memory copy; HDF5 wants a real path: a private
    # temporary copy), so no write to the artifact between the check and Keras's read can slip it
    # another config
    read_by_path: ClassVar[tuple[str, ...]] = (_FILES["keras"],)
    read_whole: ClassVar[tuple[str, ...]] = (_FILES["h5"],)

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]:
        """`model.save(model.keras)`, or a one-way `model.export(...)` for serving."""
        info = {"backend": keras.backend.backend(), "keras_version": keras.__version__}
        if format == "export":
            model.export(str(dest / "export"), **options)
            return {**info, "one_way": True}
        if options:
            raise PersistError(f"the keras adapter takes no save options for .keras, not {', '.join(sorted(options))}")
        _save_keras(model, dest / _FILES["keras"])
        return info

    def example_outputs(self, model: Any, args: list[Any]) -> Mapping[str, Any]:
        """The model called in inference mode (`model(x, training=False)`), on any backend."""
        return {"call": keras.ops.convert_to_numpy(model(*args, training=False))}

    def load(self, payload: Payload, info: Mapping[str, Any], *, format: str, custom_objects: Any = None,
             compile: bool = True, call_endpoint: str = "serving_default") -> Any:
        """Vet the archive and its config, then `keras.models.load_model(..., safe_mode=True)`."""
        if format == "export":
            return _load_saved_model(payload, call_endpoint)
        name = _FILES.get(format, _FILES["keras"])
        trusted = payload.policy.trusted
        config, declared = h5_config(payload.open(name)) if format == "h5" else vet_zip(payload.open(name))
        if not trusted:
            vet_config(config, custom_objects or {}, legacy=format == "h5")
        variables = loading_variables(declared, payload.label(name),
                                      optimizer=bool(compile) and _compiled(config, format))
        with _keras_path(payload, name) as path, variables:
            try:
                return keras.models.load_model(path, custom_objects=custom_objects, compile=compile,
                                               safe_mode=not trusted)
            except PersistError:
                raise
            except Exception as exc:  # ValueError/TypeError from Keras; h5py's and zipfile's errors for its weights
                raise CorruptArtifactError(f"Keras could not rebuild the model from {payload.label(name)}: "
                                           f"{type(exc).__name__}: {exc}") from exc


def _save_keras(model: Any, path: Path) -> None:
    """What `model.save(path)` does, with the file hashed and sent to the disk as it is written.

    `model.save` takes only a path, and writes its zip with zipfile. On the Keras releases `_write_archive`
    repeats, that function writes the same archive through `ZipOut`; on others, Keras's own
    `saving_lib.save_model`, which takes a file object too (Keras pickles models that way), writes it into
    a forward-only `Stream`. Either way, each member is followed by a data descriptor (nothing goes back to
    patch a header), and the 200 MB of weights, written in one call, are hashed during the write instead
    of after it. A class that overrides `save`, or a Keras without that function, gets `model.save`.
    """
    from keras.src.saving import saving_lib  # noqa: PLC0415 - Keras's internal module: only where it is used

    if type(model).save is not keras.Model.save or not hasattr(saving_lib, "_save_model_to_fileobj"):
        model.save(str(path))
        return
    with open(path, "x+b") as f, Writeback(f) as following:
        if not _write_archive(model, saving_lib, ZipOut(f, following.write_crc)):
            saving_lib.save_model(model, Stream(f, following))


def _write_archive(model: Any, lib: Any, archive: ZipOut) -> bool:
    """Keras's `saving_lib._save_model_to_fileobj` (3.6-3.15, the same there), writing to `archive`.

    Keras's writer hands its weights (an HDF5 file it builds in memory) to zipfile, which makes a pass
    over them for their CRC before it writes them: 29 ms of a 200 MB save. `ZipOut` takes the CRC on the
    writeback thread beside the write instead, and writes zipfile's very bytes. Returns False, having
    written nothing, where Keras would write its weights to a temporary file first (too little memory), or
    for a Keras release this function was not checked against: `saving_lib.save_model` writes those.
    """
    if not _ARCHIVE_RELEASES[0] <= release(keras.__version__) <= _ARCHIVE_RELEASES[1]:
        return False
    if not lib.is_memory_sufficient(model):
        return False
    config_json, metadata_json = lib._serialize_model_as_json(model)
    archive.writestr(lib._METADATA_FILENAME, metadata_json)
    archive.writestr(lib._CONFIG_FILENAME, config_json)
    with ExitStack() as stores:  # closed in reverse, each even if another fails: weights, then assets, as Keras
        assets = lib.DiskIOStore(lib._ASSETS_DIRNAME, archive=archive, mode="w")  # a temporary directory
        stores.callback(assets.close)
        weights = lib.H5IOStore(lib._VARS_FNAME_H5, archive=archive, mode="w")
        stores.callback(weights.close)
        try:
            lib._save_state(model, weights_store=weights, assets_store=assets, inner_path="",
                            visited_saveables=set())
        except BaseException:
            weights.archive = assets.archive = None  # as Keras: close without writing (the save is discarded)
            raise
    archive.close()
    return True


def _compiled(config: Any, format: str) -> bool:
    """Whether loading builds an optimizer: a .keras model saved compiled.

    A legacy .h5 builds one only to load its saved state, which its weights file declares.
    """
    compile_config = config.get("compile_config") if format == "keras" and isinstance(config, dict) else None
    return isinstance(compile_config, dict) and compile_config.get("optimizer") is not None


def _load_saved_model(payload: Payload, call_endpoint: str) -> Any:
    """A TensorFlow SavedModel, as an inference-only `keras.layers.TFSMLayer`: trusted content only."""
    if not payload.policy.trusted:
        raise UntrustedContentError(
            "this is a TensorFlow SavedModel: a TensorFlow graph whose operations can read and write files, so it "
            "is loaded only with trusted=True (only for files whose author you trust). It loads as an "
            "inference-only keras.layers.TFSMLayer; to get a trainable model, re-save the original with save_any",
            ["tensorflow SavedModel"])
    try:
        return keras.layers.TFSMLayer(str(payload.directory("export")), call_endpoint=call_endpoint)
    except (ValueError, OSError, ImportError, RuntimeError) as exc:
        raise CorruptArtifactError(f"the SavedModel could not be loaded as a TFSMLayer (it needs the TensorFlow "
                                   f"backend): {type(exc).__name__}: {str(exc)[:300]}") from exc


@contextmanager
def _keras_path(payload: Payload, name: str) -> Iterator[str]:
    """A path to the checked bytes of `name` under its own name (Keras picks its reader by suffix).

    A .keras file: a link to `payload.local_path` (the leased file or a sealed copy). HDF5 resolves the real
    path of what it opens, which such a copy has not: an .h5 file's checked bytes are written to a
    private temporary directory instead.
    """
    data = payload.checked_bytes(name) if name.endswith(".h5") else None
    path = payload.local_path(name) if data is None else None
    if path is not None and path.name == name:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="mlpersist-keras-") as tmp:  # mode 0700
        target = os.path.join(tmp, name)
        if data is None:
            os.symlink(str(path), target)
        else:
            with open(target, "xb") as f:
                f.write(data)
        yield target
