"""scikit-learn: a joblib (or pickle) payload, read back only through the core's guarded unpickler."""

from __future__ import annotations

import functools
import pickle
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sklearn
from scipy import sparse
from sklearn.tree._tree import Tree

from mlpersist import Payload, _registry
from mlpersist._environment import release
from mlpersist._policy import NATIVE_STATE, unchecked_native
from mlpersist._trees import first_bad_tree, first_too_deep, local_index
from mlpersist.errors import PersistError, UntrustedContentError, VersionMismatchWarning

_FILES = {"joblib": "model.joblib", "pickle": "model.pkl"}
_MAX_CLASSES_RECORDED = 1000
# Arrays that compiled predict routines walk row by row beside X, trusting them to be as wide as X:
# KNeighbors*' brute-force search (_fit_X), the KMeans family's assignment (cluster_centers_); BisectingKMeans
# predicts down its tree, each step against its node's two children's centres (`center`), held to it too.
_AS_WIDE_AS_X = ("_fit_X", "cluster_centers_")
_LIBSVM_CLASSIFIERS = ("c_svc", "nu_svc")  # the svm types whose per-class counts libsvm follows
# Maps whose values a transform makes the column indices of a sparse matrix with one column per entry, which
# scipy builds without checking them: CountVectorizer's (TfidfVectorizer's) and DictVectorizer's vocabulary_,
# MultiLabelBinarizer's _cached_dict.
_INDEX_MAPS = ("vocabulary_", "_cached_dict")
_ENCODING = ("sklearn.feature_extraction.", "sklearn.preprocessing.")  # the modules of those and of OneHotEncoder
# what encoders' (categories_ per feature) and clusterers' (_n_features_out, their centres) feature names count
_COUNTED, _COUNTS = ("sklearn.preprocessing.", "sklearn.cluster."), ("categories_", "_n_features_out")
_MOST_COLUMNS = 2**31 - 1  # scikit-learn's bound for a hashing transform's n_features (its column indices are int32)
_MOST_THREADS = 1 << 16  # far more than any machine scikit-learn counted its threads on (the KMeans family's)


class SklearnAdapter:
    """Any estimator, Pipeline, ColumnTransformer or meta-estimator, through joblib by default."""

    name: ClassVar[str] = "sklearn"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("scikit-learn", "numpy", "scipy", "joblib")

    def save(self, model: Any, dest: Path, *, format: str, compress: Any = 0, protocol: int | None = None,
             **options: Any) -> Mapping[str, Any]:
        """Write model.joblib (`compress=` as joblib takes it) or model.pkl; return what describes the model."""
        if options:
            raise PersistError(f"the sklearn adapter takes compress= and protocol=, not {', '.join(sorted(options))}")
        if format == "joblib":
            from mlpersist.adapters import _joblib_write  # noqa: PLC0415 - saves only, not on the load path

            _joblib_write.dump(model, dest / _FILES["joblib"], compress=compress, protocol=protocol)
            if compress:  # a file load_any would refuse as a decompression bomb is not saved
                from mlpersist._safejoblib import check_inflation  # noqa: PLC0415 - the unpickler: compressed saves only

                check_inflation(dest / _FILES["joblib"], _FILES["joblib"])
        else:
            with open(dest / _FILES["pickle"], "wb") as f:
                pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL if protocol is None else protocol)
        return describe(model)

    def load(self, payload: Payload, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        """Unpickle under the caller's trust policy, then check tree structures before anything predicts."""
        if options:
            raise PersistError(f"the sklearn adapter takes no load options, not {', '.join(sorted(options))}")
        model = payload.unpickle(_FILES.get(format, _FILES["joblib"]), joblib_format=format == "joblib")
        as_fractions(model, None if payload.policy.trusted else validate(model))
        return model


def describe(model: Any) -> dict[str, Any]:
    """Record n_features_in_, feature_names_in_ and classes_ where the model has them."""
    out: dict[str, Any] = {}
    if isinstance(n := getattr(model, "n_features_in_", None), (int, np.integer)):
        out["n_features_in"] = int(n)
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        out["feature_names_in"] = [str(x) for x in names]
    classes = getattr(model, "classes_", None)
    if isinstance(classes, np.ndarray) and classes.ndim == 1:
        if len(classes) <= _MAX_CLASSES_RECORDED:
            out["classes"] = [c.item() if isinstance(c, np.generic) else str(c) for c in classes]
        out["n_classes"] = len(classes)
    return out


def validate(model: Any) -> list[Tree]:
    """Refuse compiled state whose indices point outside its arrays or whose arrays disagree in shape.

    Tree.predict, KDTree.query, distance metrics, libsvm, the KMeans and brute-force neighbour
    kernels, HistGradientBoosting's categorical splits, scipy's splines and sparse routines (compiled)
    index one array with another without bounds checks: a crafted file would read, or write, out of
    bounds. Walks the whole object graph (pipelines, ensembles, meta-estimators), every container
    entry included, and every entry of an array of objects (gradient boosting keeps its trees in one);
    a container of plain values (a vocabulary) is passed over in one C-level look at its entries' types.

    Returns the trees of the classification trees it met, in the order `as_fractions` reads them.

    Raises:
        mlpersist.errors.UntrustedContentError: naming the first bad structure.

    """
    seen: set[int] = set()
    claims: dict[str, str | None] = {}  # top-level module -> the adapter claiming it: asked once per load
    # Base classes looked up, not imported (an instance's base class is imported already): no import cost.
    metric_base, svm_base = (_loaded("sklearn.metrics._dist_metrics", "DistanceMetric"),
                             _loaded("sklearn.svm._base", "BaseLibSVM"))
    classifier = _loaded("sklearn.tree._classes", "DecisionTreeClassifier")
    boosting = _loaded("sklearn.ensemble._gb", "BaseGradientBoosting")
    hashers = _loaded("sklearn.feature_extraction._hash", "FeatureHasher") + _loaded(
        "sklearn.feature_extraction.text", "HashingVectorizer")
    trees: list[tuple[Tree, int | None, str]] = []  # checked together at the end (a forest is many small trees)
    boosted: list[tuple[Any, str]] = []  # checked last: the check predicts, once every tree has passed
    fitted: list[Tree] = []
    # (object, n_features, where its container is, its index there or None): an object is named only once
    # it is checked (a forest's 2,000 entries are mostly plain values and arrays, passed over unnamed)
    stack: list[tuple[Any, int | None, str, int | None]] = [(model, None, type(model).__name__, None)]
    while stack:
        obj, n_features, where, index = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        if index is not None:
            where = f"{where}[{index}]"
        if isinstance(obj, Tree):
            trees.append((obj, n_features, where))
            continue
        if classifier and isinstance(obj, classifier) and isinstance(tree := getattr(obj, "tree_", None), Tree):
            fitted.append(tree)
        module = type(obj).__module__
        owner = _other_adapter(module, claims)
        if owner is not None:  # e.g. an XGBClassifier step: its own adapter knows its structure
            if not hasattr(owner, "check_state"):  # with it, the unpickler had it check the state before it was set
                owner.check(obj, where)
            continue
        if module.partition(".")[0] in NATIVE_STATE:
            raise unchecked_native(type(obj), where)
        if module.startswith("scipy.sparse.") and hasattr(obj, "format"):
            if obj.format not in _CHECKED_SPARSE:
                raise UntrustedContentError(
                    f"{where}: a scipy sparse matrix in {obj.format!r} format, whose structure mlpersist does not "
                    f"check ({', '.join(_CHECKED_SPARSE)} it does); convert it (.tocsr()) before saving, or load "
                    "with trusted=True a file you trust", [f"{module}.{type(obj).__qualname__}"])
            _require(_sparse_ok, obj, where, f"a scipy sparse matrix ({obj.format})")
            continue  # its arrays are checked together
        if module.startswith("sklearn.neighbors.") and hasattr(obj, "get_arrays"):
            _require(_binary_tree_ok, obj, where, f"a {type(obj).__name__}")
            continue
        if isinstance(obj, metric_base):  # one on its own checks its data's width when it is used
            _require(_metric_ok, obj, where, f"a {type(obj).__name__}")
            continue
        if module == "scipy.interpolate._bsplines":
            _require(_spline_ok, obj, where, f"a {type(obj).__name__}")
        if isinstance(obj, svm_base) and hasattr(obj, "_n_support"):
            _require(_libsvm_ok, obj, where, f"a fitted {type(obj).__name__}")
        if boosting and isinstance(obj, boosting) and hasattr(obj, "estimators_"):
            boosted.append((obj, where))
        if hasattr(obj, "_bin_mapper") and hasattr(obj, "_predictors"):
            _require(_categories_ok, obj, where, f"a fitted {type(obj).__name__}")
            _require(_trees_per_iteration_ok, obj, where, f"a fitted {type(obj).__name__}", why=(
                "whose n_trees_per_iteration_ is not the number of trees in each of its iterations: predict sizes "
                "its output by it, and 10**6 made a 100-iteration model's staged_predict take 29 s"))
        if module.startswith("sklearn.") and any(hasattr(obj, k) for k in _AS_WIDE_AS_X):
            _require(_as_wide_as_x, obj, where, f"a fitted {type(obj).__name__}")
        if module == "sklearn.cluster._bisect_k_means" and hasattr(obj, "center") and n_features is not None:
            _require(functools.partial(_centre_ok, width=n_features), obj, where, "a BisectingKMeans tree node")
        if module.startswith("sklearn.neighbors.") and hasattr(obj, "_fit_X") and hasattr(obj, "n_samples_fit_"):
            _require(_fit_rows_ok, obj, where, f"a fitted {type(obj).__name__}")
        if module.startswith("sklearn.neighbors.") and hasattr(obj, "_y") and hasattr(obj, "classes_"):
            _require(_neighbour_labels_ok, obj, where, f"a fitted {type(obj).__name__}")
        if module.startswith(_ENCODING):
            if any(type(getattr(obj, k, None)) is dict for k in _INDEX_MAPS):
                _require(_index_maps_ok, obj, where, f"a fitted {type(obj).__name__}")
            if hasattr(obj, "_n_features_outs"):
                _require(_one_hot_ok, obj, where, f"a fitted {type(obj).__name__}")
        if module.startswith(_COUNTED) and any(k in getattr(obj, "__dict__", ()) for k in _COUNTS):
            _require(_names_counted_ok, obj, where, f"a fitted {type(obj).__name__}", why=(
                "whose count of features disagrees with the arrays it counts: get_feature_names_out makes a name "
                "for each counted feature, and a count of 2**31 hung it"))
        if module == "sklearn.random_projection" and hasattr(obj, "components_"):
            _require(_finite_components_ok, obj, where, f"a fitted {type(obj).__name__}", why=(
                "whose components are not all finite: inverse_transform hands them to LAPACK's SVD, unchecked, and "
                "an infinite one made it loop forever"))
        if hashers and isinstance(obj, hashers):
            _require(_hash_width_ok, obj, where, f"a {type(obj).__name__}", why=(
                f"whose n_features is not a number of columns scikit-learn takes (1 to {_MOST_COLUMNS}): its "
                "transform hashes each term modulo n_features, in compiled code, and 0 killed the process (SIGFPE)"))
        if module.startswith("sklearn.cluster.") and hasattr(obj, "_single_linkage_tree_"):
            _require(_linkage_ok, obj, where, f"a fitted {type(obj).__name__}")
        if module.startswith("sklearn.cluster.") and hasattr(obj, "_n_threads"):
            _require(_threads_ok, obj, where, f"a fitted {type(obj).__name__}", why=(
                f"whose thread count (_n_threads) is not 1 to {_MOST_THREADS}: predict hands it to OpenMP, which "
                "exits the process on -1"))
        nodes = getattr(obj, "nodes", None)
        if isinstance(nodes, np.ndarray) and nodes.dtype.names and "left" in nodes.dtype.names:
            _check_predictor_nodes(obj, nodes, n_features, where)
        n = getattr(obj, "n_features_in_", n_features)
        n = int(n) if isinstance(n, (int, np.integer)) else n_features
        children: Any = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else (
            getattr(obj, "__dict__", {}).values())
        if _plain(obj, children):
            continue  # every entry a plain value (140,000 words: 150 ms one by one, 4 ms this way)
        for i, child in enumerate(children):
            kind = type(child)
            if kind not in _PASSED:
                stack.append((child, n, where, i))
            elif kind is np.ndarray and child.dtype.hasobject:  # objects held in an array (gradient boosting's trees)
                stack.append((child.ravel().tolist(), n, where, i))
    _check_trees(trees)
    for obj, where in boosted:
        _require(_boosting_ok, obj, where, f"a fitted {type(obj).__name__}")
    return fitted


def _boosting_ok(model: Any) -> bool:
    """Whether a gradient-boosting model's trees read X as wide as it checks X, and write inside its output.

    Its predict checks X against the first tree, starts from the init estimator's raw predictions (one column
    per output), then adds tree [i, k] into column k of them, for every k of `estimators_`, in compiled code
    without bounds checks: a binary classifier saved with 64 columns of trees made glibc abort, and a tree
    wider than the first reads past each row of X. So every tree is as wide as the model, and the init
    estimator's raw prediction for one row (the model's own code, run on zeros after every tree has been
    checked) has one column per column of trees.
    """
    estimators, width = model.estimators_, model.n_features_in_
    if not (isinstance(estimators, np.ndarray) and estimators.ndim == 2 and estimators.size):
        return False
    if any(not isinstance(getattr(e, "tree_", None), Tree) or e.tree_.n_features != width or e.n_features_in_ != width
           for e in estimators.flat):
        return False
    try:
        with warnings.catch_warnings():  # a model fit on a frame warns that zeros have no feature names
            warnings.simplefilter("ignore")
            raw = model._raw_predict_init(np.zeros((1, width)))
    except Exception:  # whatever the init estimator raises on this model, it is not one to load
        return False
    return isinstance(raw, np.ndarray) and raw.shape == (1, estimators.shape[1])


_OWN_STACK = frozenset({"sklearn", "numpy", "scipy"})  # whose objects the walk checks itself
_FRACTIONS = release(sklearn.__version__) >= (1, 4)  # tree_.value of a classifier
# what both walks of the model pass over: values and arrays hold no object to check, a class is a global
_OPAQUE = (str, bytes, int, float, np.ndarray, np.generic, type)
# the exact types `validate` has nothing to check in (it skips str, bytes, int and float; None and bool hold nothing)
_LEAVES = frozenset({str, bytes, int, float, bool, type(None)})
# the exact types of entries `validate` never puts on its stack: the leaves, arrays and numpy's common scalars
_PASSED = _LEAVES | {np.ndarray, np.int64, np.float64}


def _plain(obj: Any, children: Any) -> bool:
    """Whether `obj` is a long container (a vocabulary, a list of names) whose entries are all plain values.

    Both walks of the model pass over such a container in one C-level look at its entries' exact types.
    """
    return isinstance(obj, (dict, list, tuple)) and len(obj) > 16 and _LEAVES.issuperset(map(type, children))


def as_fractions(model: Any, trees: list[Tree] | None = None) -> None:
    """Give classification trees pickled by scikit-learn < 1.4 the class fractions 1.4 and later predict from.

    Before 1.4, a classifier's `tree_.value` held each node's weighted class counts, and predict_proba
    divided by their sum; 1.4 and later keep the fractions there and return them as they are. Loaded
    as it was, such a forest's predict_proba returned counts (112 for a probability in a test), and its
    predict could change. A tree in the old layout (its values sum to each node's weighted sample count,
    not 1) is divided in place, as 1.4 divides: predictions then match the saving version's, bit for bit.
    Trusted or not, bare file or artifact: the layout tells, not a recorded version. One pickle is written
    by one scikit-learn, so the first tree whose layout shows ends the search when it holds fractions.

    `trees`: the classification trees `validate` met on its walk; None (a trusted load, not validated)
    walks the model for them here.
    """
    if not (_FRACTIONS and _loaded("sklearn.tree._classes", "DecisionTreeClassifier")):
        return  # before 1.4, counts are the installed version's own layout
    converted = 0
    for tree in _classifier_trees(model) if trees is None else trees:
        layout = _layout(tree)
        if layout == "fractions":
            break
        if layout == "counts":
            value = tree.value  # the buffer the tree predicts from (scikit-learn's own view of it)
            value[...] = value / tree.weighted_n_node_samples[:, None, None]
            converted += 1
    if converted:
        warnings.warn(f"{converted} classification tree(s) were pickled by scikit-learn < 1.4, which kept class "
                      f"counts in tree_.value where scikit-learn {sklearn.__version__} keeps fractions (predict_proba "
                      "would have returned counts): converted, as 1.4 computes them", VersionMismatchWarning,
                      stacklevel=3)


def _classifier_trees(model: Any) -> Iterator[Tree]:
    """The trees of the classification trees in `model`'s object graph, on a trusted load (`validate` not run)."""
    classifier = _loaded("sklearn.tree._classes", "DecisionTreeClassifier")
    seen: set[int] = set()
    stack: list[Any] = [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (_OPAQUE, Tree)):
            continue
        seen.add(id(obj))
        if isinstance(obj, classifier) and isinstance(tree := getattr(obj, "tree_", None), Tree):
            yield tree
            continue
        children: Any = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else (
            getattr(obj, "__dict__", {}).values())
        if not _plain(obj, children):
            stack.extend(children)


def _layout(tree: Tree) -> str | None:
    """What a classification tree's `value` holds: "fractions" (1.4+), "counts" (before), or None if both agree."""
    value, weight = tree.value, tree.weighted_n_node_samples
    sums = value.sum(axis=2)
    ones, counts = np.allclose(sums, 1.0), (weight > 0).all() and np.allclose(sums, weight[:, None])
    return None if ones == counts else "fractions" if ones else "counts"


def _loaded(module: str, name: str) -> tuple[type, ...]:
    """The class `module.name` if its module is imported (for isinstance), else no class."""
    cls = getattr(sys.modules.get(module), name, None)
    return (cls,) if isinstance(cls, type) else ()


def _other_adapter(module: str, claims: dict[str, str | None]) -> Any:
    """The adapter (reached through the registry, never imported directly) that checks objects of `module`, if any.

    `claims` caches the registry's answer per top-level module for one load. Objects of scikit-learn,
    numpy, scipy and the standard library are the walk's own to check, never another adapter's: a model
    of those alone is checked without reading every installed distribution's entry points (2.5 ms here,
    once per process), which another package's object may need (its adapter may come from one).
    """
    top = module.partition(".")[0]
    if top not in claims:
        claims[top] = None if top in _OWN_STACK or top in sys.stdlib_module_names else _registry.claimed(top)
    if claims[top] in (None, "sklearn"):
        return None  # most of the graph: no registry lookup
    try:
        adapter = _registry.claimant(module, claims)
    except ImportError:  # MissingFrameworkError: the object exists, so this cannot happen; be safe anyway
        return None
    if adapter is None:
        return None
    return adapter if hasattr(adapter, "check") or hasattr(adapter, "check_state") else None


def _check_trees(trees: list[tuple[Tree, int | None, str]]) -> None:
    """Check every decision tree met in the model: sizes one by one, child and feature indices all at once."""
    for tree, n_features, where in trees:
        count = tree.node_count
        if count < 1 or tree.value.shape[0] != count or (n_features is not None and tree.n_features != n_features):
            _refuse_tree(tree, n_features, where)
    if not trees:
        return
    left, right, feature = (np.concatenate([getattr(t, k) for t, _, _ in trees])
                            for k in ("children_left", "children_right", "feature"))
    sizes = [t.node_count for t, _, _ in trees]
    index = local_index(np.asarray(sizes, dtype=np.int64))
    try:
        bad = first_bad_tree(sizes, left, right, feature, [t.n_features for t, _, _ in trees], adjacent=False,
                             index=index)
    except ValueError:
        bad = 0
    if bad is not None:
        _refuse_tree(*trees[bad])
    deep = first_too_deep(sizes, left, right, [t.max_depth for t, _, _ in trees], index)
    if deep is not None:
        tree, _, where = trees[deep[0]]
        why = ("a node is the child of two nodes" if deep[1] == "parents"
               else f"its nodes lie deeper than its max_depth of {tree.max_depth}, which decision_path sizes its "
                    "buffer by")
        raise UntrustedContentError(f"{where}: a decision tree's shape is not what scikit-learn builds ({why}); the "
                                    "file is crafted or damaged, refusing it", ["sklearn.tree._tree.Tree"])


def _refuse_tree(tree: Tree, n_features: int | None, where: str) -> None:
    raise UntrustedContentError(
        f"{where}: a decision tree's child or feature indices point outside its arrays (n_features "
        f"{tree.n_features}, estimator expects {n_features}); the file is crafted or damaged, refusing it",
        ["sklearn.tree._tree.Tree"])


_CHECKED_SPARSE = ("csr", "csc", "bsr", "coo", "dia")


def _sparse_ok(m: Any) -> bool:
    """Whether a scipy sparse matrix's index arrays lie inside it.

    A KNeighbors model's training data, an SVM's support vectors: scipy's and sklearn's compiled routines
    index with them unchecked (a crafted `indices` entry made a KNeighborsClassifier's predict segfault).
    Formats other than these five (`_CHECKED_SPARSE`) are refused before.
    """
    fmt = getattr(m, "format", None)
    if fmt in ("csr", "csc", "bsr"):
        m.check_format(full_check=True)  # index dtypes and lengths, indptr from 0, indices inside the shape
        # and indptr rising, but in scipy 1.11 only if the last pointer (its count of entries) is positive: a
        # negative one passed, the pointers before it unchecked (a TfidfVectorizer's idf matrix: a segfault)
        return bool(np.all(m.indptr[1:] >= m.indptr[:-1]))
    if fmt == "coo":
        coords = getattr(m, "coords", None) or (m.row, m.col)
        return len(coords) == len(m.shape) and all(
            np.ndim(c) == 1 and len(c) == len(m.data) and (len(c) == 0 or (int(c.min()) >= 0 and int(c.max()) < n))
            for c, n in zip(coords, m.shape, strict=True))
    if fmt == "dia":
        return bool(m.data.ndim == 2 and m.offsets.ndim == 1 and m.data.shape[0] == len(m.offsets))
    return False


def _fit_rows_ok(model: Any) -> bool:
    """Whether a neighbours model's data has as many rows as it counts (`n_samples_fit_`), and at least one.

    Its search refuses more neighbours than `n_samples_fit_`, then splits the data's rows into chunks
    in compiled code: data cut to no rows raised SIGFPE in a brute-force `kneighbors` (every metric
    tried), and data cut to 3 rows still answered for 5 neighbours.
    """
    count = model.n_samples_fit_
    return _count_within(count, 1, 2**63 - 1) and np.shape(model._fit_X)[0] == count


def _neighbour_labels_ok(model: Any) -> bool:
    """Whether a neighbours classifier has one label per row it searches, each an index into its classes.

    With a metric other than the Euclidean one, a brute-force search counts each neighbour's vote in
    compiled code at `class_scores[row, _y[neighbour]]`, unchecked: a label of 10**5 segfaulted
    predict_proba, and a label is an offset the file chooses to write at.
    """
    labels, rows = np.asarray(model._y), model._fit_X.shape[0]
    if labels.dtype.kind not in "iu" or labels.shape[:1] != (rows,):
        return False
    if labels.ndim == 1:
        return _codes_within(labels, len(model.classes_))
    return labels.ndim == 2 and labels.shape[1] == len(model.classes_) and all(
        _codes_within(labels[:, j], len(c)) for j, c in enumerate(model.classes_))


def _binary_tree_ok(tree: Any) -> bool:
    """Whether a KDTree's or BallTree's indices (KNeighbors*, KernelDensity...) lie inside its arrays.

    Its queries follow `idx_array` into the data and the implicit children 2i+1, 2i+2 of every inner
    node, read a KD-tree's lower and upper bounds, and hand its distance metric rows of the data's
    width, all without bounds checks (a crafted `idx_array` entry segfaulted in predict; bounds with
    only the lower half, or a metric weight vector shorter than the rows, read past their arrays).
    """
    state = tree.__getstate__()  # (data, idx_array, node_data, node_bounds, leaf_size, n_levels, n_nodes, ...)
    data, idx, nodes, bounds = (np.asarray(a) for a in state[:4])
    leaf_size, n_nodes, metric = state[4], state[6], state[11]
    weights = state[12] if len(state) > 12 else None
    n = len(data)
    halves = 2 if type(tree).__name__.startswith("KDTree") else 1  # KD: lower and upper bounds; ball: centroids
    ok = (data.ndim == 2 and idx.ndim == 1 and len(idx) == n and (n == 0 or (idx.min() >= 0 and idx.max() < n))
          and nodes.ndim == 1 and nodes.dtype.names is not None
          and {"idx_start", "idx_end", "is_leaf"} <= set(nodes.dtype.names) and n_nodes == len(nodes)
          and bounds.shape == (halves, len(nodes), data.shape[1]) and leaf_size >= 1
          and _metric_ok(metric, data.shape[1]) and (weights is None or np.shape(weights) == (n,)))
    if ok and len(nodes):
        start, end, inner = nodes["idx_start"], nodes["idx_end"], np.flatnonzero(nodes["is_leaf"] == 0)
        ok = bool(np.all((start >= 0) & (start <= end) & (end <= n))) and bool(np.all(2 * inner + 2 < len(nodes)))
    return bool(ok)


def _metric_ok(metric: Any, width: int | None = None) -> bool:
    """Whether a DistanceMetric's weights fit the rows it measures (`width`; None: checked when it is used).

    Its distance loops run over the row's width and index the weights with it unchecked: Minkowski's
    `w` and SEuclidean's `V` must be that long, Mahalanobis's `VI` square and that wide (its scratch
    buffer is sized from `VI` and written across the row), Haversine's rows two wide.
    """
    if not any(isinstance(metric, base) for base in _loaded("sklearn.metrics._dist_metrics", "DistanceMetric")):
        return False
    vec, mat = (np.asarray(a) for a in metric.__getstate__()[1:3])
    kind = type(metric).__name__
    fits = vec.ndim == 1 and mat.ndim == 2
    if kind.startswith("MinkowskiDistance"):
        return fits and (len(vec) == 0 or width in (None, len(vec)))
    if kind.startswith("SEuclideanDistance"):
        return fits and width in (None, len(vec))
    if kind.startswith("MahalanobisDistance"):
        return fits and mat.shape[0] == mat.shape[1] and width in (None, mat.shape[0])
    if kind.startswith("HaversineDistance"):
        return fits and width in (None, 2)
    return fits


def _spline_ok(spline: Any) -> bool:
    """Whether a scipy BSpline's knots, coefficients and degree agree (SplineTransformer keeps them).

    Its compiled evaluation trusts them to: coefficients shorter than the knots ask for were read
    past their end. The check is scipy's own, run by building a spline from them.
    """
    if type(spline) not in _loaded("scipy.interpolate._bsplines", "BSpline"):
        return False
    t, c = np.asarray(spline.t), np.asarray(spline.c)
    type(spline)(t, c, spline.k, extrapolate=spline.extrapolate)  # raises ValueError on what does not agree
    return (t.dtype == np.float64 and c.dtype in (np.float64, np.complex128)
            and spline.extrapolate in (True, False, "periodic") and spline.axis in range(max(c.ndim, 1)))


def _libsvm_ok(svm: Any) -> bool:
    """Whether a fitted SVC/SVR/OneClassSVM's arrays agree, as libsvm assumes when it predicts.

    libsvm takes the number of classes from `_n_support`, walks `sum(_n_support)` support vectors,
    `n_classes - 1` rows of dual coefficients as long as the support, one intercept (and probability
    pair) per pair of classes, and, with a precomputed or callable kernel, reads the test kernel's
    columns at `support_`, all unchecked (a crafted `support_` entry segfaulted in predict).
    scikit-learn checks only the first of these, and only for dense support vectors (CVE-2020-28975).
    """
    counts, support, sv = np.asarray(svm._n_support), np.asarray(svm.support_), svm.support_vectors_
    kernel, is_sparse = svm.kernel, bool(svm._sparse)
    precomputed = not isinstance(kernel, str) or kernel == "precomputed"
    if (counts.ndim != 1 or len(counts) < 2 or support.ndim != 1 or is_sparse != sparse.issparse(sv)
            or (is_sparse and precomputed) or np.ndim(sv) != 2):
        return False
    n_sv = sv.shape[0] if is_sparse or not precomputed else len(support)
    pairs = len(counts) * (len(counts) - 1) // 2
    dual = svm._dual_coef_.data if is_sparse else svm._dual_coef_
    ok = ((precomputed or len(support) == n_sv)
          and np.size(dual) == (len(counts) - 1) * n_sv and (is_sparse or np.shape(dual)[0] == len(counts) - 1)
          and np.ndim(svm._intercept_) == 1 and len(svm._intercept_) >= max(pairs, 1)
          and (not _wants_probabilities(svm) or min(len(svm._probA), len(svm._probB)) >= pairs))
    if ok and svm._impl in _LIBSVM_CLASSIFIERS:
        ok = bool(np.all(counts >= 0)) and int(counts.sum()) == n_sv
    if ok and precomputed:
        ok = len(support) == 0 or (int(support.min()) >= 0 and int(support.max()) < int(svm.shape_fit_[0]))
    return bool(ok)


def _wants_probabilities(svm: Any) -> bool:
    """Whether libsvm gets the probability flag (scikit-learn 1.9 renamed it; "deprecated" means off)."""
    flags = (getattr(svm, k, False) for k in ("probability", "_effective_probability"))
    return any(not isinstance(f, str) and bool(f) for f in flags)


def _categories_ok(model: Any) -> bool:
    """Whether every categorical split of a HistGradientBoosting model is on a feature binned as categorical.

    Its predictor looks a categorical split's feature up in the known-categories bitsets, which hold
    a row only for the features the bin mapper marked categorical, unchecked (a split marked
    categorical on another feature segfaulted in predict).
    """
    categorical = np.asarray(model._bin_mapper.is_categorical_)
    if categorical.ndim != 1 or categorical.size != getattr(model, "n_features_in_", categorical.size):
        return False
    for predictor in (p for iteration in model._predictors for p in iteration):
        nodes = predictor.nodes
        split = nodes["feature_idx"][(nodes["is_leaf"] == 0) & (nodes["is_categorical"] != 0)]
        if len(split) and (int(split.max()) >= categorical.size or not np.all(categorical[split])):
            return False
    return True


def _trees_per_iteration_ok(model: Any) -> bool:
    return all(_count_within(model.n_trees_per_iteration_, len(trees), len(trees)) for trees in model._predictors)


def _index_maps_ok(model: Any) -> bool:
    """Whether each index map (`_INDEX_MAPS`) maps its n entries to 0 .. n-1, one each, as scikit-learn fits them.

    A transform turns the map's values into the column indices of a sparse matrix of n columns, which
    scipy builds without checking them; the first compiled routine to read it (a dot product with the
    next step's coefficients, `toarray`) then reads or writes at them: a CountVectorizer whose
    `vocabulary_` gave one word the index 10**8 segfaulted its pipeline's predict, as did DictVectorizer's
    and MultiLabelBinarizer's maps.
    """
    for key in _INDEX_MAPS:
        mapping = getattr(model, key, None)
        if type(mapping) is not dict:
            continue
        kinds = set(map(type, mapping.values()))  # one C-level pass: a vocabulary can hold 100,000 words
        if not all(k is int or issubclass(k, np.integer) for k in kinds):
            return False
        n = len(mapping)
        index = np.fromiter(mapping.values(), dtype=np.int64, count=n)
        if n and not (int(index.min()) >= 0 and int(index.max()) < n and int(np.bincount(index).max()) == 1):
            return False
    return True


def _one_hot_ok(model: Any) -> bool:
    """Whether every code a OneHotEncoder's transform can make lands inside its feature's columns.

    Its transform encodes each value as its index among the feature's categories, maps infrequent ones
    to the grouped column (`_infrequent_indices`, `_default_to_infrequent_mappings`), removes the dropped
    one (`_drop_idx_after_grouping`), and offsets each feature by the columns of those before it
    (`_n_features_outs`); scipy takes the result as column indices unchecked, and `toarray` writes at
    them: a mapping edited to 10**8 segfaulted the encoder's pipeline. Here each feature's highest code,
    so computed, must be below its columns.
    """
    categories, outs = model.categories_, model._n_features_outs
    if not (type(outs) is list and len(outs) == len(categories) and all(_count_within(n, 0, 1 << 62) for n in outs)):
        return False
    grouped = bool(getattr(model, "_infrequent_enabled", False))
    mappings = model._default_to_infrequent_mappings if grouped else [None] * len(categories)
    infrequent = model._infrequent_indices if grouped else [None] * len(categories)
    dropped = model._drop_idx_after_grouping
    if len(mappings) != len(categories) or len(infrequent) != len(categories) or (
            dropped is not None and len(dropped) != len(categories)):
        return False
    for i, cats in enumerate(categories):
        count = len(cats)  # codes before grouping: 0 .. count-1, an infrequent index among them
        rare = infrequent[i]
        if rare is not None and (np.size(rare) == 0 or not _codes_within(rare, count)):
            return False
        mapping = mappings[i]
        if mapping is not None:  # np.take(mapping, code): a code past it raises; its values are the new codes
            if np.ndim(mapping) != 1 or len(mapping) == 0 or not _codes_within(mapping, 1 << 62):
                return False
            count = int(np.max(mapping)) + 1
        drop = None if dropped is None else dropped[i]
        if drop is not None:  # codes above it move down one; one below 0 would move code 0 to -1
            if not _count_within(drop, 0, count - 1):
                return False
            count -= 1
        if not 0 <= count <= outs[i]:
            return False
    return True


def _codes_within(values: Any, count: int) -> bool:
    codes = np.asarray(values)
    return codes.dtype.kind in "iu" and (codes.size == 0 or (int(codes.min()) >= 0 and int(codes.max()) < count))


def _linkage_ok(model: Any) -> bool:
    """Whether every merge of an HDBSCAN single-linkage tree names nodes the tree has (0 .. 2n for n merges).

    `dbscan_clustering` unions each merge's two nodes into the cluster it makes, in a union-find of
    2n + 1 entries, in compiled code without bounds checks: a first merge's left node set to 10**9
    (or -10**9) segfaulted it.
    """
    tree = model._single_linkage_tree_
    if not (isinstance(tree, np.ndarray) and tree.ndim == 1 and tree.dtype.names
            and {"left_node", "right_node"} <= set(tree.dtype.names)):
        return False
    nodes = 2 * len(tree)
    return all(_codes_within(tree[k], nodes + 1) for k in ("left_node", "right_node"))


def _centre_ok(node: Any, width: int) -> bool:
    """Whether a BisectingKMeans tree node's centre is as wide as X (its root's may be a 1-row matrix).

    predict stacks a node's two children's centres and assigns X's rows to them in compiled code that
    walks each row's width along them: children's centres cut to one column (and no `_X_mean` to add
    them to) were read past, and predict answered from whatever lay there.
    """
    return np.shape(node.center) in ((width,), (1, width))


def _count_within(n: Any, low: int, high: int) -> bool:
    """Whether `n` is an integer (Python's or numpy's) from `low` to `high`."""
    return (type(n) is int or isinstance(n, np.integer)) and low <= int(n) <= high


def _names_counted_ok(model: Any) -> bool:
    """Whether an encoder has one list of categories per feature, and a clusterer one output per centre.

    Their get_feature_names_out makes one name per feature counted (`n_features_in_` when the model kept
    no names, the KMeans family's and Birch's `_n_features_out`), in Python: an edited count of 2**31 made
    it run past any timeout, building names. Here the arrays counted are in the file, so the count must
    match them; counts that nothing in a model backs (a Normalizer's) are a known limit (docs/security.md).
    """
    if hasattr(model, "categories_") and hasattr(model, "n_features_in_"):
        return _count_within(model.n_features_in_, len(model.categories_), len(model.categories_))
    centres = getattr(model, "cluster_centers_", getattr(model, "subcluster_centers_", None))
    return centres is None or _count_within(model._n_features_out, len(centres), len(centres))


def _finite_components_ok(model: Any) -> bool:
    """Whether a random projection's components (an array, or a csr matrix's entries) are all finite."""
    components = model.components_
    values = components.data if hasattr(components, "format") else components
    return bool(np.isfinite(np.asarray(values, dtype=float)).all())


def _hash_width_ok(hasher: Any) -> bool:
    return _count_within(hasher.n_features, 1, _MOST_COLUMNS)


def _threads_ok(model: Any) -> bool:
    return _count_within(model._n_threads, 1, _MOST_THREADS)


def _as_wide_as_x(model: Any) -> bool:
    """Whether the arrays compiled predict routines read beside X (`_AS_WIDE_AS_X`) are as wide as X."""
    width = getattr(model, "n_features_in_", None)
    return all(getattr(a, "ndim", None) == 2 and (width is None or a.shape[1] == width)  # ndarray or sparse
               for a in (getattr(model, k) for k in _AS_WIDE_AS_X if hasattr(model, k)))


def _passes(ok: Any, *args: Any) -> bool:
    """Whether `ok(*args)` holds; arrays too malformed to even be compared (a field renamed, a shape off) fail it."""
    try:
        return bool(ok(*args))
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError):  # Overflow: past int64
        return False


def _require(ok: Any, obj: Any, where: str, what: str,
             why: str = "whose index arrays point outside its data or disagree with its shape") -> None:
    """Refuse `obj` unless `ok(obj)` passes."""
    if not _passes(ok, obj):
        raise UntrustedContentError(
            f"{where}: {what} {why}; the file is crafted or damaged, refusing it (trusted=True loads it as it is)",
            [f"{type(obj).__module__}.{type(obj).__qualname__}"])


def _check_predictor_nodes(predictor: Any, nodes: np.ndarray, n_features: int | None, where: str) -> None:
    if not _passes(_predictor_nodes_ok, predictor, nodes, n_features):  # a renamed field fails it too
        raise UntrustedContentError(
            f"{where}: a gradient-boosting predictor has no nodes, or its node indices point outside its arrays, back "
            "up its tree or to a node another one names; the file is crafted or damaged, refusing it",
            ["sklearn.ensemble._hist_gradient_boosting"])


def _predictor_nodes_ok(predictor: Any, nodes: np.ndarray, n_features: int | None) -> bool:
    """Whether children lie inside the array and after their node, and split features inside X.

    scikit-learn numbers a predictor's nodes depth first, so each path down rises: a child at or before its
    node made predict loop forever (a changed copy, on scikit-learn 1.3). A node is the child of one node at
    most: partial dependence walks every path down, and nodes shared make them as many as 2**depth. predict
    starts at node 0, unchecked: a predictor with no nodes read before its array (a segfault, found fuzzing).
    """
    count = len(nodes)
    if count == 0:
        return False
    inner = nodes["is_leaf"] == 0
    at = np.arange(count)
    ok = bool(np.all(~inner | ((nodes["left"] < count) & (nodes["right"] < count)
                               & (nodes["left"] > at) & (nodes["right"] > at))))
    if ok and inner.any():
        ok = int(np.bincount(np.concatenate((nodes["left"][inner], nodes["right"][inner])), minlength=count).max()) <= 1
    if ok:  # a negative feature index passed before (one byte changed in a file): it read before each row
        ok = bool(np.all(~inner | ((nodes["feature_idx"] >= 0)
                                   & (nodes["feature_idx"] < (n_features if n_features is not None else 2**31)))))
    if ok and "is_categorical" in (nodes.dtype.names or ()):  # a categorical split's bitset row, in both bitset tables
        rows = nodes["bitset_idx"][inner & (nodes["is_categorical"] != 0)]
        tables = [np.asarray(getattr(predictor, k, None)) for k in ("raw_left_cat_bitsets", "binned_left_cat_bitsets")]
        ok = all(t.ndim == 2 and t.shape[1] == 8 and (len(rows) == 0 or int(rows.max()) < len(t)) for t in tables)
    return ok
