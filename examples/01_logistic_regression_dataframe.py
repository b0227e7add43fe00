"""Tutorial 1: a LogisticRegression fitted on a small pandas DataFrame, saved and loaded back."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import mlpersist

rng = np.random.default_rng(42)
df = pd.DataFrame({"hours_studied": rng.uniform(0, 10, 200), "hours_slept": rng.uniform(4, 9, 200)})
df["passed"] = (df["hours_studied"] + 0.5 * df["hours_slept"] + rng.normal(0, 1, 200) > 7).astype(int)
X_train, X_test, y_train, y_test = train_test_split(df[["hours_studied", "hours_slept"]], df["passed"],
                                                    test_size=0.25, random_state=0)
model = LogisticRegression().fit(X_train, y_train)

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "exam-model"
    manifest = mlpersist.save_any(model, path, metadata={"dataset": "synthetic exams", "rows": len(df)})
    print(f"saved {manifest.model_class} with scikit-learn {manifest.framework_version}: {sorted(manifest.files)}")

    loaded = mlpersist.load_any(path)
    assert (loaded.predict_proba(X_test) == model.predict_proba(X_test)).all()
    print(f"accuracy before save {model.score(X_test, y_test):.3f}, after load {loaded.score(X_test, y_test):.3f}")

    # Another process (another machine, next year) needs only the path:
    out = subprocess.run([sys.executable, "-m", "mlpersist", "inspect", str(path)], capture_output=True,
                         text=True, check=True)
    print(out.stdout)
