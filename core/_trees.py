"""The index check every tree-ensemble adapter needs, over all of a model's trees in a few numpy calls.

Tree predictors (scikit-learn's Cython `Tree`, XGBoost's C++ predictor) follow child indices and read
feature columns without bounds checks: a crafted file would make them read outside their arrays.
A forest is many small trees, so the checks run once over all trees' arrays joined, instead of a dozen
numpy calls per tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def first_bad_tree(counts: Sequence[int], left: Any, right: Any, feature: Any, n_features: Any, *,
                   adjacent: bool, index: tuple[Any, Any] | None = None) -> int | None:
    """Return the index of the first tree whose child or feature indices point outside its arrays, or None.

    `left`, `right` and `feature` hold every tree's node arrays joined, tree after tree, `counts[i]`
    nodes for tree i; a leaf has -1 for both children. An inner node's children come after it and
    inside its tree, its feature is in `[0, n_features)` (one bound for all trees, or one per tree).
    `adjacent`: the predictor also assumes the right child is the left one's neighbour (XGBoost).
    `index`: `local_index(counts)`, when the caller has made it for a check of its own.

    Raises:
        ValueError: the arrays are not integers, or do not hold `counts[i]` nodes per tree.

    """
    import numpy as np

    left, right, feature = (np.asarray(a) for a in (left, right, feature))
    sizes = np.asarray(counts, dtype=np.int64)
    if any(a.dtype.kind not in "iu" for a in (left, right, feature)):
        raise ValueError("child and feature indices must be integers")
    if (sizes < 1).any() or not len(left) == len(right) == len(feature) == int(sizes.sum()):
        raise ValueError("every tree needs at least one node and one entry per node in each array")
    if sizes.size == 0:
        return None
    starts, idx = local_index(sizes) if index is None else index  # each node's index in its tree
    nodes = np.repeat(sizes.astype(idx.dtype), sizes)  # the size of each node's tree
    bound = np.repeat(np.asarray(n_features, dtype=np.int64), sizes) if np.ndim(n_features) else n_features
    leaf = left == -1
    inner_ok = (left > idx) & (left < nodes) & (right > idx) & (right < nodes) & (feature >= 0) & (feature < bound)
    if adjacent:
        inner_ok &= right == left + 1
    bad = (leaf != (right == -1)) | ~(leaf | inner_ok)
    if not bad.any():
        return None
    return int(np.searchsorted(starts, int(np.argmax(bad)), side="right")) - 1


def local_index(sizes: Any) -> tuple[Any, Any]:
    """The first node of each tree in the joined arrays, and each node's index in its own tree.

    `sizes`: the trees' node counts (int64, each at least 1). The indices are int32 when they fit (every
    model does): the arrays a check makes of them are then half as large, and freshly allocated memory
    is much of what such a check pays for (each page of a new array faulted in).
    """
    import numpy as np

    total = int(sizes.sum())
    starts = np.cumsum(sizes) - sizes
    local = np.ones(total, dtype=np.int32 if total < 2**31 else np.int64)
    if total:
        local[starts[1:]] = 1 - sizes[:-1]  # back to 0 at each tree's first node
        local[0] = 0
    return starts, np.cumsum(local, out=local)


def first_too_deep(sizes: Any, left: Any, right: Any, limits: Any, index: tuple[Any, Any]) -> tuple[int, str] | None:
    """The first tree with a node two nodes name as their child; else the first with a node deeper than its limit.

    Returns None, or the tree's index and the rule it breaks ("parents" or "depth"). Call it once `first_bad_tree`
    found every child after its node and inside its tree. `limits`: each tree's recorded depth (the root's
    depth is 0). scikit-learn's `Tree.decision_path` allocates `1 + max_depth` entries per row and writes one
    per node on the row's path, unchecked: a `max_depth` below the depth of the tree's nodes writes past that
    buffer (a heap overflow). A node with two parents makes the paths down as many as 2**depth, which the
    walks of partial dependence and export follow one by one.
    """
    import numpy as np

    left, right = np.asarray(left), np.asarray(right)
    starts = index[0]
    offset = np.repeat(starts, np.asarray(sizes, dtype=np.int64))  # each node's tree's first node, in the joined arrays
    inner = left != -1
    to_left, to_right = left + offset, right + offset  # children as indices into the joined arrays
    parents = np.bincount(np.concatenate((to_left[inner], to_right[inner])), minlength=len(left))
    if (parents > 1).any():
        return int(np.searchsorted(starts, int(np.argmax(parents > 1)), side="right")) - 1, "parents"
    deepest = np.zeros(len(starts), dtype=np.int64)  # the depth of each tree's deepest node
    frontier, trees, level = starts, np.arange(len(starts)), 0  # breadth first: each node is met once
    while frontier.size:
        deepest[trees] = level
        keep = inner[frontier]
        frontier, trees = frontier[keep], trees[keep]
        frontier, trees = np.concatenate((to_left[frontier], to_right[frontier])), np.concatenate((trees, trees))
        level += 1
    bad = deepest > np.asarray(limits, dtype=np.int64)
    return (int(np.argmax(bad)), "depth") if bad.any() else None
