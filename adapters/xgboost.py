"""XGBoost: `save_model` as UBJSON (or JSON), vetted by mlpersist before XGBoost's native parser reads it."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import xgboost

from mlpersist import Payload, PersistError, _gc
from mlpersist._environment import release
from mlpersist._trees import first_bad_tree, local_index
from mlpersist._ubjson import joined
from mlpersist._ubjson import loads as ubjson_loads
from mlpersist.errors import (
    CorruptArtifactError,
    UntrustedContentError,
    VersionMismatchError,
    VersionMismatchWarning,
)

_FILES = {"ubj": "model.ubj", "json": "model.json"}
# A fixed table: the class to rebuild is never taken from the file.
_WRAPPERS: dict[str, type] = {c.__name__: c for c in (
    xgboost.Booster, xgboost.XGBClassifier, xgboost.XGBRegressor, xgboost.XGBRanker,
    xgboost.XGBRFClassifier, xgboost.XGBRFRegressor, xgboost.XGBModel)}


class XGBoostAdapter:
    """Booster and the scikit-learn wrappers, through XGBoost's own data-only model format."""

    name: ClassVar[str] = "xgboost"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ("xgboost", "numpy", "scipy")

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]:
        """Write model.ubj (or model.json) with `save_model`; record the wrapper class to rebuild."""
        if options:
            raise PersistError(f"the xgboost adapter takes no save options, not {', '.join(sorted(options))}")
        wrapper = type(model).__name__
        if type(model) not in _WRAPPERS.values():
            raise PersistError(f"{type(model).__qualname__} is not one of the XGBoost classes mlpersist rebuilds "
                               f"({', '.join(sorted(_WRAPPERS))}); save it with format=... of its base, or pickle it")
        model.save_model(str(dest / _FILES[format]))
        booster = model if isinstance(model, xgboost.Booster) else model.get_booster()
        info: dict[str, Any] = {"wrapper": wrapper, "n_features_in": int(booster.num_features())}
        classes = getattr(model, "classes_", None)
        if isinstance(classes, np.ndarray) and classes.ndim == 1 and len(classes) <= 1000:
            info["classes"] = classes.tolist()
        return info

    def load(self, payload: Payload, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        """Parse and check the trees, then let XGBoost load the very bytes that were checked.

        A trusted load (`trusted=True`, or a manifest signed by a configured key) skips the check, as
        scikit-learn's tree validation and Keras's config vetting are skipped: the caller vouches for
        the file's author, and XGBoost reads it as it would read any file of theirs.

        Either way, an XGBoost older than 3.1 would read the base score that 3.1 and later write (a list,
        one per output) as 0.5: every prediction off, silently. A single one is set after loading; several
        cannot be (those versions keep one for all outputs), and are a VersionMismatchError. Those versions
        do not recode a frame's categories either, which is warned of (`_for_this_version`).
        """
        if options:
            raise PersistError(f"the xgboost adapter takes no load options, not {', '.join(sorted(options))}")
        name = _FILES.get(format)
        if name is None:
            raise CorruptArtifactError(f"unknown xgboost format {format!r}")
        kept = payload.checked_bytes(name)  # under 16 MiB: the bytes hashed, handed to XGBoost without a copy
        raw = kept if isinstance(kept, bytearray) else bytearray(payload.read_bytes(name))  # what load_model takes
        label = payload.label(name)
        if not payload.policy.trusted:
            score = vet(raw, format, label)
        else:  # older XGBoost only: the document is read for what that version would misread
            if _LEAF_WEIGHTS_READER and _vector_leaves_before_3_2(raw):
                raise _before_3_2_error(label, "its trees are vector-leaf trees")
            score = None if _LIST_BASE_SCORE_READER else _for_this_version(parse(raw, format, label), label)
        cls = _WRAPPERS.get(str(info.get("wrapper", "Booster")))
        if cls is None:
            raise CorruptArtifactError(f"unknown XGBoost wrapper {info.get('wrapper')!r}")
        model = cls()
        try:
            model.load_model(raw)
        except Exception as exc:  # XGBoostError; UnicodeDecodeError when XGBoost's message quotes the file's bytes
            why = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise CorruptArtifactError(f"XGBoost could not read {label}: {type(exc).__name__}: {why}") from exc
        if score is not None:
            (model if isinstance(model, xgboost.Booster) else model.get_booster()).set_param({"base_score": score})
        return model


    def example_outputs(self, model: Any, args: list[Any]) -> Mapping[str, Any] | None:
        """A Booster predicts on a DMatrix; the scikit-learn wrappers answer predict/predict_proba as usual."""
        if isinstance(model, xgboost.Booster):
            return {"predict": model.predict(xgboost.DMatrix(args[0]))}
        return None

    def check_state(self, obj: Any, state: Any, where: str) -> Any:
        """Check a pickled Booster's model before its `__setstate__` hands it to XGBoost (a pipeline step).

        The state is XGBoost's serialisation, a UBJSON document of the booster's configuration and model,
        which XGBoost parses as the state is set: a vector-leaf tree without `leaf_weights` crashed it
        there. The model is checked as a saved one is, and the very bytes checked are set. A wrapper's
        state holds its Booster, a pickled object of its own, checked when that one is set (so no `check`
        after the load). An XGBoost older than 3.1 would take a list base score for 0.5: refused, as
        a Booster's state cannot be given its base score after it is set.
        """
        if not isinstance(obj, xgboost.Booster) or not isinstance(state, dict) or state.get("handle") is None:
            return state
        handle = state["handle"]
        if not isinstance(handle, bytearray):  # what __setstate__ reads (from_buffer): anything else is not XGBoost's
            raise UntrustedContentError(f"{where}: a pickled XGBoost Booster whose model is a {type(handle).__name__}, "
                                        "not XGBoost's serialised bytes; refusing it", ["xgboost.Booster"])
        with _gc.paused():
            doc = parse(bytes(handle), "ubj", where)
            model = doc.get("Model") if isinstance(doc, dict) else None
            if model is None:
                raise UntrustedContentError(f"{where}: a pickled XGBoost Booster without its model; refusing it",
                                            ["xgboost.Booster"])
            validate(model, where)
            if _for_this_version(model, where) is not None:
                raise VersionMismatchError(
                    f"{where}: a Booster pickled by XGBoost 3.1 or later, whose base score XGBoost "
                    f"{xgboost.__version__} would read as 0.5 (every prediction off); install xgboost>=3.1, or "
                    "save the model with save_any on its own, which sets it right")
            del doc, model  # freed before the collector resumes (see `vet`)
        return state


def vet(raw: bytes | bytearray, format: str, what: str) -> str | None:
    """Parse and check the model document, with the garbage collector paused until it is dropped.

    Returns what `_for_this_version` returns: the base score an older XGBoost must be given, or None.

    Its thousands of dicts and arrays are garbage once checked: freed before the collector resumes,
    they count toward no collection (one that walked them took 1.5-3 ms in a process with TensorFlow
    and torch imported).
    """
    with _gc.paused():
        doc = parse(raw, format, what)
        validate(doc, what)
        score = _for_this_version(doc, what)
        del doc  # a `return` in the block would free it only after the collector resumed
    return score


def _for_this_version(doc: Any, what: str) -> str | None:
    """What an XGBoost older than 3.1 would get wrong in a model 3.1 or later wrote.

    Returns the base score to set after loading, or None (`_scalar_base_score`: several are refused). A
    model trained on a data frame's categories keeps them (`cats`), and 3.1+ recodes a frame's categories
    to those at predict time. Older versions use each frame's own codes: a frame whose categories are in
    another order is predicted wrong (0.78 off in a test). That depends on the caller's frames, so it is a
    warning, saying what to pass.
    """
    if _LIST_BASE_SCORE_READER:
        return None
    if _frame_categories(doc):
        warnings.warn(f"{what} was trained by XGBoost 3.1 or later on a data frame with categories, which it "
                      f"recodes to the training ones when it predicts; XGBoost {xgboost.__version__} does not: "
                      "give it frames whose categorical columns list the training categories in the training "
                      "order, or install xgboost>=3.1", VersionMismatchWarning, stacklevel=2)
    return _scalar_base_score(_base_score(doc), what)


def _frame_categories(doc: Any) -> bool:
    """Whether the model keeps the categories of the frame it was trained on (XGBoost 3.1+ writes them)."""
    try:
        booster = doc["learner"]["gradient_booster"]
        segments = (booster["gbtree"] if booster["name"] == "dart" else booster)["model"]["cats"]["feature_segments"]
        return len(segments) > 0 and int(segments[-1]) > 0
    except (KeyError, TypeError, ValueError, IndexError):
        return False


def _base_score(doc: Any) -> str | None:
    """The document's base score as XGBoost writes it: a number, or from 3.1 a list of one per output."""
    try:
        score = doc["learner"]["learner_model_param"]["base_score"]
    except (KeyError, TypeError):
        return None  # XGBoost says what is missing
    return score if isinstance(score, str) else None


def _scalar_base_score(score: str | None, what: str) -> str | None:
    """What an XGBoost older than 3.1 must be given as base score after loading, or None: it reads a list as 0.5.

    Raises:
        mlpersist.errors.VersionMismatchError: a list of several, which those versions cannot hold.

    """
    if score is None or not score.strip().startswith("["):
        return None
    values = [v.strip() for v in score.strip()[1:-1].split(",")]
    if len(values) == 1 and values[0]:
        return values[0]  # the same prediction, bit for bit, on 2.1 and 3.0 (binary:logistic, squared error, ...)
    raise VersionMismatchError(
        f"{what} was saved by XGBoost 3.1 or later with a base score per output ({len(values)}); XGBoost "
        f"{xgboost.__version__} keeps one for all outputs and would read it as 0.5, so every prediction would be "
        "off; install xgboost>=3.1 to load it")


def parse(raw: bytes | bytearray, format: str, what: str) -> Any:
    """Read the model document ourselves: bounded, no native code."""
    if format == "ubj":
        return ubjson_loads(raw, what, lazy=True)  # typed arrays read when checked (most are not)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptArtifactError(f"{what} is not valid JSON: {str(exc)[:120]}") from None


def validate(doc: Any, what: str) -> None:
    """Refuse a model whose indices point outside the arrays XGBoost will index with them (xgboost #7903).

    The trees' child, parent, feature and category indices; each tree's output group (`tree_info`) and id;
    the iteration boundaries; the leaf vectors of vector-leaf trees; the category encodings of the
    training frame (`cats`, XGBoost 3.1+); a linear booster's weight count. XGBoost checks none of these
    before it predicts: each was a segfault or heap corruption in a crafted copy.

    Raises:
        mlpersist.errors.UntrustedContentError: naming the first bad tree, or the bad field.
        mlpersist.errors.VersionMismatchError: a vector-leaf tree in a layout the installed XGBoost misreads.

    """
    try:
        learner = doc["learner"]
        param = learner["learner_model_param"]
        n_features = int(param["num_feature"])
        outputs = max(int(param.get("num_class", 0)), int(param.get("num_target", 1)))  # as XGBoost counts them
        if outputs < 1:
            raise ValueError("num_class and num_target leave the model no output")
        booster = learner["gradient_booster"]
        if booster["name"] == "gblinear":  # a weight per feature and output, and a bias per output
            if len(booster["model"]["weights"]) != (n_features + 1) * outputs:
                raise ValueError(f"a linear booster of {n_features} features and {outputs} outputs needs "
                                 f"{(n_features + 1) * outputs} weights, not {len(booster['model']['weights'])}")
            return
        model = (booster["gbtree"] if booster["name"] == "dart" else booster)["model"]
        trees = model["trees"]
        if len(model["tree_info"]) != len(trees) or int(model["gbtree_model_param"]["num_trees"]) != len(trees):
            raise ValueError("tree_info and num_trees disagree with the number of trees")
        if booster["name"] == "dart" and len(booster["weight_drop"]) != len(trees):
            raise ValueError("weight_drop needs one weight per tree")
        groups = _check_groups(model, len(trees), outputs)
        used, vector = _check_trees(trees, n_features, outputs, what)
        _check_width(learner, n_features, used)
        _check_outputs(_base_score(doc), outputs, groups, has_trees=bool(trees), vector=vector)
        if "cats" in model:
            _check_cats(model["cats"])
    except _BadTree as bad:
        raise UntrustedContentError(f"{what}: tree {bad.args[0]}: {bad.args[1]}; the model is crafted or damaged, "
                                    "refusing it", ["xgboost.Booster"]) from None
    except (UntrustedContentError, VersionMismatchError):
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:  # Overflow: an int past int64
        raise UntrustedContentError(f"{what}: the booster's structure is malformed or out of range ({exc}); "
                                    "refusing to hand it to XGBoost", ["xgboost.Booster"]) from None


_ARRAYS = ("left_children", "right_children", "parents", "split_indices", "split_conditions", "default_left")
# a vector-leaf tree (`multi_strategy="multi_output_tree"`): XGBoost 3.2 keeps each leaf's vector in
# `leaf_weights`, at the leaf's `right_children` entry, and reads these without checking they are there
_VECTOR_ARRAYS = ("loss_changes", "sum_hessian")
_VERSION = release(xgboost.__version__)
_LEAF_WEIGHTS_READER = _VERSION >= (3, 2)
_LIST_BASE_SCORE_READER = _VERSION >= (3, 1)  # reads `base_score` "[0.27]"; older ones take it for 0.5


def _ints(values: Any, what: str) -> Any:
    """`values` as a one-dimensional integer array, or ValueError."""
    array = np.asarray(values)
    if array.size == 0:
        return array.reshape(0).astype(np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a list of integers")
    return array


def _check_groups(model: Any, n_trees: int, outputs: int) -> int:
    """Each tree adds to an output column XGBoost indexes unchecked; iterations slice the trees.

    Returns the number of output columns the trees add to (the highest `tree_info`, plus one; 0 for none).
    """
    info = _ints(model["tree_info"], "tree_info")
    if len(info) and (int(info.min()) < 0 or int(info.max()) >= outputs):
        raise ValueError(f"tree_info names an output outside the model's {outputs}")
    if "iteration_indptr" in model:  # absent before XGBoost 2.0: rebuilt from tree_info
        bounds = _ints(model["iteration_indptr"], "iteration_indptr")
        if not len(bounds) or bounds[0] != 0 or bounds[-1] != n_trees or bool((np.diff(bounds) < 0).any()):
            raise ValueError("iteration_indptr must rise from 0 to the number of trees")
    return int(info.max()) + 1 if len(info) else 0


SPARE_OUTPUTS = 1 << 10


def _check_outputs(score: str | None, outputs: int, groups: int, *, has_trees: bool, vector: bool) -> None:
    """Refuse a `num_class`/`num_target` beyond the outputs the model shows.

    XGBoost keeps a base score per output and predicts rows x outputs values: a 3-class model of a few KB
    edited to 100,000,000 classes took 0.5 GB to load and 12 GB and 73 s to predict 10 rows. Every
    boosting round adds a tree to each output (`tree_info` names them all), or one vector-leaf tree whose
    leaves hold a value per output (their width is checked to be the outputs); a base score given per
    output (XGBoost 3.1+) is checked against them by XGBoost. A model without trees and with one base score
    shows nothing: up to `SPARE_OUTPUTS` are taken there.
    """
    if outputs <= max(groups, 1):
        return
    if has_trees:
        if vector:
            return  # vector leaves: as wide as the outputs (`_vector_layout`)
        raise ValueError(f"num_class/num_target give {outputs} outputs, but the trees add to {groups}")
    listed = score.count(",") + 1 if score is not None and score.strip().startswith("[") else 0  # `_base_score`
    if outputs > max(SPARE_OUTPUTS, listed):
        raise ValueError(f"num_class/num_target give {outputs} outputs to a model without trees; up to "
                         f"{SPARE_OUTPUTS} are taken")


SPARE_FEATURES = 1 << 20


def _check_width(learner: Any, n_features: int, used: int) -> None:
    """Refuse a `num_feature` far beyond the features the model shows: its trees' splits, its feature names.

    XGBoost's predictor gives each thread a buffer of `num_feature` values per row of a block of 64: a
    small JSON model edited to a billion features loaded, and its first predict took 24 GB in 59 s
    before the kernel killed it. A model may have features no tree splits on (the training frame's
    last columns), and names for them, so up to `SPARE_FEATURES` more than its names and splits show
    are taken.
    """
    names, types = (learner.get(k) or () for k in ("feature_names", "feature_types"))
    shown = max(used, len(names), len(types))
    if n_features > shown + SPARE_FEATURES:
        raise ValueError(f"num_feature is {n_features}, far beyond the {shown} features the model shows (its "
                         f"highest split index plus one, or its feature names): XGBoost's predict would allocate "
                         f"{n_features} values per row; up to {SPARE_FEATURES} more are taken")


def _check_trees(trees: Any, n_features: int, outputs: int, what: str) -> tuple[int, bool]:
    """Check every tree's child, parent, feature and category indices (all trees' node arrays at once).

    `trees`: a list, or the `Rows` the UBJSON reader made of runs of like trees, whose columns are read
    without an object per tree. Returns the number of features the trees split on (the highest index,
    plus one), and whether any tree has vector leaves.
    """
    from mlpersist._rows import rows  # noqa: PLC0415 (checked loads only: the parse that made `trees` imported it)

    table = rows(trees)
    sizes: Any = np.asarray([int(v) for v in table.values(("tree_param", "num_nodes"))], dtype=np.int64)
    short = sizes < 1
    for k in _ARRAYS:
        short |= table.lengths(k) != sizes
    ids = table.values(("id",))
    misplaced = next((i for i, v in enumerate(ids) if v != i), None)  # XGBoost puts each tree at its id: a
    first = min(int(np.argmax(short)) if short.any() else len(sizes),  # repeated one left a tree unset (segfault)
                len(sizes) if misplaced is None else misplaced)
    widths = table.values(("tree_param", "size_leaf_vector"), "1")  # "0" or "1": one value per leaf
    vector = {}
    for i, width in enumerate(widths):  # in order: a bad tree before a vector-leaf one is named first
        if i == first and short[i]:
            _refuse(i)
        if i == first:
            _refuse(i, f"its id is {ids[i]!r}, not its place in the list")
        if width not in ("0", "1") and int(width) > 1:
            vector[i] = _vector_layout(i, table[i], int(sizes[i]), int(width), outputs=outputs, what=what)
    if not len(sizes):
        return 0, False
    left, right, split, parents = (table.joined(k) for k in ("left_children", "right_children", "split_indices",
                                                              "parents"))
    if any(vector.values()):
        right = _leaf_indices_checked(sizes, vector, left, right)
    index = local_index(sizes)  # each node's index in its tree: for both checks
    bad = first_bad_tree(sizes, left, right, split, n_features, adjacent=True, index=index)  # predict: right = left + 1
    if bad is None:
        bad = _first_bad_parents(sizes, left, right, parents, list(vector), index=index)
    if bad is not None:
        _refuse(bad)
    typed = table.lengths("split_type", -1)  # absent before XGBoost 1.6 (-1 here): every split numerical
    split_type = (table.joined("split_type") if (typed >= 0).all() else
                  joined([t["split_type"] if "split_type" in t else np.zeros(n, np.uint8) for t, n in zip(
                      table, sizes.tolist(), strict=True)]))
    if len(split_type) != len(left):
        _refuse(int(np.argmax(np.where(typed < 0, sizes, typed) != sizes)))
    unknown = np.flatnonzero((split_type != 0) & (split_type != 1))
    if len(unknown):
        _refuse(_tree_of(sizes, int(unknown[0])))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    categorical = set(np.flatnonzero(table.lengths("categories_nodes", 0)).tolist())
    categorical.update(np.searchsorted(ends, np.flatnonzero(split_type == 1), side="right").tolist())  # their trees
    for i in sorted(categorical):  # most models have none: no per-tree work for them
        span = slice(int(starts[i]), int(ends[i]))
        if not _categories_ok(table[i], np.asarray(split_type[span]), np.asarray(left[span])):
            _refuse(i)
    inner = np.asarray(left) != -1
    return int(np.asarray(split)[inner].max()) + 1 if inner.any() else 0, bool(vector)


def _vector_layout(i: int, tree: Any, n: int, width: int, *, outputs: int, what: str) -> bool:
    """Check a vector-leaf tree's weight arrays; whether its leaves index `leaf_weights` (XGBoost 3.2's layout).

    Each node has `width` base weights, read by every version. XGBoost 3.2 reads a leaf's vector from
    `leaf_weights` at the leaf's `right_children` entry (checked with the children), and reads the
    statistics arrays as if present: it crashes on the layout earlier versions wrote, which lacks them.
    Earlier versions read the base weights of the leaves, which 3.2 still writes.
    """
    if width != outputs:  # every leaf adds `width` values to the row's `outputs` columns
        _refuse(i, f"its leaves hold {width} values for the model's {outputs} outputs")
    if len(tree["base_weights"]) != n * width:
        _refuse(i, f"it needs {n * width} base weights, not {len(tree['base_weights'])}")
    layout = "leaf_weights" in tree
    if _LEAF_WEIGHTS_READER and not (layout and all(k in tree for k in _VECTOR_ARRAYS)):
        raise _before_3_2_error(what, f"tree {i} is a vector-leaf tree")
    if layout:
        if any(len(tree[k]) != n for k in _VECTOR_ARRAYS):
            _refuse(i)
        leaves = int(np.count_nonzero(np.asarray(tree["left_children"]) == -1))
        if len(tree["leaf_weights"]) != leaves * width:
            _refuse(i, f"its {leaves} leaves need {leaves * width} leaf weights, not {len(tree['leaf_weights'])}")
    return layout


def _before_3_2_error(what: str, subject: str) -> VersionMismatchError:
    return VersionMismatchError(
        f"{what}: {subject} (multi_strategy='multi_output_tree') in the layout XGBoost wrote "
        f"before 3.2, which XGBoost {xgboost.__version__} reads past its arrays (it crashes); load it where "
        "xgboost<3.2 is installed, or train it again with this version")


def _vector_leaves_before_3_2(raw: bytes | bytearray) -> bool:
    """Whether the file holds vector-leaf trees without `leaf_weights`, found without parsing it (trusted loads).

    Every tree of a model has the same leaf width (`size_leaf_vector`, a string in JSON and UBJSON alike), so
    the first one tells: 2 us for a scalar model. Only a vector-leaf one is searched for `leaf_weights`.
    """
    at = raw.find(b"size_leaf_vector")
    width = re.match(rb"[^0-9]{1,16}?([0-9]+)", raw[at + 16:at + 64]) if at >= 0 else None  # "4" or S L <8> 4
    return width is not None and int(width.group(1)) > 1 and b"leaf_weights" not in raw


def _leaf_indices_checked(sizes: Any, vector: dict[int, bool], left: Any, right: Any) -> Any:
    """`right` with -1 at the leaves of trees whose leaves index `leaf_weights`, once those indices are checked.

    A leaf of such a tree keeps its place in `leaf_weights` in `right_children`: the leaves of a tree must
    number their vectors 0, 1, ... once each. With them set to -1, the tree checks as any other.
    """
    tree = np.repeat(np.arange(len(sizes)), np.asarray(sizes, dtype=np.int64))
    indexed = np.zeros(len(sizes), dtype=bool)
    indexed[[i for i, layout in vector.items() if layout]] = True
    at = np.flatnonzero((np.asarray(left) == -1) & indexed[tree])  # the leaves that index leaf_weights, tree by tree
    bad = _first_misnumbered(np.asarray(right[at], dtype=np.int64), np.bincount(tree[at], minlength=len(sizes)))
    if bad is not None:
        _refuse(bad)
    checked = np.array(right, dtype=np.int64)
    checked[at] = -1
    return checked


def _check_cats(cats: Any) -> None:
    """The category encodings XGBoost 3.1+ keeps to recode a frame's categories at predict time.

    Per feature, a string column's `offsets` into its bytes or a numeric column's values; the
    features' category counts laid end to end (`feature_segments`); each feature's categories in sorted
    order (`sorted_idx`, indices into that feature's). XGBoost follows all of these unchecked: offsets
    or sorted indices out of range crashed it.
    """
    counts = []
    for column in cats["enc"]:
        if "offsets" in column:
            offsets = _ints(column["offsets"], "a category column's offsets")
            if len(offsets) and (offsets[0] != 0 or bool((np.diff(offsets) < 0).any())
                                 or int(offsets[-1]) > len(column["values"])):
                raise ValueError("a category column's offsets must rise from 0 within its values")
            counts.append(max(len(offsets) - 1, 0))
        else:
            counts.append(len(column["values"]))
    segments = _ints(cats["feature_segments"], "feature_segments")
    order = _ints(cats["sorted_idx"], "sorted_idx")
    if not len(segments):
        if len(order) or counts:
            raise ValueError("category encodings without feature_segments")
        return
    if len(segments) != len(counts) + 1 or segments[0] != 0 or not np.array_equal(np.diff(segments), counts):
        raise ValueError("feature_segments disagree with the category encodings")
    total = int(segments[-1])
    if len(order) not in (0, total) or (cats.get("sorted") is True and len(order) != total):
        raise ValueError("sorted_idx needs one entry per category")
    if len(order) and _first_misnumbered(np.asarray(order, dtype=np.int64), np.asarray(counts)) is not None:
        raise ValueError("sorted_idx must order each feature's own categories")  # each feature's own, each once


def _first_misnumbered(local: Any, counts: Any) -> int | None:
    """The first group whose entries do not number 0 .. n-1 once each, or None.

    `local` holds the groups' entries one group after another, `counts[g]` of group g.
    """
    counts = np.asarray(counts, dtype=np.int64)
    group = np.repeat(np.arange(len(counts)), counts)
    ok = (local >= 0) & (local < counts[group])
    if not ok.all():
        return int(group[np.argmax(~ok)])
    taken = np.bincount(local + (np.cumsum(counts) - counts)[group], minlength=len(local))
    return int(group[np.argmax(taken != 1)]) if (taken != 1).any() else None


def _tree_of(sizes: Any, node: int) -> int:
    """The tree that holds the `node`-th node of all trees' joined arrays."""
    return int(np.searchsorted(np.cumsum(sizes), node, side="right"))


def _first_bad_parents(sizes: Any, left: Any, right: Any, parents: Any, vector: list[int],
                       *, index: tuple[Any, Any]) -> int | None:
    """Return the first tree whose `parents` disagree with its children, or None.

    Every node but the root is the child of exactly one node, which is its parent; the root's parent
    is 2**31 - 1 as XGBoost writes it (-1 in the `vector` trees, the vector-leaf ones). XGBoost follows
    each node's parent as it loads (to mark left children), unchecked: a parent index past the tree
    made the load segfault. Called once children are known to lie inside their trees, after their
    parent (`first_bad_tree`).

    Checked without an array of expected parents: each inner node's two children must name it as their
    parent, and be two nodes. Then no node is the child of two (it would name both), so the children
    are 2 x (inner nodes) distinct non-root nodes: every non-root node is one exactly when a tree has
    that many plus one nodes. The root is no node's child (children come after their parent), and its
    own entry is checked apart.
    """
    counts = np.asarray(sizes, dtype=np.int64)
    starts, local = index  # `local_index(sizes)`
    is_inner = np.asarray(left) != -1
    inner = np.flatnonzero(is_inner)
    own, first_child, second_child = local[inner], np.asarray(left)[inner], np.asarray(right)[inner]
    base = inner - own  # the global index of each inner node's tree's root
    of = np.asarray(parents)
    bad_nodes = ((of[base + first_child] != own) | (of[base + second_child] != own)
                 | (first_child == second_child))
    inner_counts = np.add.reduceat(is_inner.astype(np.int64), starts)
    roots = np.full(len(counts), _ROOT_PARENT, dtype=np.int64)
    roots[vector] = -1
    bad_trees = (2 * inner_counts != counts - 1) | (of[starts] != roots)
    first = [int(np.argmax(bad_trees))] if bad_trees.any() else []
    if bad_nodes.any():
        first.append(_tree_of(counts, int(inner[np.argmax(bad_nodes)])))
    return min(first) if first else None


def _categories_ok(tree: Any, split_type: Any, left: Any) -> bool:
    """Whether a tree's categorical splits are where its category lists say, each list inside `categories`.

    XGBoost reads `categories_nodes` in order while it walks the nodes, builds each split's bit set
    from its slice of `categories` (as large as the largest category), and predicts categorical nodes
    (`split_type` 1) from those sets: the nodes listed must be exactly the inner nodes marked
    categorical, ascending, their slices non-empty and inside the list, the categories int32 and not
    negative.
    """
    nodes, segments, sizes, categories = (np.asarray(tree.get(k, ()), dtype=np.int64) for k in (
        "categories_nodes", "categories_segments", "categories_sizes", "categories"))
    marked = np.flatnonzero(split_type == 1)
    return bool(len(nodes) == len(segments) == len(sizes) and np.array_equal(nodes, marked)
                and np.all(left[marked] != -1) and np.all((segments >= 0) & (sizes > 0))
                and np.all(segments + sizes <= len(categories))
                and np.all((categories >= 0) & (categories <= _INT32_MAX)))


_ROOT_PARENT = _INT32_MAX = 2**31 - 1


class _BadTree(Exception):
    """Tree `args[0]` is refused for `args[1]`: `validate` names the file."""


def _refuse(i: int, why: str = "child, feature or category indices point outside its arrays") -> NoReturn:
    raise _BadTree(i, why)
