"""Load copies of a saved model with a few bytes of its payload changed, each in a forked child: tally what happened.

Run as a script in a fresh interpreter (`mutated_loads` does), so that the frameworks' thread pools are
never started before a fork (OpenMP is not fork-safe) and a crash ends a child, not the test run (Keras
models load in the script's own process: TensorFlow hangs in a forked child; a crash ends the script). The
manifest of each copy is rewritten to match it, as an attacker would: the digests are not what is tested.

Outcomes per copy: "loaded" (and used), "refused" (a PersistError while loading), "raw-load" (any other
exception while loading: a bug, the error must be typed), "raw-use" (a Python exception when the loaded
model is used: the pickle's attributes were changed; harmless), "signal-N" (the child died: a crash).
"""

from __future__ import annotations

import collections
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import warnings
import zipfile
from hashlib import sha256
from pathlib import Path
from typing import Any

os.environ["OMP_NUM_THREADS"] = "1"  # before any framework starts a thread pool
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _build(kind: str) -> tuple[Any, Any, dict[str, Any]]:
    """The model of `kind`, a function that uses it, and save_any's options."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(300, 6))
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)  # numpy only: the torch and Keras sessions have no sklearn
    if kind in ("forest", "forest-bz2"):  # forest-bz2: its joblib stream compressed, the changes made inside it
        from sklearn.ensemble import RandomForestClassifier
        options = {"compress": ("bz2", 1)} if kind == "forest-bz2" else {}
        return RandomForestClassifier(10, max_depth=4, random_state=0).fit(x, y), lambda m: m.predict_proba(x), options
    if kind == "hist-gbm":
        from sklearn.ensemble import HistGradientBoostingClassifier
        return HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(x, y), lambda m: m.predict_proba(x), {}
    if kind in ("xgboost-ubj", "xgboost-json"):
        import xgboost
        model = xgboost.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1).fit(x, y)
        return model, lambda m: m.predict_proba(x), {"format": kind.rpartition("-")[2]}
    if kind == "xgboost-many":  # 200 trees: read as two runs (ids past 126 take two bytes), with a tree between
        import xgboost
        model = xgboost.XGBClassifier(n_estimators=200, max_depth=3, n_jobs=1).fit(x, y)
        return model, lambda m: m.predict_proba(x), {}
    if kind == "xgboost-multiclass":  # an output group per tree (`tree_info`), iterations of three trees
        import xgboost
        model = xgboost.XGBClassifier(n_estimators=4, max_depth=3, n_jobs=1).fit(x, y + (x[:, 3] > 0.5))
        return model, lambda m: m.predict_proba(x), {}
    if kind == "xgboost-vector":  # vector-leaf trees: a leaf's outputs at its index in `leaf_weights`
        import xgboost
        model = xgboost.XGBRegressor(n_estimators=4, max_depth=3, n_jobs=1, tree_method="hist",
                                     multi_strategy="multi_output_tree").fit(x, x[:, :3])
        return model, lambda m: m.predict(x), {}
    if kind in ("lightgbm", "lightgbm-linear"):
        import lightgbm
        import mlpersist_lightgbm  # noqa: F401 - registered by its entry point; imported to fail early here
        if kind == "lightgbm-linear":  # a linear model in each leaf: its features index the row
            model = lightgbm.LGBMRegressor(n_estimators=10, verbose=-1, n_jobs=1, linear_tree=True)
            return model.fit(x, x[:, 0] + x[:, 1]), lambda m: m.predict(x), {}
        model = lightgbm.LGBMClassifier(n_estimators=10, verbose=-1, n_jobs=1).fit(x, y)
        return model, lambda m: m.predict_proba(x), {}
    if kind in ("keras", "keras-weights"):
        import keras
        keras.utils.set_random_seed(0)  # the same weights, so the same copies, every run
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
        model.compile("adam", "mse")
        return model, lambda m: m.predict(x, verbose=0), {}
    if kind == "torch":
        import torch
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return net, lambda m: m(torch.as_tensor(x, dtype=torch.float32)), {}
    raise SystemExit(f"unknown kind {kind}")


def _changed(data: bytes, rng: random.Random) -> bytes:
    """`data` with one to four bytes set to an edge value, a random one, or one bit flipped."""
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4])):
        at = rng.randrange(len(b))
        b[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256), b[at] ^ (1 << rng.randrange(8))])
    return bytes(b)


def _in_bz2(stream: bytes, rng: random.Random) -> bytes:
    """The bz2 stream with its content changed and compressed again (a matching CRC: the content is tested)."""
    import bz2

    return bz2.compress(_changed(bz2.decompress(stream), rng), 1)


def _in_archive(archive: bytes, member: str, rng: random.Random) -> bytes:
    """The zip archive with `member` changed and written again with a matching CRC."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, _changed(data, rng) if info.filename == member else data)
    return out.getvalue()


def _outcome(mlpersist: Any, path: Path, use: Any) -> str:
    stage = "load"
    try:
        loaded = mlpersist.load_any(path)
        stage = "use"
        use(loaded)
    except mlpersist.PersistError:
        return "refused" if stage == "load" else "raw-use"
    except BaseException as exc:  # what escapes is what is being tallied
        return f"raw-{stage}:{type(exc).__name__}: {str(exc)[:120]}"
    return "loaded"


def _in_child(mlpersist: Any, path: Path, use: Any) -> str:
    """`_outcome` in a forked child, or the signal that ended it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: load, use, report in one line, exit without cleanup
        os.close(read)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        signal.alarm(60)  # a hang is a finding too (SIGALRM)
        os.write(write, _outcome(mlpersist, path, use).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        outcome = f.read().decode(errors="replace")
    return f"signal-{os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else outcome


def main(kind: str, count: int, seed: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    import mlpersist

    model, use, options = _build(kind)
    base = Path(tempfile.mkdtemp()) / "artifact"
    mlpersist.save_any(model, base, **options)
    manifest = json.loads((base / "manifest.json").read_text())
    name = max(manifest["files"], key=lambda n: manifest["files"][n]["size"])
    original = (base / name).read_bytes()
    rng = random.Random(seed)
    tally: collections.Counter[str] = collections.Counter()
    raw: list[str] = []
    copy = base.parent / "copy"
    for _ in range(count):
        data = (_in_archive(original, "model.weights.h5", rng) if kind == "keras-weights"
                else _in_bz2(original, rng) if kind == "forest-bz2" else _changed(original, rng))
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        (copy / name).write_bytes(data)
        manifest["files"][name] = {"size": len(data), "digest": "sha256:" + sha256(data).hexdigest()}
        (copy / "manifest.json").write_text(json.dumps(manifest))
        load = _outcome if kind.startswith("keras") else _in_child  # TensorFlow hangs in a forked child
        outcome = load(mlpersist, copy, use)
        key = outcome.partition(":")[0]
        tally[key] += 1
        if key in ("raw-load",) or key.startswith("signal"):
            raw.append(outcome)
            if os.environ.get("MUTANTS_KEEP"):  # where to keep the payloads found, to study them
                Path(os.environ["MUTANTS_KEEP"], f"{kind}-{len(raw)}").write_bytes(data)
                Path(os.environ["MUTANTS_KEEP"], f"{kind}-original").write_bytes(original)
    return {"tally": dict(tally), "findings": raw}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
