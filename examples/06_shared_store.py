"""Tutorial 6: a model shared through an object store URL, with versions, overwrite and the download cache.

The URL here is fsspec's in-memory store, so the example needs no server; with `pip install 'mlpersist[s3]'`
the same calls take `s3://team-models/churn/v3` (credentials from the environment or storage_options=).
"""

import os
import tempfile
from pathlib import Path

import fsspec
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

import mlpersist

X, y = make_classification(n_samples=400, n_features=8, random_state=0)
v1 = LogisticRegression().fit(X, y)
v2 = RandomForestClassifier(n_estimators=50, random_state=0).fit(X, y)

with tempfile.TemporaryDirectory() as tmp:
    os.environ["MLPERSIST_CACHE_DIR"] = str(Path(tmp) / "cache")  # a private cache, for the demo only
    url = "memory://team-models/churn"

    mlpersist.save_any(v1, url, metadata={"version": 1}, example=X[:8])
    store = fsspec.filesystem("memory")
    print("in the store:", *sorted(p.removeprefix("/team-models/churn/") for p in store.find("/team-models/churn")))

    # A colleague loads it: checked against the manifest, rerun on the stored example, cached by digest.
    model = mlpersist.load_any(url, check=0.0)
    assert (model.predict_proba(X) == v1.predict_proba(X)).all()

    # Saving over it needs overwrite=True; readers get the old model or the new one, never a mix.
    try:
        mlpersist.save_any(v2, url)
    except mlpersist.ArtifactExistsError as exc:
        print("refused:", exc)
    mlpersist.save_any(v2, url, overwrite=True, metadata={"version": 2})
    print("now serving version", mlpersist.inspect(url).metadata["version"], mlpersist.inspect(url).model_class)
    assert (mlpersist.load_any(url).predict_proba(X) == v2.predict_proba(X)).all()

    # The cache holds each payload file once, under its digest: the next load downloads nothing.
    cached = sorted((Path(tmp) / "cache" / "blobs").rglob("*"))
    print("cache:", len([p for p in cached if p.is_file()]), "files")
    mlpersist.verify(url)  # re-reads every blob from the store itself
    print("verified", url)
    store.rm("/team-models", recursive=True)
