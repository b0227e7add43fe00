"""Cost of mlpersist over each framework's native calls and over MLflow's flavors, measured in one run.

`nox -s bench`. Times are medians of repeated runs after a warm-up, in this process; peak memory is measured
for each operation in a fresh process. Writes benchmarks/RESULTS.md and benchmarks/ratios.png.
"""

from __future__ import annotations

import argparse
import compileall
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# --- cases: each builds a model and knows its native save/load -----------------------------------

# MLflow 3 saves scikit-learn models with skops by default, which refuses its own RandomForest on reload
# (sklearn.tree._tree.Tree is not a trusted type): its cloudpickle format is the one that saves every case.
MLFLOW_SKLEARN: dict[str, Any] = {"mlflow": "sklearn", "mlflow_options": {"serialization_format": "cloudpickle"}}


def case_tiny_logreg(build: bool = True) -> dict[str, Any]:
    import joblib
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(200, 5, random_state=0)
    model = LogisticRegression().fit(x, y) if build else None
    return {"model": model, "native_save": lambda m, p: joblib.dump(m, p / "model.joblib"),
            "native_load": lambda p: joblib.load(p / "model.joblib"), "repeat": 50, **MLFLOW_SKLEARN}


def case_forest_100(build: bool = True) -> dict[str, Any]:
    import joblib
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    x, y = make_classification(2000, 20, random_state=0)
    model = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1).fit(x, y) if build else None
    return {"model": model, "native_save": lambda m, p: joblib.dump(m, p / "model.joblib"),
            "native_load": lambda p: joblib.load(p / "model.joblib"), "repeat": 7, **MLFLOW_SKLEARN}


def _torch_net() -> Any:
    import torch

    return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(16)])  # 268M params, ~1.07 GB


def case_torch_1gb(build: bool = True) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        model = _torch_net() if build else None

    def native_load(p: Path) -> Any:  # the usual recipe: build the module, then load the state dict
        net = _torch_net()
        net.load_state_dict(torch.load(p / "weights.pt", weights_only=True))
        return net

    return {"model": model, "native_save": lambda m, p: torch.save(m.state_dict(), p / "weights.pt"),
            "native_load": native_load, "repeat": 9, "mlflow": "pytorch",
            # MLflow 3's default, pt2, needs an input example and then fixes the batch size: its pickle format
            "mlflow_options": {"serialization_format": "pickle"}}


def case_xgboost_500(build: bool = True) -> dict[str, Any]:
    import xgboost
    from sklearn.datasets import make_classification

    model = None
    if build:
        x, y = make_classification(20000, 20, n_informative=10, random_state=0)
        model = xgboost.XGBClassifier(n_estimators=500, max_depth=8, tree_method="hist", n_jobs=2).fit(x, y)

    def native_load(p: Path) -> Any:
        m = xgboost.XGBClassifier()
        m.load_model(str(p / "model.ubj"))
        return m

    return {"model": model, "native_save": lambda m, p: m.save_model(str(p / "model.ubj")),
            "native_load": native_load, "repeat": 7, "mlflow": "xgboost"}


def case_keras_200mb(build: bool = True) -> dict[str, Any]:
    import keras

    model = None
    if build:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4096,))] + [keras.layers.Dense(4096) for _ in range(3)])  # 50M params
        model.compile(optimizer="adam", loss="mse")
    return {"model": model, "native_save": lambda m, p: m.save(str(p / "model.keras")),
            "native_load": lambda p: keras.models.load_model(str(p / "model.keras")), "repeat": 11, "mlflow": "keras"}


CASES: dict[str, Callable[..., dict[str, Any]]] = {
    "tiny-logreg": case_tiny_logreg, "forest-100": case_forest_100, "torch-1gb": case_torch_1gb,
    "xgboost-500": case_xgboost_500, "keras-200mb": case_keras_200mb,
}


# --- measurement ---------------------------------------------------------------------------------

Op = tuple[Callable[[], Any], Callable[[], Any], int]  # the call, what to do before each, how many times


def interleaved(*groups: dict[str, Op]) -> dict[str, float]:
    """The median time of each op, the ops run in turn, round after round, after one warm-up each.

    This VM's speed drifts by tens of percent within minutes: run one op's repeats, then the next's,
    and a ratio compares calls made in different spells. In turn, each ratio compares calls made in
    the same minutes. A round runs the groups in order (the saves, then the loads, which read what was
    just saved), and each group's ops in an order rotated by one every round: a call's place in the
    round changes its time (in a run with a fixed order, the native Keras load, first of the loads, took
    1.32x MLflow's, which makes the same Keras call last), and each op takes each place in turn.

    Before each call, untimed, `os.sync()` writes out what earlier calls left in the page cache: a save
    that does not fsync (the native one, MLflow's) leaves its file to the kernel, which wrote it to the
    disk during the calls that came next, and an fsync then waited for that file as well as its own.
    """
    ops = {k: op for group in groups for k, op in group.items()}
    for fn, before, _ in ops.values():
        before()
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in ops}
    for i in range(max(n for _, _, n in ops.values())):
        for k in [k for group in groups for k in _rotated(list(group), i)]:
            fn, before, n = ops[k]
            if i >= n:
                continue
            before()
            os.sync()
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rotated(names: list[str], i: int) -> list[str]:
    """`names` starting at its `i`-th (modulo its length)."""
    return names[i % len(names):] + names[:i % len(names)] if names else names


def time_case(name: str, c: dict[str, Any], work: Path) -> dict[str, float]:
    import mlpersist

    model, repeat = c["model"], c["repeat"]
    native_dir, ours = work / f"{name}-native", work / f"{name}-mlpersist"

    def fresh(p: Path) -> Callable[[], None]:
        def reset() -> None:
            shutil.rmtree(p, ignore_errors=True)
            if p == native_dir:
                p.mkdir()
        return reset

    def durable() -> None:  # what save_any guarantees: on disk, not only in the page cache
        c["native_save"](model, native_dir)
        fsync_tree(native_dir)

    def nothing() -> None:
        pass

    saves: dict[str, Op] = {
        "native_save": (lambda: c["native_save"](model, native_dir), fresh(native_dir), repeat),
        "native_save_fsync": (durable, fresh(native_dir), repeat),
        "save_any": (lambda: mlpersist.save_any(model, ours), fresh(ours), repeat),
    }
    loads: dict[str, Op] = {
        "native_load": (lambda: c["native_load"](native_dir), nothing, repeat),
        "load_any": (lambda: mlpersist.load_any(ours), nothing, repeat),
        # what a signed artifact (or trusted=True) costs: digests checked, the checks of the framework's input not
        "load_any_trusted": (lambda: mlpersist.load_any(ours, trusted=True), nothing, repeat),
    }
    flavor = mlflow_flavor(c)
    if flavor is not None:  # MLflow as its users call it: the flavor's save_model/load_model, defaults
        mlflow_dir = work / f"{name}-mlflow"
        few = min(repeat, 5)  # its save infers pip requirements in a subprocess: seconds per call
        options = c.get("mlflow_options", {})
        saves["mlflow_save"] = (lambda: flavor.save_model(model, str(mlflow_dir), **options), fresh(mlflow_dir), few)
        loads["mlflow_load"] = (lambda: flavor.load_model(str(mlflow_dir)), nothing, few)
    return interleaved(saves, loads)


def fsync_tree(root: Path) -> None:
    """Fsync every file under `root`, then `root` itself."""
    for p in sorted(root.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mlflow_flavor(c: dict[str, Any]) -> Any:
    """The MLflow flavor module of a case (`mlflow.sklearn`, ...), or None when MLflow is not installed."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        return None
    return importlib.import_module(f"mlflow.{c['mlflow']}")  # installed but broken: fail, never skip quietly


def peak_rss(name: str, op: str, work: Path) -> dict[str, float]:
    """Peak RSS growth (bytes) of one operation, in a fresh process, the process's peak RSS, and the call's time.

    The peak is reset just before the operation (`/proc/self/clear_refs` = 5) and read as VmHWM after
    it, so neither the interpreter start, nor the imports, nor building the model to save is counted.
    The time (seconds) is that of the call alone, the first of its kind in the process: what a service
    that loads its model once at start pays, which the medians of warm calls can hide (memory the
    process has not touched yet may cost far more to allocate than memory it just freed).
    """
    code = f"""
import json, pathlib, sys
sys.path.insert(0, {str(HERE.parent)!r})
import benchmarks.bench as b
import mlpersist
name, op, work = {name!r}, {op!r}, pathlib.Path({str(work)!r})
c = b.CASES[name](build=op in ("native_save", "save_any"))
if name.startswith("torch"):  # imports are not the operation: load them before measuring
    import safetensors.torch, torch, mlpersist.adapters.torch
elif name.startswith("keras"):
    import keras, mlpersist.adapters.keras
elif name.startswith("xgboost"):
    import xgboost, mlpersist.adapters.xgboost
else:
    import joblib, mlpersist.adapters.sklearn
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import gc, threading, time
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
peak, running = [base], [True]
def sample():  # VmHWM is updated lazily by the kernel: sample the RSS as well
    while running[0]:
        peak[0] = max(peak[0], status("VmRSS"))
        time.sleep(0.002)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t0 = time.perf_counter()
if op == "native_save":
    c["native_save"](c["model"], work / (name + "-native"))
elif op == "save_any":
    mlpersist.save_any(c["model"], work / (name + "-peak"), overwrite=True)
elif op == "native_load":
    model = c["native_load"](work / (name + "-native"))
else:
    model = mlpersist.load_any(work / (name + "-mlpersist"))
seconds = time.perf_counter() - t0
if name.startswith("torch") and op in ("native_load", "load_any"):  # touch every weight: lazily mapped pages count too
    total = sum(float(t.float().sum()) for t in model.state_dict().values())
running[0] = False
sampler.join()
top = max(peak[0], status("VmHWM"), status("VmRSS"))
print(json.dumps({{"growth": top - base, "peak": top, "seconds": seconds}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env=_with_bytecode())
    if proc.returncode:
        raise RuntimeError(f"peak_rss({name}, {op}) failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"growth": float(out["growth"]), "peak": float(out["peak"]), "seconds": float(out["seconds"])}


def _with_bytecode() -> dict[str, str]:
    """The environment, with bytecode written and read as an installed package has it (pip compiles it).

    PYTHONDONTWRITEBYTECODE would otherwise make every fresh process compile mlpersist's sources again
    (an editable install has no .pyc until a run writes them): ~6 ms of a first load, which no user pays.
    """
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def import_time() -> float:
    """Median extra wall time of `import mlpersist` over a bare interpreter start (20 runs each)."""
    env = _with_bytecode()  # the first run writes the .pyc files

    def run(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        return time.perf_counter() - t0

    codes = ("import mlpersist", "pass")
    for code in codes:
        run(code)  # warm-up
    ts: dict[str, list[float]] = {code: [] for code in codes}
    for _ in range(20):  # in turn, as the cases' calls: the machine's drift falls on both alike
        for code in codes:
            ts[code].append(run(code))
    return statistics.median(ts["import mlpersist"]) - statistics.median(ts["pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.cases.split(",") if n]
    for package in ("mlpersist", "mlpersist.adapters"):  # the fresh processes find .pyc files, as once installed
        for folder in getattr(importlib.util.find_spec(package), "submodule_search_locations", None) or ():
            compileall.compile_dir(folder, quiet=1)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MLPERSIST_BENCH_DIR")) as tmp:
        work = Path(tmp)
        for name in names:
            c = CASES[name]()
            t = time_case(name, c, work)
            del c
            gc.collect()
            mem = {} if args.no_memory else {op: peak_rss(name, op, work) for op in
                                             ("native_save", "save_any", "native_load", "load_any")}
            size = sum(f.stat().st_size for f in (work / f"{name}-mlpersist").rglob("*") if f.is_file())
            rows.append({"case": name, "size": size, **t, **{f"rss_{k}": v["growth"] for k, v in mem.items()},
                         **{f"peak_{k}": v["peak"] for k, v in mem.items()},
                         **{f"fresh_{k}": v["seconds"] for k, v in mem.items()}})
            print(json.dumps(rows[-1]), flush=True)
    imp = import_time()
    write(args.out, rows, imp)
    chart(args.out.with_name("ratios.png"), rows)
    print(args.out.read_text())


def chart(out: Path, rows: list[dict[str, Any]]) -> None:
    """A bar chart of every time ratio (lower is better; 1.0 = as fast as the reference)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("save_any / native save", "save_any", "native_save"), ("load_any / native load", "load_any",
              "native_load")]
    if rows and "mlflow_save" in rows[0]:
        series += [("save_any / MLflow save", "save_any", "mlflow_save"),
                   ("load_any / MLflow load", "load_any", "mlflow_load")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(series)
    for i, (label, num, den) in enumerate(series):
        ax.bar([x + i * width for x in range(len(rows))], [r[num] / r[den] for r in rows], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.1, color="grey", linewidth=0.8, linestyle="--", label="1.10x target")
    ax.set_yscale("log")
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(rows))], [r["case"] for r in rows])
    ax.set_ylabel("time ratio (log scale; below 1 = faster)")
    ax.set_title(f"mlpersist vs native calls and MLflow ({platform.machine()}, {os.cpu_count()} CPUs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def write(out: Path, rows: list[dict[str, Any]], imp: float) -> None:
    lines = [
        "# Benchmark results", "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Produced by `nox -s bench` (benchmarks/bench.py).",
        "", "Times: median of repeated runs after a warm-up; a case's calls run in turn, round after round (the saves, "
        "then the loads; within each, the order rotated by one every round, so that each call takes every place), "
        "so that each ratio compares calls made in the same minutes of this machine; before each "
        "call, untimed, `os.sync()` writes out what the calls before it left in the page cache. save_any "
        "includes the digest (BLAKE3) of every file and fsync; load_any includes verifying every digest. Ratios are "
        "to the framework's native call in the same run. The native save leaves its file in the page cache; "
        "`native + fsync` is the same call followed by an fsync of its file and directory, the durability "
        "save_any guarantees.", "",
        "| case | artifact | native save | native + fsync | save_any | ratio | ratio to native + fsync "
        "| native load | load_any | ratio | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['size'] / 1e6:.1f} MB | {r['native_save'] * 1e3:.1f} ms"
            f" | {r['native_save_fsync'] * 1e3:.1f} ms | {r['save_any'] * 1e3:.1f} ms"
            f" | {r['save_any'] / r['native_save']:.2f}x | {r['save_any'] / r['native_save_fsync']:.2f}x"
            f" | {r['native_load'] * 1e3:.1f} ms"
            f" | {r['load_any'] * 1e3:.1f} ms"
            f" | {r['load_any'] / r['native_load']:.2f}x | {r['native_load'] / r['load_any']:.1f}x |")
    if rows and "mlflow_save" in rows[0]:
        lines += ["", "Against MLflow's flavor `save_model`/`load_model` (defaults, except cloudpickle for "
                  "scikit-learn, whose skops default refuses the RandomForest, and pickle for torch, whose pt2 "
                  "default needs an example and fixes the batch size), same models, same run:", "",
                  "| case | MLflow save | save_any | ratio | MLflow load | load_any | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['mlflow_save'] * 1e3:.1f} ms | {r['save_any'] * 1e3:.1f} ms"
                         f" | {r['save_any'] / r['mlflow_save']:.3g}x | {r['mlflow_load'] * 1e3:.1f} ms"
                         f" | {r['load_any'] * 1e3:.1f} ms | {r['load_any'] / r['mlflow_load']:.3g}x |")
    if rows and "load_any_trusted" in rows[0]:
        lines += ["", "Trusted loads (`trusted=True`, or a manifest signed by a key the caller configured: digests and "
                  "sizes still checked; the allow-list and mlpersist's checks of the framework's input, such as tree "
                  "indices and the Keras config, skipped), same run:", "",
                  "| case | native load | load_any | load_any, trusted | ratio to native |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['native_load'] * 1e3:.1f} ms | {r['load_any'] * 1e3:.1f} ms"
                         f" | {r['load_any_trusted'] * 1e3:.1f} ms | {r['load_any_trusted'] / r['native_load']:.2f}x |")
    lines += ["", "Added milliseconds (tiny model = the fixed cost of the layer):", ""]
    for r in rows:
        lines.append(f"- {r['case']}: save +{(r['save_any'] - r['native_save']) * 1e3:.2f} ms, "
                     f"load +{(r['load_any'] - r['native_load']) * 1e3:.2f} ms")
    if rows and "rss_load_any" in rows[0]:
        lines += ["", "Peak memory growth of one operation in a fresh process (the highest of VmHWM and a "
                  "2 ms RSS sampler, minus VmRSS before it; "
                  "torch loads then read every weight, so lazily mapped pages are counted):", "",
                  "| case | native save | save_any | ratio | native load | load_any | ratio | load_any / artifact |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['case']} | {r['rss_native_save'] / 1e6:.0f} MB | {r['rss_save_any'] / 1e6:.0f} MB"
                f" | {r['rss_save_any'] / max(r['rss_native_save'], 1):.2f}x | {r['rss_native_load'] / 1e6:.0f} MB"
                f" | {r['rss_load_any'] / 1e6:.0f} MB | {r['rss_load_any'] / max(r['rss_native_load'], 1):.2f}x"
                f" | {r['rss_load_any'] / r['size']:.2f}x |")
        lines += ["", "Peak RSS of that process (the interpreter, the framework and the model included: the "
                  "measure the 1.2x target is about), save_any and load_any over the native call's:", "",
                  "| case | native save | save_any | ratio | native load | load_any | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['case']} | {r['peak_native_save'] / 1e6:.0f} MB | {r['peak_save_any'] / 1e6:.0f} MB"
                f" | {r['peak_save_any'] / r['peak_native_save']:.2f}x | {r['peak_native_load'] / 1e6:.0f} MB"
                f" | {r['peak_load_any'] / 1e6:.0f} MB | {r['peak_load_any'] / r['peak_native_load']:.2f}x |")
        lines += ["", "One call in a fresh process (the same processes: imports done and the model to save built "
                  "first; the first save or load of the process, timed alone, once, so noisier than the medians "
                  "above; what a service that loads its model once at start pays):", "",
                  "| case | native save | save_any | ratio | native load | load_any | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['case']} | {r['fresh_native_save'] * 1e3:.1f} ms | {r['fresh_save_any'] * 1e3:.1f} ms"
                f" | {r['fresh_save_any'] / r['fresh_native_save']:.2f}x | {r['fresh_native_load'] * 1e3:.1f} ms"
                f" | {r['fresh_load_any'] * 1e3:.1f} ms | {r['fresh_load_any'] / r['fresh_native_load']:.2f}x |")
    lines += ["", f"`import mlpersist`: +{imp * 1e3:.1f} ms over a bare interpreter start (medians of 20 runs of "
              "each, run in turn).", "",
              "![ratios](ratios.png)", ""]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
