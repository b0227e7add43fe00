"""Tutorial 2: a RandomForestClassifier(n_estimators=50), saved compressed, verified, loaded in a fresh process."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

import mlpersist

X, y = make_classification(n_samples=1000, n_features=20, n_informative=8, random_state=0)
model = RandomForestClassifier(n_estimators=50, random_state=0).fit(X, y)

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "forest"
    mlpersist.save_any(model, path, compress=3)
    mlpersist.verify(path)  # every file's size and digest (BLAKE3) match the manifest
    np.save(Path(tmp) / "X.npy", X[:100])

    code = (
        "import numpy as np, mlpersist, sys;"
        f"m = mlpersist.load_any({str(path)!r});"
        f"np.save({str(Path(tmp) / 'p.npy')!r}, m.predict_proba(np.load({str(Path(tmp) / 'X.npy')!r})))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    fresh = np.load(Path(tmp) / "p.npy")
    assert (fresh == model.predict_proba(X[:100])).all()
    print(f"a fresh process loaded the 50-tree forest and gave identical probabilities on {len(fresh)} rows")
