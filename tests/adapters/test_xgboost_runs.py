"""The UBJSON reader's runs (`mlpersist._runs`): like trees read as columns must read as the long way reads them.

Every test compares the two ways on the same bytes: `loads(..., runs=False)` reads each object entry by
entry, the reference. Runs are a speed-up only: any difference in what is read, refused or accepted is
a bug.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlp_testkit import require
from ubjson_kit import ARRAY_MARKERS, INT_MARKERS, encode, read_arrays, same

from mlpersist import CorruptArtifactError, save_any


def _both(raw: bytes) -> tuple[Any, Any]:
    from mlpersist._ubjson import loads

    return loads(raw, "doc", lazy=True), loads(raw, "doc", lazy=True, runs=False)


def _outcome(raw: bytes) -> tuple[str, str, Any, Any]:
    """What each way makes of `raw`: parsed or refused, then checked or refused (the exception's class)."""
    from mlpersist.adapters.xgboost import validate

    outcomes: list[str] = []
    docs: list[Any] = []
    for runs in (True, False):
        from mlpersist._ubjson import loads

        try:
            doc = loads(raw, "doc", lazy=True, runs=runs)
        except CorruptArtifactError:
            outcomes.append("corrupt")
            docs.append(None)
            continue
        docs.append(doc)
        try:
            validate(doc, "doc")
            outcomes.append("ok")
        except Exception as exc:  # the class is what is compared: both ways must raise the same
            outcomes.append(type(exc).__name__)
    return outcomes[0], outcomes[1], docs[0], docs[1]


def _trees(doc: Any) -> Any:
    return doc["learner"]["gradient_booster"]["model"]["trees"]


def _model(kind: str, tmp_path: Path) -> bytes:
    xgb = require("xgboost")
    x, y = require("sklearn.datasets").make_classification(400, 6, n_informative=4, n_classes=3 if kind in (
        "multiclass", "vector") else 2, random_state=0)
    params: dict[str, Any] = {"n_estimators": 150 if kind == "binary" else 12, "max_depth": 3}
    if kind == "vector":
        params.update(multi_strategy="multi_output_tree", tree_method="hist")
        y = require("numpy").eye(3)[y]
        model = xgb.XGBRegressor(**params).fit(x, y)
    elif kind == "categorical":
        pd = require("pandas")
        frame = pd.DataFrame(x).assign(c=pd.Categorical((x[:, 0] > 0).astype(int) + (x[:, 1] > 0)))
        model = xgb.XGBClassifier(enable_categorical=True, tree_method="hist", **params).fit(frame, y)
    elif kind == "dart":
        model = xgb.XGBClassifier(booster="dart", **params).fit(x, y)
    else:
        model = xgb.XGBClassifier(**params).fit(x, y)
    save_any(model, tmp_path / kind)
    return (tmp_path / kind / "model.ubj").read_bytes()


def test_a_model_s_trees_are_read_as_runs(tmp_path: Path) -> None:
    """150 trees: ids 0-126 are written in one byte, the rest in two: two runs, each after a tree read the long way."""
    from mlpersist._rows import Rows
    from mlpersist._runs import Run

    raw = _model("binary", tmp_path)
    fast, slow = _both(raw)
    trees = _trees(fast)
    assert isinstance(trees, Rows) and len(trees) == 150
    assert [len(p) if isinstance(p, Run) else 0 for p in trees.parts] == [0, 126, 0, 22]
    assert same(read_arrays(fast), read_arrays(slow))
    assert isinstance(_trees(slow), list)


@pytest.mark.parametrize("kind", ["binary", "multiclass", "categorical", "vector", "dart"])
def test_changed_models_read_and_check_the_same_both_ways(kind: str, tmp_path: Path) -> None:
    """One to four bytes changed in the trees (or a count set to another tree's): the same document, or the same error.

    Changes inside a run's template bytes or counts end the run there; changes in its data are read as
    data. Either way the long way must agree, on what is read and on what the check says of it.
    """
    raw = _model(kind, tmp_path)
    start = raw.index(b"trees[") + 6
    rng = random.Random(20261128)
    seen = set()
    for _ in range(150):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(start, len(raw) - 200)
            data[at] = rng.choice([rng.randrange(256), data[at] ^ 1, 0, ord("{")])
        fast, slow, fast_doc, slow_doc = _outcome(bytes(data))
        assert fast == slow, f"at {at}: runs {fast}, the long way {slow}"
        if fast_doc is not None:
            assert same(read_arrays(fast_doc), read_arrays(slow_doc))
        seen.add(fast)
    assert "ok" in seen and len(seen) > 1  # both accepted and refused changes were compared


@st.composite
def _siblings(draw: Any) -> list[dict[str, Any]]:
    """Like objects, as the trees of a model are, some of them unlike the others in one way or another."""
    np = require("numpy")
    kinds = draw(st.lists(st.sampled_from(["lead", "array", "number", "digits", "text", "constant", "object"]),
                          min_size=1, max_size=6))
    dtypes = [draw(st.sampled_from(list(ARRAY_MARKERS))) for _ in kinds]
    leads = draw(st.lists(st.integers(0, 300), min_size=2, max_size=12))
    texts = ["0", "1", "20", "é", ""]
    out = []
    for i, n in enumerate(leads):
        obj: dict[str, Any] = {}
        for j, (kind, dtype) in enumerate(zip(kinds, dtypes, strict=True)):
            key = f"k{j}"
            if kind == "lead":
                obj[key] = (np.arange(n) * (i + 1)).astype(dtype)
            elif kind == "array":
                obj[key] = np.full(draw(st.sampled_from([0, 0, 3])), i, dtype=dtype)
            elif kind == "number":
                obj[key] = draw(st.sampled_from([i, i * 300, -i, 2**40 + i, float(i)]))
            elif kind == "digits":
                obj[key] = draw(st.sampled_from([str(n), str(n), str(n + 1)]))
            elif kind == "text":
                obj[key] = draw(st.sampled_from([texts[j % len(texts)], texts[j % len(texts)], "x"]))
            elif kind == "constant":
                obj[key] = draw(st.sampled_from([None, None, True, False]))
            else:
                obj[key] = {"num_nodes": str(n), "width": draw(st.sampled_from(["1", "1", "2"]))}
        if draw(st.integers(0, 9)) == 0:  # unlike the others: a key more, one less, or another order
            change = draw(st.sampled_from(["more", "less", "order"]))
            if change == "more":
                obj["extra"] = 1
            elif change == "less" and obj:
                obj.pop(next(iter(obj)))
            else:
                obj = dict(reversed(list(obj.items())))
        out.append(obj)
    return out


@settings(max_examples=400, deadline=None)
@given(trees=_siblings(), wide=st.sampled_from("UIL"), counted=st.booleans(), noop=st.booleans())
def test_lists_of_like_objects_read_as_written(trees: list[dict[str, Any]], wide: str, counted: bool,
                                               noop: bool) -> None:
    from mlpersist._ubjson import loads

    doc = {"trees": trees, "after": [{"k0": 1}, {"k0": 2}]}
    raw = encode(doc, wide, counted, noop)
    assert same(read_arrays(loads(raw, "doc", lazy=True)), doc)


def test_like_objects_make_one_run_and_unlike_ones_a_bounded_number_of_tries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of objects that each differ from the last tries at most `MAX_ATTEMPTS` templates, not one per object,
    and a document of many lists at most `MAX_TEMPLATES`."""
    np = require("numpy")
    from mlpersist import _runs, _template
    from mlpersist._ubjson import loads

    like = [{"n": np.arange(i % 7, dtype="int32"), "id": i, "size": str(i % 7)} for i in range(200)]
    rows = loads(encode({"t": like}, "L"), "doc", lazy=True)["t"]
    assert [len(p) if isinstance(p, _runs.Run) else 0 for p in rows.parts] == [0, 199]  # the first read the long way
    assert same(read_arrays(rows), like)

    tried = []
    template = _template.template  # the templates tried (`_template`), each for a run (`_runs`)
    monkeypatch.setattr(_template, "template", lambda *a: tried.append(1) or template(*a))
    unlike = [{f"k{i}": np.arange(3, dtype="int32")} for i in range(200)]
    assert same(read_arrays(loads(encode({"t": unlike}, "L"), "doc", lazy=True)), {"t": unlike})
    assert len(tried) == _runs.MAX_ATTEMPTS

    tried.clear()  # many short lists: a budget for the whole document, not a try per list
    short = [[{"n": np.arange(2, dtype="int32")}, {"n": np.arange(3, dtype="int32")}] for _ in range(500)]
    rows = loads(encode({"t": short}, "L"), "doc", lazy=True)["t"]
    assert same(read_arrays(rows), short)
    assert len(tried) == _runs.MAX_TEMPLATES


_WIDTHS = {marker.decode(): fmt for marker, fmt, _, _ in INT_MARKERS}


@settings(max_examples=400, deadline=None)
@given(runs=st.lists(st.tuples(st.sampled_from("iUIlL"), st.lists(st.integers(-128, 127), min_size=1, max_size=40),
                               st.integers(-1, 40)), max_size=6),
       counted=st.booleans(), cut=st.integers(0, 12), tail=st.sampled_from([b"", b"]", b"Z", b"i", b"i\x05"]))
def test_untyped_integer_lists_read_as_the_long_way_reads_them(runs: list[tuple[str, list[int], int]], counted: bool,
                                                                cut: int, tail: bytes) -> None:
    """Runs of like integers (`tree_info`, `iteration_indptr`) read a run at a time: runs of each width, a
    no-op inside some, the list counted or closed, then cut short or followed by stray bytes."""
    import struct

    items = [(marker, value % 256 if marker == "U" else value, i == noop) for marker, values, noop in runs
             for i, value in enumerate(values)]
    body = b"".join((b"N" if noop else b"") + marker.encode() + struct.pack(_WIDTHS[marker], value)
                    for marker, value, noop in items)
    raw = b"[" + (b"#L" + struct.pack(">q", len(items)) + body if counted else body + b"]")
    raw = (raw[:len(raw) - cut] if cut else raw) + tail
    outcomes = []
    for fast in (True, False):
        from mlpersist._ubjson import loads

        try:
            outcomes.append(("read", loads(raw, "doc", lazy=True, runs=fast)))
        except CorruptArtifactError as exc:
            outcomes.append(("refused", str(exc)))
    assert outcomes[0] == outcomes[1]
    if not cut and not tail:
        assert outcomes[0] == ("read", [value for _, value, _ in items])
