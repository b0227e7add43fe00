"""Tutorial 3: a scaler + classifier Pipeline whose loaded copy scales new data exactly as the original."""

import tempfile
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import mlpersist

X, y = make_classification(n_samples=500, n_features=5, random_state=1)
pipeline = Pipeline([("scaler", StandardScaler()), ("classifier", LogisticRegression())]).fit(X, y)

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "pipeline"
    mlpersist.save_any(pipeline, path)
    loaded = mlpersist.load_any(path)

    new_data = np.random.default_rng(3).normal(size=(10, 5))
    scaled_before = pipeline.named_steps["scaler"].transform(new_data)
    scaled_after = loaded.named_steps["scaler"].transform(new_data)
    assert (scaled_before == scaled_after).all() and (loaded.predict(new_data) == pipeline.predict(new_data)).all()
    print("the loaded pipeline scales new data exactly as the original: mean",
          loaded.named_steps["scaler"].mean_.round(3), "scale", loaded.named_steps["scaler"].scale_.round(3))

    # Saving again over the same path needs overwrite=True; readers never see a half-written model.
    try:
        mlpersist.save_any(pipeline, path)
    except mlpersist.ArtifactExistsError as exc:
        print("as expected:", exc)
    mlpersist.save_any(pipeline, path, overwrite=True)
