"""Fuzz scikit-learn's fitted state against mlpersist's checked load, one forked process per edit.

Each estimator is fitted once on synthetic data. Every number and array in its fitted state is then
edited, one edit at a time: the estimator's own attributes, those of the estimators and containers it
holds, and the pickled state of compiled objects (a Tree's nodes, a KDTree's arrays, a DistanceMetric's,
a predictor's nodes; of many alike, such as a forest's trees, the first and the last). The edits: an
integer set to 0, -1, +-10**6, 2**31, 10**12; a float to 0, -1, nan, +-inf, 1e308; an array cut, emptied,
grown, an element (or a field of a record) set out of range, its dtype or memory order changed. Each
edit runs in a child process forked for it, which writes the edited model with joblib.dump (as anyone
can), loads that file with `load_any` (the checked load) and, if it loads, calls every predict,
transform and score method.

A child killed by a signal, ended by the library itself (OpenMP exits on a bad thread count), still
running after --timeout seconds, or whose load raised anything but a PersistError ("untyped"), is a
finding; a refusal, or a Python exception from a method, is not. The known limits (docs/security.md) are
reported apart: a get_feature_names_out that runs out of time, and the counts in SLOW_BY_DESIGN.

    python tests/adapters/sklearn_fuzz.py            # the curated models with compiled state (7 minutes)
    python tests/adapters/sklearn_fuzz.py --all      # and every estimator all_estimators() fits with defaults
    nox -s fuzz; nox -s fuzz-compat                  # --all, on the newest and the oldest releases

Rerun it when scikit-learn's minor version moves: a new release's fitted state is new input to the checks.
--trusted loads with trusted=True (no checks): that run must find crashes, or the fuzzer finds nothing.
Prints one JSON object (the counts, models that did not fit, findings and limits, each with the edit and
the step it came at); --keep DIR keeps each finding's file, to load again by hand. Exits 1 on a finding.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np

Step = tuple[str, Any]  # ("attr", name) | ("item", index) | ("key", key) | ("state", index) | ("arg", index)
Route = tuple[Step, ...]

INTS = (0, -1, 10**6, -(10**6), 2**31, 10**12)
FLOATS = (0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e308)
REFUSED, ANSWERED, UNBUILDABLE, UNTYPED = 3, 4, 5, 6  # a child's exit codes; anything else is a finding
METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function", "transform", "score_samples",
           "kneighbors", "radius_neighbors", "apply", "decision_path", "inverse_transform", "staged_predict",
           "dbscan_clustering", "get_feature_names_out")
DEPTH = 10
# (model, value): counts a user may set as high as they like, which a method then loops over; a model
# fitted so is as slow, so no check can tell it from a crafted one (AdditiveChi2Sampler's transform takes
# sample_steps steps once sample_interval is set, which scikit-learn 1.3 keeps fitted as _sample_interval)
SLOW_BY_DESIGN = {("AdditiveChi2Sampler", ".sample_steps")}


# ---- the models ---------------------------------------------------------------------------------------

def _data(kind: str) -> tuple[Any, Any, Any]:
    from sklearn.datasets import make_classification, make_regression

    if kind == "text":
        words = "red green blue cyan black white grey pink gold teal".split()
        rng = np.random.default_rng(0)
        docs = [" ".join(rng.choice(words, 4)) for _ in range(60)]
        return docs, np.arange(60) % 3, docs[:12]
    if kind == "dicts":
        rows = [{"a": i % 3, "b": i % 5, f"c{i % 7}": 1.0} for i in range(60)]
        return rows, np.arange(60) % 3, rows[:12]
    if kind == "categories":
        rng = np.random.default_rng(0)
        x = rng.choice(np.array(["a", "b", "c", "d", "e", "rare"], dtype=object), size=(60, 2),
                       p=[0.3, 0.3, 0.2, 0.1, 0.08, 0.02])
        return x, np.arange(60) % 3, x[:12]
    if kind == "regression":
        x, y = make_regression(n_samples=60, n_features=5, random_state=0)
        return x, y, x[:12]
    x, y = make_classification(n_samples=60, n_features=5, n_informative=3, n_classes=3, random_state=0)
    if kind in ("positive", "counts", "two-targets", "labels", "binary", "positive-target"):
        x = np.round(np.abs(x) * 3) if kind == "counts" else np.abs(x)
        y = (np.column_stack([y == 0, y == 1]).astype(int) if kind in ("two-targets", "labels") else
             y % 2 if kind == "binary" else y + 1.0 if kind == "positive-target" else y)
    if kind == "one-column":
        x = x[:, :1]
    if kind == "kernel":  # a linear kernel of the rows with themselves, and with the first 12
        return x @ x.T, y, x[:12] @ x.T
    if kind == "coded":  # a first column of small integer codes, for categorical splits
        x[:, 0] = np.arange(60) % 4
    if kind == "sparse":  # scipy's csr matrix: its index arrays are state too
        from scipy import sparse

        x = sparse.csr_matrix(np.where(np.abs(x) > 1, x, 0))
    return x, y, x[:12]


def curated() -> list[tuple[str, Callable[[], Any], str]]:
    """(name, estimator factory, data kind): the models whose predict runs compiled code on fitted state."""
    from sklearn import cluster, ensemble, neighbors, preprocessing, svm, tree
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return [
        ("tree", lambda: tree.DecisionTreeClassifier(max_depth=4, random_state=0), "classes"),
        ("extra-trees", lambda: ensemble.ExtraTreesRegressor(n_estimators=2, max_depth=4, random_state=0),
         "regression"),
        ("boosting", lambda: ensemble.GradientBoostingClassifier(n_estimators=2, max_depth=2, random_state=0),
         "classes"),
        ("hist-boosting", lambda: ensemble.HistGradientBoostingClassifier(
            max_iter=2, max_depth=3, categorical_features=[0], random_state=0), "coded"),
        ("isolation", lambda: ensemble.IsolationForest(n_estimators=2, random_state=0), "classes"),
        ("kd-tree", lambda: neighbors.KNeighborsClassifier(3, algorithm="kd_tree"), "classes"),
        ("ball-tree", lambda: neighbors.KNeighborsRegressor(3, algorithm="ball_tree", metric="manhattan"),
         "regression"),
        ("brute", lambda: neighbors.KNeighborsClassifier(3, algorithm="brute"), "classes"),
        ("lof", lambda: neighbors.LocalOutlierFactor(5, novelty=True), "classes"),
        ("svc", lambda: svm.SVC(probability=True, random_state=0), "classes"),
        ("svc-sparse", lambda: svm.SVC(random_state=0), "sparse"),
        ("brute-sparse", lambda: neighbors.KNeighborsClassifier(3, algorithm="brute", metric="manhattan"), "sparse"),
        ("nu-svr", svm.NuSVR, "regression"),
        ("kmeans", lambda: cluster.KMeans(3, n_init=1, random_state=0), "classes"),
        ("bisecting", lambda: cluster.BisectingKMeans(3, random_state=0), "classes"),
        ("hdbscan", lambda: cluster.HDBSCAN(copy=True), "classes"),
        ("one-hot", lambda: preprocessing.OneHotEncoder(min_frequency=5, handle_unknown="infrequent_if_exist",
                                                        drop="first"), "categories"),
        ("spline", lambda: preprocessing.SplineTransformer(n_knots=4), "classes"),
        ("text", lambda: make_pipeline(CountVectorizer(), LogisticRegression()), "text"),
        ("tfidf", lambda: make_pipeline(TfidfVectorizer(), svm.LinearSVC()), "text"),
    ]


def every_estimator() -> list[tuple[str, Callable[[], Any], str]]:
    """Every estimator scikit-learn lists, with its defaults, on the data its kind takes.

    Those that need arguments (meta-estimators) or other data (counts, two targets) get them from
    `_needs`; the label encoders, which transform y, not X, are skipped.
    """
    from sklearn.base import ClassifierMixin, RegressorMixin
    from sklearn.utils import all_estimators

    wrapping, by_data = _needs()
    out: list[tuple[str, Callable[[], Any], str]] = []
    for name, cls in all_estimators():
        if name in wrapping:
            make, kind = wrapping[name]
            out.append((name, functools.partial(make, cls), kind))
            continue
        kind = by_data.get(name) or ("classes" if issubclass(cls, ClassifierMixin) else (
            "regression" if issubclass(cls, RegressorMixin) else "positive"))
        out.append((name, cls, kind))
    return out


def _needs() -> tuple[dict[str, tuple[Callable[[Any], Any], str]], dict[str, str]]:
    """The estimators that fit with defaults on no data `_data` makes: (what each meta-estimator wraps, made
    from its class, and its data kind; the data kind of the others)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    def tree() -> Any:
        return DecisionTreeClassifier(max_depth=3, random_state=0)

    def pair() -> list[tuple[str, Any]]:
        return [("tree", tree()), ("linear", LogisticRegression())]

    wrapping: dict[str, tuple[Callable[[Any], Any], str]] = {
        "ClassifierChain": (lambda c: c(tree()), "labels"),
        "MultiOutputClassifier": (lambda c: c(tree()), "labels"),
        "MultiOutputRegressor": (lambda c: c(DecisionTreeRegressor(max_depth=3)), "two-targets"),
        "RegressorChain": (lambda c: c(DecisionTreeRegressor(max_depth=3)), "two-targets"),
        "OneVsOneClassifier": (lambda c: c(tree()), "classes"),
        "OneVsRestClassifier": (lambda c: c(tree()), "classes"),
        "OutputCodeClassifier": (lambda c: c(tree(), random_state=0), "classes"),
        "RFE": (lambda c: c(tree(), n_features_to_select=2), "classes"),
        "RFECV": (lambda c: c(tree(), cv=2), "classes"),
        "SelectFromModel": (lambda c: c(tree()), "classes"),
        "SelfTrainingClassifier": (lambda c: c(tree()), "classes"),
        "SequentialFeatureSelector": (lambda c: c(tree(), n_features_to_select=2, cv=2), "classes"),
        "GridSearchCV": (lambda c: c(tree(), {"max_depth": [2, 3]}, cv=2), "classes"),
        "RandomizedSearchCV": (lambda c: c(tree(), {"max_depth": [2, 3]}, n_iter=1, cv=2, random_state=0),
                               "classes"),
        "FixedThresholdClassifier": (lambda c: c(LogisticRegression()), "binary"),
        "TunedThresholdClassifierCV": (lambda c: c(LogisticRegression(), cv=2), "binary"),
        "StackingClassifier": (lambda c: c(pair(), cv=2), "classes"),
        "StackingRegressor": (lambda c: c([("tree", DecisionTreeRegressor(max_depth=3)), ("ridge", Ridge())], cv=2),
                              "regression"),
        "FrozenEstimator": (lambda c: c(tree().fit(*_data("classes")[:2])), "classes"),
        "QuadraticDiscriminantAnalysis": (lambda c: c(reg_param=0.1), "classes"),
        "SparseCoder": (lambda c: c(np.eye(5)[:3]), "positive"),
        "VotingClassifier": (lambda c: c(pair()), "classes"),
        "VotingRegressor": (lambda c: c([("tree", DecisionTreeRegressor(max_depth=3))]), "regression"),
        "Pipeline": (lambda c: c([("scale", StandardScaler()), ("tree", tree())]), "classes"),
        "FeatureUnion": (lambda c: c([("pca", PCA(2)), ("scale", StandardScaler())]), "positive"),
        "ColumnTransformer": (lambda c: c([("pca", PCA(1), [0, 1]), ("scale", StandardScaler(), [2, 3])]),
                              "positive"),
        "GaussianRandomProjection": (lambda c: c(n_components=3, random_state=0), "positive"),
        "SparseRandomProjection": (lambda c: c(n_components=3, random_state=0), "positive"),
    }
    by_data = {"CategoricalNB": "counts", "ComplementNB": "counts", "MultinomialNB": "counts",
               "GammaRegressor": "positive-target", "PoissonRegressor": "positive-target",
               "IsotonicRegression": "one-column", "CCA": "two-targets", "PLSCanonical": "two-targets",
               "PLSSVD": "two-targets", "MultiTaskElasticNet": "two-targets", "MultiTaskElasticNetCV": "two-targets",
               "MultiTaskLasso": "two-targets", "MultiTaskLassoCV": "two-targets", "CountVectorizer": "text",
               "TfidfVectorizer": "text", "HashingVectorizer": "text", "DictVectorizer": "dicts",
               "KernelCenterer": "kernel"}
    return wrapping, by_data


def fitted(factory: Callable[[], Any], kind: str) -> tuple[Any, Any] | None:
    """The fitted model and the rows to ask it about, or None if it does not fit on this data."""
    x, y, rows = _data(kind)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = factory()
            model.fit(x, y)
    except Exception:
        return None
    return model, rows


# ---- the edits ----------------------------------------------------------------------------------------

def _compiled(obj: Any) -> bool:
    """A compiled object (a Tree, a KDTree, a DistanceMetric) whose state travels in its reduce value."""
    return type(obj).__module__.startswith("sklearn.") and not hasattr(obj, "__dict__") and hasattr(
        obj, "__reduce__") and not isinstance(obj, type)


def _few(n: int) -> list[int]:
    return list(range(n)) if n <= 3 else [0, n - 1]  # the first and last of many alike (a forest's trees)


def values(obj: Any, path: Route = (), depth: int = 0, seen: set[int] | None = None) -> Iterator[tuple[Route, Any]]:
    """Every number and array in a fitted model's state, with the path to it."""
    seen = set() if seen is None else seen
    if depth > DEPTH or id(obj) in seen:
        return
    if isinstance(obj, (bool, np.bool_, str, bytes, type(None))):
        return
    if isinstance(obj, (int, float, np.integer, np.floating)):
        yield path, obj
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            for i in _few(obj.size):
                yield from values(obj.flat[i], (*path, ("item", i)), depth + 1, seen)
        else:
            yield path, obj
    elif isinstance(obj, (list, tuple)):
        if obj and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            yield path, obj
        for i in _few(len(obj)):
            yield from values(obj[i], (*path, ("item", i)), depth + 1, seen)
    elif isinstance(obj, dict):
        keys = list(obj)
        for i in _few(len(keys)):
            yield from values(obj[keys[i]], (*path, ("key", keys[i])), depth + 1, seen)
    elif _compiled(obj):
        reduced = obj.__reduce__()
        for i, arg in enumerate(reduced[1]):
            yield from values(arg, (*path, ("arg", i)), depth + 1, seen)
        state = reduced[2] if len(reduced) > 2 else None
        if isinstance(state, dict):
            for key in state:
                yield from values(state[key], (*path, ("state", key)), depth + 1, seen)
        elif isinstance(state, tuple):
            for i, part in enumerate(state):
                yield from values(part, (*path, ("state", i)), depth + 1, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("sklearn", "scipy", "numpy"):
        for name, value in list(vars(obj).items()):
            yield from values(value, (*path, ("attr", name)), depth + 1, seen)


def edits(value: Any) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(what, make the edited value) for one number or array."""
    if isinstance(value, (int, np.integer)):
        for v in INTS:
            yield f"= {v}", lambda v=v: type(value)(v) if isinstance(value, np.integer) and abs(v) < 2**31 else v
        return
    if isinstance(value, (float, np.floating)):
        for f in FLOATS:
            yield f"= {f}", lambda f=f: f
        return
    if isinstance(value, (list, tuple)):
        yield "cut", lambda: type(value)(value[: len(value) // 2])
        yield "emptied", type(value)
        yield "grown", lambda: type(value)([*value, value[-1]])
        return
    a: np.ndarray = value
    if a.ndim == 0:
        yield from ((f"0-d {what}", lambda make=make: np.asarray(make(), dtype=a.dtype))
                    for what, make in edits(a.item()))
        return
    yield "cut", a[: len(a) // 2].copy
    yield "emptied", a[:0].copy
    yield "grown", lambda: np.concatenate([a, a[-1:]]) if len(a) else a
    if a.dtype.names:
        for field in a.dtype.names:
            kind = a.dtype[field].kind
            for v in INTS[1:4] if kind in "iu" else FLOATS[2:4] if kind == "f" else ():
                for at in sorted({0, len(a) - 1}) if len(a) else ():
                    yield f"[{at}].{field} = {v}", lambda field=field, v=v, at=at: _set(a, at, v, field)
        return
    for v in INTS[1:4] if a.dtype.kind in "iu" else FLOATS[2:4] if a.dtype.kind == "f" else ():
        for at in sorted({0, a.size - 1}) if a.size else ():
            yield f"flat[{at}] = {v}", lambda v=v, at=at: _set(a, at, v)
    for dtype in ("float32", "int32", "int8", "uint64"):
        if a.dtype != dtype and a.dtype.kind in "iuf":
            yield f"as {dtype}", lambda dtype=dtype: a.astype(dtype)
    yield "reversed", lambda: a[::-1]
    if a.ndim >= 2:
        yield "fortran", lambda: np.asfortranarray(a)
        yield "transposed", lambda: a.T


def _set(a: np.ndarray, at: int, v: Any, field: str | None = None) -> np.ndarray:
    b = a.copy()
    with np.errstate(all="ignore"):
        if field is None:
            b.flat[at] = np.array(v).astype(b.dtype)
        else:
            b[field][at] = np.array(v).astype(b.dtype[field])
    return b


def replaced(obj: Any, path: Route, new: Any) -> Any:
    """`obj` with the value at `path` replaced (a compiled object is rebuilt from its edited state)."""
    if not path:
        return new
    (kind, key), rest = path[0], path[1:]
    if kind == "attr":
        setattr(obj, key, replaced(getattr(obj, key), rest, new))
        return obj
    if kind in ("item", "key"):
        if isinstance(obj, tuple):
            return (*obj[:key], replaced(obj[key], rest, new), *obj[key + 1:])
        if isinstance(obj, np.ndarray):
            obj.flat[key] = replaced(obj.flat[key], rest, new)
            return obj
        obj[key] = replaced(obj[key], rest, new)
        return obj
    rebuild, args, *more = obj.__reduce__()
    state = more[0] if more else None
    if kind == "arg":
        args = (*args[:key], replaced(args[key], rest, new), *args[key + 1:])
    elif isinstance(state, dict):
        state = {**state, key: replaced(state[key], rest, new)}
    else:
        state = (*state[:key], replaced(state[key], rest, new), *state[key + 1:])
    out = rebuild(*args)
    if state is not None:
        out.__setstate__(state)
    return out


def described(path: Route) -> str:
    out = ""
    for kind, key in path:
        out += f".{key}" if kind == "attr" else f"[{key!r}]" if kind in ("item", "key") else (
            f".<arg {key}>" if kind == "arg" else f".<state {key!r}>")
    return out


# ---- one child per edit -------------------------------------------------------------------------------

def _child(model: Any, rows: Any, edit: tuple[Route, Callable[[], Any]], file: Path, *, trusted: bool,
           stages: int) -> int:
    """Edit, write, load and ask the model, telling the parent (`stages`, a pipe) the step it is at."""
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a huge allocation fails, in Python
    quiet = os.open(os.devnull, os.O_WRONLY)  # an edited verbose= prints from every call
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    from mlpersist import PersistError, load_any

    path, make = edit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edited = replaced(model, path, make())
            joblib.dump(edited, file)
    except Exception:
        return UNBUILDABLE
    del edited, model
    os.write(stages, b"load_any\n")
    try:
        loaded = load_any(file, trusted=trusted)
    except PersistError:
        return REFUSED
    except Exception:
        return UNTYPED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in METHODS:
            method = getattr(loaded, name, None)
            if not callable(method):
                continue
            os.write(stages, name.encode() + b"\n")
            try:
                result = method(0.5) if name == "dbscan_clustering" else method() if (
                    name == "get_feature_names_out") else method(rows)
                if name == "staged_predict":
                    list(result)
            except Exception:
                continue
    return ANSWERED


def run_one(model: Any, rows: Any, edit: tuple[Route, Callable[[], Any]], file: Path, *, trusted: bool,
            timeout: float) -> tuple[str, str]:
    """The outcome and the step it came at (load_any, or the method called).

    The outcome is 'refused', 'answered', 'unbuildable', 'untyped', or a finding: 'signal SIGSEGV',
    'exit 1', 'timeout'.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 1
        try:
            code = _child(model, rows, edit, file, trusted=trusted, stages=write)
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + timeout
    outcome = ""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            outcome = "timeout"
            break
        time.sleep(0.002)
    with os.fdopen(read, "rb") as pipe:  # a few short lines: the pipe's buffer holds them all
        steps = pipe.read().split()
    step = steps[-1].decode() if steps else "edit"
    if outcome:
        return outcome, step
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}", step
    code = os.WEXITSTATUS(status)
    return {REFUSED: "refused", ANSWERED: "answered", UNBUILDABLE: "unbuildable", UNTYPED: "untyped"}.get(
        code, f"exit {code}"), step


def fuzz(models: list[tuple[str, Callable[[], Any], str]], *, trusted: bool, timeout: float, keep: Path | None,
         only: str | None, stop_after: int | None, every: int = 1) -> dict[str, Any]:
    """Make the edits; the report: counts of outcomes, models that did not fit, findings, and known limits.

    A known limit (docs/security.md) is a get_feature_names_out that ran out of time: it names every
    feature a model counts, and a count that nothing in the file backs cannot be checked.
    """
    counts: dict[str, int] = {}
    report: dict[str, Any] = {"counts": counts, "skipped": [], "findings": [], "limits": []}
    made = 0
    work = Path(tempfile.mkdtemp(prefix="mlp-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    file = work / "model.joblib"
    try:
        for name, factory, kind in models:
            got = fitted(factory, kind)
            if got is None:
                report["skipped"].append(name)
                continue
            model, rows = got
            print(f"{name}: {sum(counts.values())} edits so far, {len(report['findings'])} findings",
                  file=sys.stderr, flush=True)
            for path, value in list(values(model)):
                where = described(path)
                if only and only not in where:
                    continue
                for what, make in edits(value):
                    made += 1
                    if made % every:
                        continue
                    outcome, step = run_one(model, rows, (path, make), file, trusted=trusted, timeout=timeout)
                    counts[outcome.split()[0]] = counts.get(outcome.split()[0], 0) + 1
                    if outcome in ("refused", "answered", "unbuildable"):
                        continue
                    found = {"model": name, "where": where, "edit": what, "outcome": outcome, "in": step}
                    limit = outcome == "timeout" and (step == "get_feature_names_out" or (
                        type(model).__name__, where) in SLOW_BY_DESIGN)
                    report["limits" if limit else "findings"].append(found)
                    if keep is not None and file.exists() and not limit:
                        keep.mkdir(parents=True, exist_ok=True)
                        shutil.copy(file, keep / f"{len(report['findings']):03d}-{name}.joblib")
                    if stop_after is not None and len(report["findings"]) >= stop_after:
                        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="also every estimator all_estimators() lists")
    parser.add_argument("--model", action="append", help="only the models of these names (with --all, estimators too)")
    parser.add_argument("--only", help="only the values whose path contains this text (e.g. tree_)")
    parser.add_argument("--trusted", action="store_true", help="load with trusted=True: the control run")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one child may take (default 30)")
    parser.add_argument("--stop-after", type=int, help="stop at this many findings")
    parser.add_argument("--every", type=int, default=1, help="make only every N-th edit (the tests' quick run)")
    parser.add_argument("--keep", type=Path, help="keep each finding's file in this directory")
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":  # one thread everywhere: no OpenMP pool for a fork to inherit
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env)
    models = [m for m in curated() + (every_estimator() if args.all else []) if not args.model or m[0] in args.model]
    started = time.monotonic()
    report = fuzz(models, trusted=args.trusted, timeout=args.timeout, keep=args.keep, only=args.only,
                  stop_after=args.stop_after, every=args.every)
    report["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=1))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
