"""Keras adapter: .keras round trips on every backend, and a config/archive vetting that does not trust safe_mode."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import pytest
from contract import AdapterContract
from mlp_testkit import require, run_python, write_refused, write_when_let_in

from mlpersist import (
    CorruptArtifactError,
    IntegrityError,
    UnsupportedModelError,
    UntrustedContentError,
    inspect,
    load_any,
    save_any,
    verify,
)


def keras() -> Any:
    return require("keras")


def x_input(n: int = 16, seed: int = 0) -> Any:
    return require("numpy").random.default_rng(seed).normal(size=(n, 4)).astype("float32")


def sequential() -> Any:
    k = keras()
    k.utils.set_random_seed(0)
    model = k.Sequential([k.Input((4,)), k.layers.Dense(8, activation="relu"), k.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_input(32), require("numpy").arange(32) % 2, epochs=1, verbose=0)
    return model


class TestKeras(AdapterContract):
    adapter = "keras"
    framework_module = "keras"
    mutants: ClassVar[tuple[tuple[str, int], ...]] = (("keras", 150), ("keras-weights", 150))

    def make_model(self) -> Any:
        return sequential()

    def make_input(self) -> Any:
        return x_input(8, seed=1)

    def outputs(self, model: Any, x: Any) -> Any:
        return model.predict(x, verbose=0)


def same(a: Any, b: Any) -> None:
    x = x_input(8, seed=3)
    require("numpy").testing.assert_array_equal(a.predict(x, verbose=0), b.predict(x, verbose=0))


def test_a_large_model_is_hashed_as_keras_writes_it_and_its_digest_is_that_of_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keras's zip is written forward only (`_zips.ZipOut`): each member is followed by a data descriptor,
    its weights are hashed as they are written (the core does not read the file again), and the manifest's
    digest is still that of the file; the model loads and predicts bit for bit, and the archive also loads
    with Keras alone."""
    from blake3 import blake3

    from mlpersist import _storage, _writeback

    k = keras()
    model = _large(k)
    assert model.count_params() * 4 > _writeback.PIECE
    hashed: list[int] = []
    real_hash = _storage.hash_fd

    def recording(fd: int, size: int, algo: str | None = None) -> str:
        hashed.append(size)
        return real_hash(fd, size, algo)

    monkeypatch.setattr(_storage, "hash_fd", recording)
    m = save_any(model, tmp_path / "m")
    path = tmp_path / "m" / "model.keras"
    assert path.stat().st_size not in hashed
    save_any(sequential(), tmp_path / "small")  # under a piece (4 MiB): no thread, the core hashes it
    assert hashed == [(tmp_path / "small" / "model.keras").stat().st_size]
    assert m.files["model.keras"].digest == "blake3:" + blake3(path.read_bytes()).hexdigest()
    verify(tmp_path / "m")
    with zipfile.ZipFile(path) as zf:
        assert {i.filename: bool(i.flag_bits & 0x8) for i in zf.infolist()} == {
            "metadata.json": True, "config.json": True, "model.weights.h5": True}
    same(model, load_any(tmp_path / "m"))
    same(model, k.models.load_model(str(path)))


def _large(k: Any) -> Any:
    k.utils.set_random_seed(0)
    return k.Sequential([k.Input((4,)), k.layers.Dense(2400), k.layers.Dense(2400), k.layers.Dense(2)])  # 23 MB


def _spy_archive(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    from mlpersist.adapters import keras as adapter

    taken: list[bool] = []
    real = adapter._write_archive

    def spying(*args: Any) -> bool:
        taken.append(real(*args))
        return taken[-1]

    monkeypatch.setattr(adapter, "_write_archive", spying)
    return taken


def _members(path: Path) -> dict[str, Any]:
    """Each member of a .keras file: JSON parsed (the save date dropped), and the HDF5 weights as arrays."""
    h5py = require("h5py")
    out: dict[str, Any] = {}
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every CRC is right
        for name in zf.namelist():
            if name.endswith(".json"):
                out[name] = {k: v for k, v in json.loads(zf.read(name)).items() if k != "date_saved"}
            elif name.endswith(".h5"):
                with h5py.File(io.BytesIO(zf.read(name)), "r") as h5:
                    out[name] = _datasets(h5py, h5)
            else:
                out[name] = zf.read(name)
    return out


def _datasets(h5py: Any, h5: Any) -> dict[str, bytes]:
    arrays: dict[str, bytes] = {}

    def keep(key: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            arrays[key] = obj[()].tobytes()

    h5.visititems(keep)
    return arrays


def test_the_archive_written_is_the_one_keras_writes_with_the_weights_crc_taken_beside_the_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the Keras releases `_write_archive` repeats, save_any writes the archive with `ZipOut`: the same
    members in the same order as `model.save`, the same config and metadata, the same weights; a
    release it was not checked against gets Keras's own writer, and loads the same."""
    from mlpersist.adapters import keras as adapter

    k = keras()
    model = _large(k)
    model.save(str(tmp_path / "native.keras"))
    taken = _spy_archive(monkeypatch)
    save_any(model, tmp_path / "m")
    assert taken == [True]
    native = _members(tmp_path / "native.keras")
    assert list(native) == ["metadata.json", "config.json", "model.weights.h5"]
    assert _members(tmp_path / "m" / "model.keras") == native
    same(model, load_any(tmp_path / "m"))

    monkeypatch.setattr(adapter, "_ARCHIVE_RELEASES", ((3, 0), (3, 5)))  # as if Keras were newer than checked
    save_any(model, tmp_path / "fallback")
    assert taken == [True, False]
    assert _members(tmp_path / "fallback" / "model.keras") == native
    same(model, load_any(tmp_path / "fallback"))


def test_a_layers_asset_files_are_written_as_keras_writes_them_and_load_back(tmp_path: Path) -> None:
    """Keras's asset store hands each file a layer wrote (an adapted lookup's vocabulary) to the archive's
    `write`: the member is the one `model.save` writes, and the layer reads it back."""
    k = keras()
    from keras_models import Noted

    noted = Noted()
    noted.note = "vocabulary: a b c é"
    model = k.Sequential([k.Input((2,)), noted])
    model.save(str(tmp_path / "native.keras"))
    save_any(model, tmp_path / "m")
    native = _members(tmp_path / "native.keras")
    assert native["assets/layers/noted/note.txt"] == "vocabulary: a b c é".encode()
    assert _members(tmp_path / "m" / "model.keras") == native
    loaded = load_any(tmp_path / "m")
    assert loaded.layers[0].note == "vocabulary: a b c é"
    same(model, loaded)


def test_a_save_that_fails_while_keras_writes_its_weights_leaves_nothing(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mlpersist._zips import ZipOut

    k = keras()

    class Failing(k.layers.Dense):  # type: ignore[name-defined,misc]
        def save_own_variables(self, store: Any) -> None:
            raise RuntimeError("disk quota of the layer")

    k.utils.set_random_seed(0)
    model = k.Sequential([k.Input((4,)), k.layers.Dense(2400), Failing(2)])
    taken = _spy_archive(monkeypatch)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where Keras's asset store makes its directory
    written: list[str] = []
    real_writestr = ZipOut.writestr
    monkeypatch.setattr(ZipOut, "writestr", lambda self, name, data: (written.append(name),
                                                                      real_writestr(self, name, data))[1])
    with pytest.raises(UnsupportedModelError, match="could not save Sequential as keras: RuntimeError: disk quota"):
        save_any(model, tmp_path / "out" / "m")
    assert taken == []  # it raised from inside _write_archive
    assert written == ["metadata.json", "config.json"]  # the weights were not written for nothing
    assert list((tmp_path / "out").iterdir()) == []  # no artifact, no staging directory
    assert list((tmp_path / "tmp").iterdir()) == []  # the asset store's directory removed


def test_a_model_class_with_its_own_save_is_saved_by_it(tmp_path: Path) -> None:
    """A class that overrides `save` gets its `save` called, not Keras's saving function."""
    k = keras()
    calls: list[str] = []

    class Saving(k.Sequential):  # type: ignore[name-defined,misc]
        def save(self, filepath: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(str(filepath))
            return super().save(filepath, *args, **kwargs)

    k.utils.set_random_seed(0)
    model = Saving([k.Input((4,)), k.layers.Dense(2)])
    save_any(model, tmp_path / "m")
    assert [Path(c).name for c in calls] == ["model.keras"]
    with zipfile.ZipFile(tmp_path / "m" / "model.keras") as zf:
        assert not any(i.flag_bits & 0x8 for i in zf.infolist())  # zipfile's own file: headers patched in place
    same(model, load_any(tmp_path / "m", custom_objects={"Saving": Saving}))


def test_functional_with_a_registered_custom_layer_loads_with_no_arguments(tmp_path: Path) -> None:
    k = keras()
    from keras_models import Scale

    inp = k.Input((4,))
    model = k.Model(inp, k.layers.Dense(2)(Scale(3.0)(k.layers.Dense(8, activation="relu")(inp))))
    save_any(model, tmp_path / "m")
    same(load_any(tmp_path / "m"), model)


def test_a_subclassed_model_round_trips(tmp_path: Path) -> None:
    from keras_models import TwoTower

    model = TwoTower(units=5)
    model(x_input(2))
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert type(loaded) is TwoTower and loaded.units == 5
    same(loaded, model)


def test_compile_and_optimizer_state_survive_and_training_continues(tmp_path: Path) -> None:
    np = require("numpy")
    model = sequential()
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) > 0
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded.fit(x_input(32), np.arange(32) % 2, epochs=1, verbose=0)
    assert int(loaded.optimizer.iterations) > int(model.optimizer.iterations)
    assert not load_any(tmp_path / "m", compile=False).compiled


def test_an_unregistered_custom_layer_needs_custom_objects_and_the_error_says_how(tmp_path: Path) -> None:
    k = keras()
    from keras_models import Unregistered

    inp = k.Input((4,))
    model = k.Model(inp, Unregistered()(k.layers.Dense(3)(inp)))
    save_any(model, tmp_path / "m")
    with pytest.raises(UntrustedContentError, match=r"Unregistered.*register_keras_serializable.*custom_objects"):
        load_any(tmp_path / "m")
    same(load_any(tmp_path / "m", custom_objects={"Unregistered": Unregistered}), model)


def test_a_lambda_layer_is_refused_unless_trusted(tmp_path: Path) -> None:
    k = keras()
    inp = k.Input((4,))
    model = k.Model(inp, k.layers.Lambda(lambda t: t * 2.0)(inp))
    save_any(model, tmp_path / "m")
    with pytest.raises(UntrustedContentError, match="Lambda"):
        load_any(tmp_path / "m")
    same(load_any(tmp_path / "m", trusted=True), model)


def rewrite(archive: Path, edit: Any = None, extra: dict[str, bytes] | None = None) -> None:
    """Rewrite a .keras zip with config.json edited and extra members (the manifest is rewritten by the caller)."""
    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    if edit is not None:
        config = json.loads(members["config.json"])
        edit(config)
        members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in {**members, **(extra or {})}.items():
            zf.writestr(name, data)


def bare_keras(tmp_path: Path, edit: Any = None, extra: dict[str, bytes] | None = None) -> Path:
    path = tmp_path / "model.keras"
    sequential().save(str(path))
    rewrite(path, edit, extra)
    return path


def first_dense(config: dict[str, Any]) -> dict[str, Any]:
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")


SENTINEL = "/tmp/mlpersist-keras-PWNED"


@pytest.mark.parametrize("edit,name", [
    (lambda c: first_dense(c).update(module="os", class_name="system"), "os.system"),                    # K01
    (lambda c: first_dense(c)["config"].update(activation={"module": "keras.utils", "class_name": "function",
                                                           "config": "get_file", "registered_name": None}),
     "keras.utils.function"),                                                                             # K02
    (lambda c: first_dense(c)["config"].update(activation={"module": "builtins", "class_name": "function",
                                                           "config": "exec", "registered_name": None}),
     "builtins.function"),
    (lambda c: first_dense(c).update(class_name="TFSMLayer"), "keras.layers.TFSMLayer"),                  # K03
    (lambda c: first_dense(c).update(module="keras.src.saving.serialization_lib", class_name="set_global_attribute"),
     "keras.src.saving.serialization_lib.set_global_attribute"),
    (lambda c: first_dense(c).update(module=None), "Dense"),                                              # legacy
    (lambda c: first_dense(c)["config"].update(vocabulary=SENTINEL), SENTINEL),                           # path
    (lambda c: first_dense(c)["config"].update(vocabulary="https://127.0.0.1:9/v.txt"), "https://127.0.0.1:9/v.txt"),
    (lambda c: first_dense(c).update(registered_name="evil>Dense", module="evil_pkg.layers"), "evil>Dense"),
], ids=["module-os", "get_file", "builtins-exec", "TFSMLayer", "set_global_attribute", "no-module", "abs-path",
        "url", "unregistered-shadow"])
def test_crafted_configs_are_refused_before_keras_reads_them(edit: Any, name: str, tmp_path: Path) -> None:
    path = bare_keras(tmp_path, edit)
    with pytest.raises(UntrustedContentError) as info:
        load_any(path)
    assert name in info.value.names
    assert not os.path.exists(SENTINEL)


@pytest.mark.parametrize("extra,error", [
    ({"../evil.py": b"print(1)"}, UntrustedContentError),
    ({"model.weights.npz": b"PK"}, UntrustedContentError),
    ({"config.json": b"{}"}, CorruptArtifactError),  # a second config.json: readers disagree on which wins
], ids=["traversal", "npz-weights", "duplicate"])
def test_archive_tricks_are_refused(extra: dict[str, bytes], error: type, tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name
        path = bare_keras(tmp_path, extra=extra)
    with pytest.raises(error):
        load_any(path)


def test_a_decompression_bomb_member_is_refused(tmp_path: Path) -> None:
    path = bare_keras(tmp_path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("assets/bomb.txt", b"\0" * (64 << 20))
    with pytest.raises(CorruptArtifactError, match="decompression bomb"):
        load_any(path)


def _add_to_weights(h5: Any, kind: str, tmp_path: Path) -> str:
    """Put into a model's HDF5 weights what the check refuses; return what the refusal says."""
    h5py, np = require("h5py"), require("numpy")
    if kind == "external-link":
        h5["leak"] = h5py.ExternalLink("/etc/passwd", "/")
        return "ExternalLink"
    if kind == "soft-link":
        h5["alias"] = h5py.SoftLink("/layers")
        return "SoftLink"
    if kind == "external-storage":  # the dataset's bytes are read from another file
        h5.create_dataset("leak", shape=(8,), dtype="u1", external=[("/etc/hostname", 0, 8)])
        return "external or virtual storage"
    if kind == "virtual":
        with h5py.File(tmp_path / "other.h5", "w") as other:
            other["x"] = np.zeros(4, dtype="f4")
        layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "x", shape=(4,))
        h5.create_virtual_dataset("leak", layout)
        return "external or virtual storage"
    if kind == "plugin-filter":  # stored through a filter HDF5 does not have: reading it searches for plugins
        name = "layers/dense/vars/0"
        data = h5[name][()]
        del h5[name]
        weight = h5.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=data.shape, compression=307,
                                   allow_unknown_filter=True)
        weight.id.write_direct_chunk((0,) * data.ndim, data.tobytes())
        return "HDF5 filter 307, which is none of HDF5's own"
    # a weight replaced by one that declares 100 MiB and stores nothing: Keras would read it all (65 s and 15 GB
    # for 3.6 GB declared) before finding its shape wrong
    name = "layers/dense/vars/0"
    del h5[name]
    h5.create_dataset(name, shape=(5000, 5000), dtype="f4", chunks=(500, 500))
    return "more than 64 MiB beyond what they store"


def _overlap_bomb(members: dict[str, bytes], n: int, size: int) -> bytes:
    """A zip of `members` (stored) and `n` "assets/" members whose deflated data overlap (Fifield's "quoted
    overlap"): member i's data quotes the local headers of members i+1.. in stored deflate blocks, then ends in
    one shared kernel of `size` bytes. Each passes a ratio check (about 200x); together they inflate to n * size."""
    import struct
    import zlib

    def local(name: bytes, method: int, sizes: tuple[int, int, int]) -> bytes:  # sizes: CRC, stored, inflated
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, *sizes, len(name), 0) + name

    def central(name: bytes, method: int, sizes: tuple[int, int, int], offset: int) -> bytes:
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, *sizes, len(name),
                           0, 0, 0, 0, 0, offset) + name

    out, entries = bytearray(), []
    for name, data in members.items():
        stored = (zlib.crc32(data), len(data), len(data))
        entries.append(central(name.encode(), 0, stored, len(out)))
        out += local(name.encode(), 0, stored) + data
    plain = (b"mlpersist overlap " * (size // 18 + 1))[:size]
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
    kernel = deflate.compress(plain) + deflate.flush()
    names = [f"assets/f{i:04d}".encode() for i in range(n)]
    headers: list[bytes] = [b""] * n
    sizes: list[tuple[int, int, int]] = [(0, 0, 0)] * n
    quoted = b""  # the local headers of the members after i, which member i inflates to before the kernel
    for i in range(n - 1, -1, -1):  # backwards: a member's CRC covers the headers after it
        sizes[i] = (zlib.crc32(plain, zlib.crc32(quoted)), sum(5 + len(h) for h in headers[i + 1:]) + len(kernel),
                    len(quoted) + len(plain))
        headers[i] = local(names[i], 8, sizes[i])
        quoted = headers[i] + quoted
    for i in range(n):
        entries.append(central(names[i], 8, sizes[i], len(out)))
        out += headers[i]
        if i + 1 < n:  # a stored, non-final deflate block quoting the next local header
            out += bytes([0]) + struct.pack("<HH", len(headers[i + 1]), len(headers[i + 1]) ^ 0xFFFF)
    out += kernel
    start = len(out)
    for entry in entries:
        out += entry
    return bytes(out + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(out) - start,
                                   start, 0))


def test_a_zip_bomb_of_overlapping_members_is_refused(tmp_path: Path) -> None:
    """Each member passes the ratio check, and Keras extracts every member to disk: 57 KB wrote 600 MB."""
    path = tmp_path / "model.keras"
    model = sequential()
    model.save(str(path))
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    bomb = _overlap_bomb(members, 40, 1 << 20)
    with zipfile.ZipFile(io.BytesIO(bomb)) as zf:  # a valid archive: every member reads, 40 MiB of assets
        assert sum(len(zf.read(i)) for i in zf.infolist()) > 40 << 20 > 200 * len(bomb)
    path.write_bytes(bomb)
    with pytest.raises(CorruptArtifactError, match="members overlap"):
        load_any(path)
    with pytest.raises(CorruptArtifactError, match="members overlap"):
        load_any(path, trusted=True)


def _with_weights_edited(tmp_path: Path, edit: Any, compression: int = zipfile.ZIP_STORED,
                         model: Any = None) -> tuple[Path, Any]:
    """A .keras file of `model` (a new `sequential()`) whose HDF5 weights (also left in tmp_path/w.h5) `edit(h5)`
    changed; returns its path and what `edit` returned."""
    h5py = require("h5py")
    path = tmp_path / "model.keras"
    (model or sequential()).save(str(path))
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    (tmp_path / "w.h5").write_bytes(members["model.weights.h5"])
    with h5py.File(tmp_path / "w.h5", "a") as h5:
        result = edit(h5)
    members["model.weights.h5"] = (tmp_path / "w.h5").read_bytes()
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path, result


@pytest.mark.parametrize("kind", ["external-link", "soft-link", "external-storage", "virtual", "plugin-filter",
                                  "unstored"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_hdf5_weights_reaching_outside_the_file_or_declaring_unstored_data_are_refused(
        tmp_path: Path, compression: int, kind: str) -> None:
    path, message = _with_weights_edited(tmp_path, lambda h5: _add_to_weights(h5, kind, tmp_path), compression)
    with pytest.raises(UntrustedContentError, match=message):
        load_any(path)
    with pytest.raises(UntrustedContentError, match=message):  # the weights' check is not lifted by trust
        load_any(path, trusted=True)


_PLUGIN = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void opened(void) {  /* runs when a process opens this library */
    FILE *f = fopen(getenv("MLP_MARKER"), "w");
    if (f) fclose(f);
}
"""


def test_a_weight_needing_a_plugin_filter_is_refused_before_hdf5_opens_a_plugin_library(tmp_path: Path) -> None:
    """HDF5 looks for a filter it does not have by opening every library in its plugin path, and a library runs
    its own code as it is opened. A real library that leaves a file when opened, in a real process: reading
    the weight with h5py opens it; load_any refuses the file first, checked and trusted, and it is never opened."""
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the plugin library")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugin.c").write_text(_PLUGIN)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "plugins" / "libopened.so"),
                    str(tmp_path / "plugin.c")], check=True, capture_output=True)
    path, _ = _with_weights_edited(tmp_path, lambda h5: _add_to_weights(h5, "plugin-filter", tmp_path))
    marker = tmp_path / "opened"
    env = {"HDF5_PLUGIN_PATH": str(tmp_path / "plugins"), "MLP_MARKER": str(marker)}
    run_python(f"""
        import h5py
        with h5py.File({str(tmp_path / "w.h5")!r}, "r") as h5:
            try:
                h5["layers/dense/vars/0"][()]
            except OSError as exc:
                assert "can't find plugin" in str(exc), exc
        """, env=env)
    assert marker.exists()  # the library runs when HDF5 searches its plugin path
    marker.unlink()
    proc = run_python(f"""
        from mlpersist import UntrustedContentError, load_any
        for trusted in (False, True):
            try:
                load_any({str(path)!r}, trusted=trusted)
            except UntrustedContentError as exc:
                print(exc)
            else:
                raise SystemExit("loaded")
        """, env=env)
    assert proc.stdout.count("HDF5 filter 307") == 2
    assert not marker.exists()


def test_weights_stored_through_hdf5s_own_filters_still_load(tmp_path: Path) -> None:
    """Deflate, shuffle and fletcher32 are filters HDF5 has built in: a file written with them is not refused."""
    def compress(h5: Any) -> None:
        def each(name: str, obj: Any) -> None:
            if isinstance(obj, require("h5py").Dataset) and obj.ndim:
                names.append(name)
        names: list[str] = []
        h5.visititems(each)
        for name in names:
            data = h5[name][()]
            del h5[name]
            h5.create_dataset(name, data=data, compression="gzip", shuffle=True, fletcher32=True)

    model = sequential()
    path, _ = _with_weights_edited(tmp_path, compress, model=model)
    with require("h5py").File(tmp_path / "w.h5", "r") as h5:
        assert h5["layers/dense/vars/0"].compression == "gzip"
    same(load_any(path), model)


def test_a_deflated_keras_file_loads_and_a_damaged_member_header_is_refused(tmp_path: Path) -> None:
    model = sequential()
    model.save(str(tmp_path / "model.keras"))
    with zipfile.ZipFile(tmp_path / "model.keras") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(tmp_path / "deflated.keras", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    same(load_any(tmp_path / "deflated.keras"), model)
    with zipfile.ZipFile(tmp_path / "model.keras") as zf:
        offset = zf.getinfo("model.weights.h5").header_offset
    data = bytearray((tmp_path / "model.keras").read_bytes())
    data[offset:offset + 4] = b"XXXX"  # the central directory still points here
    (tmp_path / "model.keras").write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"local header of model\.weights\.h5"):
        load_any(tmp_path / "model.keras")


@pytest.mark.parametrize("damage", ["config-crc", "weights-crc", "h5-heap", "h5-heap-trusted"])
def test_a_damaged_archive_or_hdf5_file_is_a_corrupt_artifact(damage: str, tmp_path: Path) -> None:
    """zipfile's BadZipFile (a CRC that does not match) and h5py's RuntimeError/KeyError for damaged metadata
    were raised as they were; loading copies of a model with a few bytes changed found them."""
    path = tmp_path / "model.keras"
    sequential().save(str(path))
    with zipfile.ZipFile(path) as zf:
        members, infos = {n: zf.read(n) for n in zf.namelist()}, zf.infolist()
    if damage.endswith("crc"):  # a byte of the member changed, its recorded CRC kept
        name = "config.json" if damage == "config-crc" else "model.weights.h5"
        info = next(i for i in infos if i.filename == name)
        raw = bytearray(path.read_bytes())
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        raw[start + info.compress_size // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    else:  # a valid archive whose HDF5 file has its local heap's signature damaged
        weights = bytearray(members["model.weights.h5"])
        at = weights.index(b"HEAP")
        weights[at:at + 4] = b"HEAQ"
        with zipfile.ZipFile(path, "w") as zf:
            for info in infos:
                zf.writestr(info, bytes(weights) if info.filename == "model.weights.h5" else members[info.filename])
    with pytest.raises(CorruptArtifactError):
        load_any(path, trusted=damage.endswith("trusted"))


def test_hdf5_groups_linked_many_times_over_are_looked_into_once(tmp_path: Path) -> None:
    """30 groups, each hard-linked 8 times into the one before, and one linked into itself: a few KB that
    were 8**29 paths for the check to walk (it hung). Each object is looked into once, and the model loads."""
    h5py = require("h5py")
    model = sequential()
    model.save(str(tmp_path / "legacy.h5"))
    with h5py.File(tmp_path / "legacy.h5", "a") as h5:
        groups = [h5.create_group(f"extra/g{i}") for i in range(30)]
        for i in range(29):
            for j in range(8):
                groups[i][f"l{j}"] = groups[i + 1]
        groups[29]["loop"] = groups[0]
    model.save(str(tmp_path / "again.h5"))
    # in a process of its own, so that a walk that does not end fails the test instead of hanging the run
    proc = run_python(f"""
        import numpy as np, mlpersist
        a, b = (mlpersist.load_any(p) for p in ({str(tmp_path / "legacy.h5")!r}, {str(tmp_path / "again.h5")!r}))
        x = np.random.default_rng(3).normal(size=(8, 4)).astype("float32")
        np.testing.assert_array_equal(a.predict(x, verbose=0), b.predict(x, verbose=0))
        print("ok")
    """, timeout=120)
    assert proc.stdout.strip().endswith("ok"), proc.stderr


def test_a_bare_keras_file_and_a_legacy_h5_file_load_under_the_same_rules(tmp_path: Path) -> None:
    model = sequential()
    model.save(str(tmp_path / "model.keras"))
    same(load_any(tmp_path / "model.keras"), model)
    model.save(str(tmp_path / "legacy.h5"))
    same(load_any(tmp_path / "legacy.h5"), model)


@pytest.mark.parametrize("how", ["artifact", "artifact-large-copied", "bare-h5"])
def test_a_file_rewritten_in_place_right_after_its_check_does_not_reach_keras(
        how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keras reads by path: it gets a copy of the bytes that were hashed and vetted, so another model
    written over the file in place (same inode) between the check and Keras's read is not what loads.
    `artifact-large-copied` takes the path of a file over 16 MiB that a writer holds open (no read lease
    can be had: the copy is made in the kernel, sealed)."""
    from mlpersist import _bare, _digest, _reading

    model, other = sequential(), sequential()
    other.set_weights([w * 2.0 + 1.0 for w in other.get_weights()])
    if how == "bare-h5":
        target, module = tmp_path / "legacy.h5", _bare
        model.save(str(target))
        other.save(str(tmp_path / "other.h5"))
        replacement = (tmp_path / "other.h5").read_bytes()
    else:
        save_any(model, tmp_path / "m")
        target, module = tmp_path / "m" / "model.keras", _reading
        other.save(str(tmp_path / "other.keras"))
        replacement = (tmp_path / "other.keras").read_bytes()
    if how == "artifact-large-copied":
        monkeypatch.setattr(_digest, "MAP_BYTES", 1024)
    real = module.hash_file

    with open(target, "r+b") as writer:  # in place: the handle already open sees it
        def check_then_rewrite(f: Any, size: int, algo: str | None = None, **kw: Any) -> Any:
            out = real(f, size, algo, **kw)
            if os.fstat(f.fileno()).st_ino == target.stat().st_ino:
                writer.write(replacement)
                writer.truncate()
                writer.flush()
            return out

        monkeypatch.setattr(module, "hash_file", check_then_rewrite)
        same(load_any(target if how == "bare-h5" else tmp_path / "m"), model)
    assert target.read_bytes() == replacement  # the rewrite did happen, before Keras read anything


def test_a_large_file_keras_reads_in_place_cannot_be_written_before_keras_is_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No writer holds the file: it is hashed where it lies under a read lease, and Keras reads it there.
    A writer that comes right after the check is made to wait until Keras has read it (a non-blocking open
    is refused); its request breaks the lease, so the model Keras built is dropped and the load done again
    from a copy, which no longer matches the manifest once the writer is through: an IntegrityError, and
    never the other model."""
    import threading

    from mlpersist import _copies, _digest, _reading

    monkeypatch.setattr(_digest, "MAP_BYTES", 1024)
    model, other = sequential(), sequential()
    other.set_weights([w * 2.0 + 1.0 for w in other.get_weights()])
    save_any(model, tmp_path / "m")
    target = tmp_path / "m" / "model.keras"
    other.save(str(tmp_path / "other.keras"))
    replacement = (tmp_path / "other.keras").read_bytes()
    real_hash, real_copy = _reading.hash_file, _copies.named_copy
    refused: list[bool] = []
    writer: list[threading.Event] = []

    def check_then_rewrite(f: Any, size: int, algo: str | None = None, **kw: Any) -> Any:
        out = real_hash(f, size, algo, **kw)
        if os.fstat(f.fileno()).st_ino == target.stat().st_ino and not refused:
            refused.append(write_refused(target))
            writer.append(write_when_let_in(target, replacement))  # waits for the lease to be released
        return out

    def copy_once_written(*args: Any) -> Any:  # the load done again copies the file once the writer is through
        assert writer[0].wait(60)
        return real_copy(*args)

    monkeypatch.setattr(_reading, "hash_file", check_then_rewrite)
    monkeypatch.setattr(_copies, "named_copy", copy_once_written)
    with pytest.raises(IntegrityError, match=r"model\.keras"):
        load_any(tmp_path / "m")
    assert refused == [True]
    assert target.read_bytes()[:len(replacement)] == replacement


@pytest.mark.parametrize("trusted", [False, True], ids=["checked", "trusted"])
@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_a_config_asking_for_more_variables_than_the_weights_file_holds_is_refused(
        kind: str, trusted: bool, tmp_path: Path) -> None:
    """Keras builds and initialises every layer before it reads a weight: a 41 KB file whose config asked for a Dense
    layer of 3,000,000 units took 13 s and 3.4 GB to be refused. Here 5,000,000 units of 4 inputs (80 MB)."""
    k = keras()
    model, path = sequential(), tmp_path / f"model.{kind}"
    model.save(str(path))

    def widen(config: dict[str, Any]) -> None:
        first_dense(config)["config"]["units"] = 5_000_000

    if kind == "keras":
        rewrite(path, widen)
    else:
        h5py = require("h5py")
        with h5py.File(path, "r+") as h5:
            config = json.loads(h5.attrs["model_config"])
            widen(config)
            h5.attrs["model_config"] = json.dumps(config)
    variable = next(c for c in k.Variable.__mro__ if "__init__" in c.__dict__)
    init = variable.__init__
    with pytest.raises(CorruptArtifactError, match=r"config makes more than \d+ variable values, the most the \d+ "
                                                   "its weights file declares allow"):
        load_any(path, trusted=trusted)
    assert variable.__init__ is init  # Keras's class is as it was
    k.Variable(k.initializers.Zeros(), shape=(40_000_000,))  # outside a load, nothing counts


@pytest.mark.parametrize("optimizer", ["adam", "adam-amsgrad-ema-accumulating"])
def test_a_model_compiled_but_not_trained_loads_though_its_optimizer_adds_more_than_the_spare(
        optimizer: str, tmp_path: Path) -> None:
    """Saved before training, a compiled model's file holds its weights only; Keras builds the optimizer as it
    loads, and Adam makes two more values of each (up to five with amsgrad, EMA and gradient accumulation).
    The variable budget counts them: a 9M-weight model (the benchmark's has 50M) was refused."""
    k, np = keras(), require("numpy")
    from mlpersist.adapters._keras_variables import UNSAVED_VALUES

    k.utils.set_random_seed(0)
    model = k.Sequential([k.Input((3000,)), k.layers.Dense(3000)])
    assert 2 * model.count_params() > UNSAVED_VALUES
    kw = {"amsgrad": True, "use_ema": True, "gradient_accumulation_steps": 2} if optimizer != "adam" else {}
    model.compile(optimizer=k.optimizers.Adam(**kw), loss="mse")
    save_any(model, tmp_path / "m")
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):  # Keras's own, as natively
        loaded = load_any(tmp_path / "m")
    x = np.random.default_rng(0).normal(size=(4, 3000)).astype("float32")
    np.testing.assert_array_equal(k.ops.convert_to_numpy(loaded(x)), k.ops.convert_to_numpy(model(x)))
    made = sum(int(np.prod(v.shape)) for v in loaded.optimizer.variables)
    assert made >= (2 if optimizer == "adam" else 5) * model.count_params()  # built as it loaded
    plain = tmp_path / "plain.keras"  # saved without an optimizer, or loaded without compiling: none to allow for
    k.Sequential([k.Input((3000,)), k.layers.Dense(3000)]).save(str(plain))
    model.save(str(tmp_path / "compiled.keras"))
    for path, options in ((plain, {}), (tmp_path / "compiled.keras", {"compile": False})):
        rewrite(path, lambda config: first_dense(config)["config"].update(units=3000 + UNSAVED_VALUES // 3000 + 1))
        with pytest.raises(CorruptArtifactError, match="config makes more than"):
            load_any(path, **options)


@pytest.mark.parametrize("trusted", [False, True], ids=["checked", "trusted"])
def test_initial_values_the_file_replaces_are_not_drawn_and_those_it_lacks_are_drawn_as_keras_would(
        trusted: bool, tmp_path: Path) -> None:
    """Keras draws each variable's initial values, then overwrites them with the file's: a third of the load of
    the benchmark's 200 MB model. load_any makes them zero instead and draws only the values the file lacks:
    here a layer that saves its kernel and draws its offset at every build."""
    k, np = keras(), require("numpy")
    from keras_models import CountedNormal, HalfSaved

    inp = k.Input((4,))
    model = k.Model(inp, HalfSaved()(k.layers.Dense(5, kernel_initializer=CountedNormal(3))(inp)))
    for v in model.weights:
        v.assign(v + 1.0)  # unlike what any initializer gives
    save_any(model, tmp_path / "m")
    variable = [next(c for c in k.Variable.__mro__ if name in c.__dict__) for name in ("__init__", "assign")]
    originals = variable[0].__init__, variable[1].assign
    CountedNormal.calls = 0
    native = k.models.load_model(str(tmp_path / "m" / "model.keras"))
    assert CountedNormal.calls == 3  # Keras drew both kernels and the offset
    CountedNormal.calls = 0
    loaded = load_any(tmp_path / "m", trusted=trusted)
    assert CountedNormal.calls == 1  # the offset only: the file holds no value for it
    x = x_input(8, seed=3)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), native.predict(x, verbose=0))
    half, native_half = loaded.layers[-1], native.layers[-1]
    np.testing.assert_array_equal(np.asarray(half.offset), np.asarray(native_half.offset))
    assert np.all(np.asarray(half.offset) != 0)  # drawn, not left zero
    np.testing.assert_array_equal(np.asarray(half.kernel), np.asarray(model.layers[-1].kernel))
    assert (variable[0].__init__, variable[1].assign) == originals  # Keras's class is as it was
    fresh = k.Variable(CountedNormal(5), shape=(3,))  # outside a load, values are drawn as usual
    assert CountedNormal.calls == 2 and np.all(np.asarray(fresh) != 0)


def test_an_initializer_that_fails_for_a_variable_the_file_lacks_fails_the_load_as_in_keras(tmp_path: Path) -> None:
    """Called after Keras's own load returned (not as the variable was made): still a CorruptArtifactError."""
    k = keras()
    from keras_models import CountedNormal, HalfSaved

    inp = k.Input((4,))
    save_any(k.Model(inp, HalfSaved()(inp)), tmp_path / "m")
    CountedNormal.failing = True
    try:
        with pytest.raises(RuntimeError, match="this initializer is broken"):
            k.models.load_model(str(tmp_path / "m" / "model.keras"))
        with pytest.raises(CorruptArtifactError, match=r"could not rebuild the model: the initializer of the variable "
                                                       r"'.*offset.*', which the file does not hold, failed: "
                                                       "RuntimeError: this initializer is broken"):
            load_any(tmp_path / "m")
    finally:
        CountedNormal.failing = False
    load_any(tmp_path / "m")


def test_a_keras_without_the_internal_it_relies_on_loads_as_keras_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero start needs Keras's internal `in_stateless_scope`: where a Keras moved it, values are drawn."""
    from keras_models import CountedNormal, HalfSaved

    from mlpersist.adapters import _keras_variables

    k = keras()
    inp = k.Input((4,))
    model = k.Model(inp, HalfSaved()(inp))
    save_any(model, tmp_path / "m")
    monkeypatch.setattr(_keras_variables, "_IN_STATELESS_SCOPE", None)
    CountedNormal.calls = 0
    loaded = load_any(tmp_path / "m")
    assert CountedNormal.calls == 2  # the kernel and the offset, as Keras's own load draws them
    same(loaded, k.models.load_model(str(tmp_path / "m" / "model.keras")))
    same(loaded, model)


def test_a_legacy_h5_file_loads_without_drawing_the_values_it_replaces(tmp_path: Path) -> None:
    k = keras()
    from keras_models import CountedNormal

    inp = k.Input((4,))
    model = k.Model(inp, k.layers.Dense(2, kernel_initializer=CountedNormal(3))(k.layers.Dense(
        8, activation="relu", kernel_initializer=CountedNormal(4))(inp)))
    model.save(str(tmp_path / "legacy.h5"))
    CountedNormal.calls = 0
    native = k.models.load_model(str(tmp_path / "legacy.h5"))
    assert CountedNormal.calls == 2
    CountedNormal.calls = 0
    loaded = load_any(tmp_path / "legacy.h5")
    assert CountedNormal.calls == 0
    same(loaded, native)
    same(loaded, model)


def test_a_legacy_h5_with_a_lambda_is_refused(tmp_path: Path) -> None:
    k = keras()
    inp = k.Input((4,))
    k.Model(inp, k.layers.Lambda(lambda t: t + 1.0)(inp)).save(str(tmp_path / "legacy.h5"))
    with pytest.raises(UntrustedContentError, match="Lambda"):
        load_any(tmp_path / "legacy.h5")


def test_a_savedmodel_directory_is_recognised_and_loads_only_when_trusted(tmp_path: Path) -> None:
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"\x08\x01")
    with pytest.raises(UntrustedContentError, match=r"SavedModel.*trusted=True"):
        load_any(tmp_path / "sm")


def _tensorflow_backend() -> None:
    require("tensorflow")
    if keras().backend.backend() != "tensorflow":
        pytest.skip("export writes a TensorFlow SavedModel")


def test_an_export_loads_as_an_inference_layer_only_when_trusted(tmp_path: Path) -> None:
    _tensorflow_backend()
    np = require("numpy")
    model = sequential()
    save_any(model, tmp_path / "e", format="export")
    assert (tmp_path / "e" / "export" / "saved_model.pb").is_file()
    with pytest.raises(UntrustedContentError, match="SavedModel"):
        load_any(tmp_path / "e")
    layer = load_any(tmp_path / "e", trusted=True)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    (out,) = layer(x).values()
    assert np.array_equal(np.asarray(out), np.asarray(model(x)))


def test_a_bare_savedmodel_directory_loads_when_trusted(tmp_path: Path) -> None:
    _tensorflow_backend()
    np = require("numpy")
    model = sequential()
    model.export(str(tmp_path / "sm"))
    x = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    (out,) = load_any(tmp_path / "sm", trusted=True)(x).values()
    assert np.array_equal(np.asarray(out), np.asarray(model(x)))


def test_the_session_runs_the_backend_it_names_and_the_manifest_records_it(tmp_path: Path) -> None:
    """The keras session runs these tests on TensorFlow, keras-torch and keras-jax on theirs (KERAS_BACKEND)."""
    backend = keras().backend.backend()
    assert backend == os.environ.get("KERAS_BACKEND", "tensorflow")
    assert save_any(sequential(), tmp_path / "m").info["backend"] == backend


_SAVE_ON = """
    import numpy as np, keras, mlpersist
    assert keras.backend.backend() == {backend!r}
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(8, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = np.load({x!r})
    model.fit(x, np.arange(len(x)) % 3, epochs=2, verbose=0)
    mlpersist.save_any(model, {path!r})
    np.save({y!r}, model.predict(x, verbose=0))
"""
_LOAD_ON = """
    import numpy as np, keras, mlpersist
    from mlpersist._dispatch import detect
    assert keras.backend.backend() == {backend!r}
    model = mlpersist.load_any({path!r})
    assert detect(model) == "keras"  # on torch also a torch.nn.Module: the most specific class wins
    assert model.optimizer is not None and model.optimizer.iterations.numpy() > 0  # compile state came along
    np.save({y!r}, model.predict(np.load({x!r}), verbose=0))
"""


@pytest.mark.parametrize(("saved_on", "loaded_on"), [("tensorflow", "torch"), ("tensorflow", "jax"),
                                                     ("jax", "tensorflow"), ("torch", "jax")])
def test_a_model_saved_on_one_backend_loads_on_another(saved_on: str, loaded_on: str, tmp_path: Path) -> None:
    """Keras 3's archive is backend-neutral: a model trained and saved on one backend, loaded by load_any in a
    process on another, predicts the same (to float32 rounding: each backend has its own kernels)."""
    for backend in {saved_on, loaded_on}:
        require(backend)
    np = require("numpy")
    paths = {"x": str(tmp_path / "x.npy"), "path": str(tmp_path / "m")}
    np.save(paths["x"], x_input(16, seed=3))
    run_python(_SAVE_ON.format(backend=saved_on, y=str(tmp_path / "saved.npy"), **paths),
               env={"KERAS_BACKEND": saved_on})
    assert verify(tmp_path / "m") is None and inspect(tmp_path / "m").info["backend"] == saved_on
    run_python(_LOAD_ON.format(backend=loaded_on, y=str(tmp_path / "loaded.npy"), **paths),
               env={"KERAS_BACKEND": loaded_on})
    np.testing.assert_allclose(np.load(tmp_path / "loaded.npy"), np.load(tmp_path / "saved.npy"),
                               rtol=1e-5, atol=1e-6)
