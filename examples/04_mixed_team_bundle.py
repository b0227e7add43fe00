"""Tutorial 4: a mixed team ships an sklearn preprocessor and a torch model as one bundle.

The data team fits the preprocessing, the modelling team trains the net; `save_any` takes both (and
the label names) as one dict, stores a small example with each model's answers on it, and a fresh
process on "another machine" proves with `mlpersist check` that it answers the same before serving.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import mlpersist

X, y = make_classification(n_samples=400, n_features=8, random_state=0)
X = X.astype(np.float32)
preprocess = make_pipeline(StandardScaler()).fit(X)

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
features, target = torch.from_numpy(preprocess.transform(X)), torch.from_numpy(y)
for _ in range(50):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(net(features), target).backward()
    optimizer.step()

bundle = {"preprocess": preprocess, "model": net, "labels": ["stays", "churns"]}
example = {"preprocess": X[:16], "model": features[:16]}

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "churn-bundle"
    manifest = mlpersist.save_any(bundle, path, example=example, metadata={"owner": "churn-team"})
    print({key: part.adapter for key, part in manifest.parts.items()})

    cli = [sys.executable, "-m", "mlpersist"]
    print(subprocess.run([*cli, "inspect", str(path)], check=True, capture_output=True, text=True).stdout)
    print(subprocess.run([*cli, "check", str(path)], check=True, capture_output=True, text=True).stdout)
    print(subprocess.run([*cli, "requirements", str(path)], check=True, capture_output=True, text=True).stdout)

    # the serving side: a fresh interpreter that never saw the classes above
    serve = f"""
import numpy as np, torch, mlpersist
b = mlpersist.load_any({str(path)!r}, check=True)
x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
with torch.no_grad():
    scores = b["model"].eval()(torch.from_numpy(b["preprocess"].transform(x)))
print([b["labels"][i] for i in scores.argmax(1).tolist()])
"""
    served = subprocess.run([sys.executable, "-c", serve], check=True, capture_output=True, text=True).stdout
    with torch.no_grad():
        x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
        here = [bundle["labels"][i] for i in net.eval()(torch.from_numpy(preprocess.transform(x))).argmax(1).tolist()]
    assert served.strip() == str(here), (served, here)
    print("served in a fresh process:", served.strip())
