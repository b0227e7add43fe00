"""Each framework's tests in a virtualenv of its own: `nox -s sklearn`, `nox -s core`, plain `nox` for all."""

from __future__ import annotations

import glob
import os
import time

import nox

nox.needs_version = ">=2025.02.09"
nox.options.default_venv_backend = "venv"  # pip, not uv: uv would fetch a CUDA torch on this machine
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
PYPROJECT = nox.project.load_toml("pyproject.toml")
TEST = PYPROJECT["dependency-groups"]["test"]
CONSTRAINTS = ("-c", "tests/constraints.txt")
# framework -> (mlpersist extras, other packages) its session installs next to the test tools
FRAMEWORKS: dict[str, tuple[str, list[str]]] = {
    "sklearn": ("sklearn,sign", ["pandas"]),
    "torch": ("torch,sign", ["numpy"]),
    # xgboost-cpu: the same xgboost module without the 350 MB CUDA NCCL wheel `xgboost` pulls on Linux
    "xgboost": ("sign", ["xgboost-cpu", "scikit-learn", "pandas"]),
    # TensorFlow backend; torch and jax too, for the tests that save on one backend and load on another
    "keras": ("keras,torch,sign", ["tensorflow-cpu", "jax", "numpy"]),
    # third-party adapters written against the public API only (examples/adapters/): one by entry point,
    # one by register_adapter()
    "lightgbm": ("sign", ["-e", "examples/adapters/lightgbm", "lightgbm", "scikit-learn", "pandas"]),
    "catboost": ("sign", ["-e", "examples/adapters/catboost", "catboost", "scikit-learn"]),
}
EVERYTHING = (".[sklearn,torch,keras,sign]", "tensorflow-cpu", "xgboost-cpu", "pandas")  # every framework


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    """Core tests with no framework installed at all."""
    session.install(*CONSTRAINTS, "-e", ".", *TEST)
    session.run("pytest", "tests/core", *session.posargs)


def _adapter_session(framework: str, extras: str, packages: list[str]) -> None:
    """Register `nox -s <framework>`: one adapter's tests, next to the framework-free core."""

    @nox.session(name=framework, python=PYTHON)
    def run(session: nox.Session) -> None:
        session.install(*CONSTRAINTS, "-e", f".[{extras}]", *TEST, *packages)
        session.run("pytest", "tests/core", "tests/contract.py", *_adapter_tests(framework), *session.posargs,
                    env={"MLPERSIST_REQUIRE": framework})


def _adapter_tests(framework: str) -> list[str]:
    return sorted(glob.glob(f"tests/adapters/test_{framework}*.py"))


for _fw, (_extras, _packages) in FRAMEWORKS.items():
    _adapter_session(_fw, _extras, _packages)


# The other ends of the supported range: the core, scikit-learn and XGBoost tests on the oldest Python with the
# oldest releases pyproject.toml admits, and on the newest Python with the newest (torch's CPU build here is for
# 3.11 only; Keras stays on PYTHON).
COMPAT = {"3.10": "tests/constraints-py310.txt", "3.13": "tests/constraints.txt"}


@nox.session(python=list(COMPAT))
def compat(session: nox.Session) -> None:
    """The pickle guard, the scikit-learn checks and the UBJSON reader on other Pythons and library releases."""
    session.install("-c", COMPAT[str(session.python)], "-e", ".[sklearn,sign]", "xgboost-cpu", "pandas", *TEST)
    session.run("pytest", "tests/core", "tests/contract.py", *_adapter_tests("sklearn"), *_adapter_tests("xgboost"),
                *session.posargs, env={"MLPERSIST_REQUIRE": "sklearn,xgboost"})


@nox.session(name="compat-keras", python=PYTHON)
def compat_keras(session: nox.Session) -> None:
    """The Keras tests on the oldest Keras pyproject.toml admits (3.6, with TensorFlow 2.18 and numpy 1)."""
    session.install("-c", "tests/constraints-keras-oldest.txt", "-e", ".[keras,sign]", "tensorflow-cpu", *TEST)
    session.run("pytest", "tests/contract.py", *_adapter_tests("keras"), *session.posargs,
                env={"MLPERSIST_REQUIRE": "keras"})


@nox.session(name="keras-torch", python=PYTHON)
def keras_torch(session: nox.Session) -> None:
    """The backend-independent Keras tests again on KERAS_BACKEND=torch (no TensorFlow installed)."""
    _keras_on(session, "torch", "-e", ".[keras,torch]")


@nox.session(name="keras-jax", python=PYTHON)
def keras_jax(session: nox.Session) -> None:
    """The backend-independent Keras tests again on KERAS_BACKEND=jax (jax's CPU build; no TensorFlow installed)."""
    _keras_on(session, "jax", "-e", ".[keras]", "jax")


def _keras_on(session: nox.Session, backend: str, *install: str) -> None:
    session.install(*CONSTRAINTS, *install, *TEST, "numpy")
    session.install("-c", "tests/constraints-hdf5-2.txt", "h5py")  # HDF5 2.0: TensorFlow's cap does not apply
    session.run("pytest", "tests/contract.py", "tests/adapters/test_keras.py", *session.posargs,
                env={"MLPERSIST_REQUIRE": "keras", "KERAS_BACKEND": backend})


@nox.session(python=PYTHON)
def isolation(session: nox.Session) -> None:
    """Fresh interpreters prove `import mlpersist` and each load pull in no other framework."""
    session.install(*CONSTRAINTS, "-e", *EVERYTHING, *TEST)
    session.run("pytest", "tests/test_isolation.py", *session.posargs, env={"MLPERSIST_REQUIRE": "sklearn"})


@nox.session(python=PYTHON)
def interop(session: nox.Session) -> None:
    """Every framework together: bundles across frameworks, dispatch precedence, bare files of every kind."""
    session.install(*CONSTRAINTS, "-e", *EVERYTHING, "-e", "examples/adapters/lightgbm", "lightgbm", "packaging",
                    *TEST)
    session.run("pytest", "tests/test_interop.py", *session.posargs,
                env={"MLPERSIST_REQUIRE": "numpy,torch,xgboost,lightgbm,keras,pandas,sklearn,tensorflow"})


@nox.session(python=PYTHON)
def remote(session: nox.Session) -> None:
    """Artifacts in S3: a real S3 endpoint (moto's standalone server, started and stopped by the tests' fixture
    on a free loopback port) reached through s3fs, with a model of every framework."""
    session.install(*CONSTRAINTS, "-e", *EVERYTHING, "-e", ".[s3]", "moto[server]", "boto3", *TEST)
    session.run("pytest", "tests/remote", *session.posargs,
                env={"MLPERSIST_REQUIRE": "numpy,torch,xgboost,keras,sklearn,moto,boto3,s3fs"})


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Run every script in examples/ end to end."""
    session.install(*CONSTRAINTS, "-e", ".[sklearn,torch,remote]", "pandas")
    for script in sorted(glob.glob("examples/*.py")):
        session.run("python", script)


@nox.session(python=PYTHON, default=False)
def mutants(session: nox.Session) -> None:
    """Nightly (about an hour): every adapter's changed-copy test at ten times its counts, on the day's seed.

    CI loads a few hundred copies per model kind, always the same ones; the crashes those found appeared at
    0.2-0.5 % per copy. MUTANTS_SCALE and MUTANTS_SEED override the count multiplier and the seed.
    """
    session.install(*CONSTRAINTS, "-e", *EVERYTHING, "-e", "examples/adapters/lightgbm", "lightgbm", *TEST)
    _run_mutants(session, sorted(glob.glob("tests/adapters/test_*.py")), "sklearn,torch,xgboost,keras,lightgbm")


@nox.session(name="mutants-compat", python="3.10", default=False)
def mutants_compat(session: nox.Session) -> None:
    """The nightly changed copies on the oldest releases (compat-3.10's): scikit-learn 1.3 and XGBoost 2.1.

    Their readers are other code than the newest ones': what a crafted copy does to them is tested apart.
    """
    session.install("-c", COMPAT["3.10"], "-e", ".[sklearn,sign]", "xgboost-cpu", "pandas", *TEST)
    _run_mutants(session, [*_adapter_tests("sklearn"), *_adapter_tests("xgboost")], "sklearn,xgboost")


def _run_mutants(session: nox.Session, tests: list[str], frameworks: str) -> None:
    env = {"MUTANTS_SCALE": os.environ.get("MUTANTS_SCALE", "10"),
           "MUTANTS_SEED": os.environ.get("MUTANTS_SEED", time.strftime("%Y%m%d")),
           "MLPERSIST_REQUIRE": frameworks, "TF_CPP_MIN_LOG_LEVEL": "3"}
    session.log(f"seed {env['MUTANTS_SEED']}, counts x{env['MUTANTS_SCALE']}")
    session.run("pytest", *tests, "-k", "copies_with_a_few_bytes_changed", *session.posargs, env=env)


@nox.session(python=PYTHON, default=False)
def faults(session: nox.Session) -> None:
    """Long fault injection (minutes): 200 SIGKILL trials over every installed framework, a one-minute race."""
    session.install(*CONSTRAINTS, "-e", *EVERYTHING, *TEST)
    session.run("pytest", "tests/core/test_faults.py", "-m", "slow", "-s", *session.posargs,
                env={"MLPERSIST_FAULT_TRIALS": "200", "MLPERSIST_RACE_SECONDS": "60"})


@nox.session(python=PYTHON, default=False)
def fuzz(session: nox.Session) -> None:
    """Fuzz scikit-learn's fitted state against the checked load (80 minutes here); rerun when scikit-learn moves.

    Every number and array of every estimator all_estimators() fits, compiled state (trees, KD-trees,
    libsvm) included, edited one at a time in a forked process: a crash or a hang is a finding. The sklearn
    session's tests make every 7th edit of the curated models (tests/adapters/sklearn_fuzz.py).
    """
    session.install(*CONSTRAINTS, "-e", ".[sklearn]")
    _run_fuzz(session)


@nox.session(name="fuzz-compat", python="3.10", default=False)
def fuzz_compat(session: nox.Session) -> None:
    """The fuzzer on the oldest releases (compat-3.10's): scikit-learn 1.3 and scipy 1.11 check less themselves."""
    session.install("-c", COMPAT["3.10"], "-e", ".[sklearn]")
    _run_fuzz(session)


def _run_fuzz(session: nox.Session) -> None:
    keep = f".nox/fuzz-findings-{session.python}"  # each finding's file, to load again by hand
    session.run("python", "tests/adapters/sklearn_fuzz.py", "--all", "--keep", keep, *session.posargs)


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against native calls (minutes; not part of plain `nox`): writes benchmarks/RESULTS.md."""
    session.install(*CONSTRAINTS, "-e", ".[sklearn,torch,keras]", "numpy", "tensorflow-cpu", "xgboost-cpu",
                    "mlflow-skinny", "pandas", "matplotlib")
    session.run("python", "benchmarks/bench.py", *session.posargs, env={"TF_CPP_MIN_LOG_LEVEL": "3"})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: style, imports, and the rule that the core imports no framework at module level."""
    session.install(*CONSTRAINTS, *PYPROJECT["dependency-groups"]["lint"])
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the installed package (core/ is importable only as `mlpersist`)."""
    session.install(*CONSTRAINTS, *EVERYTHING, "fsspec", *PYPROJECT["dependency-groups"]["typecheck"])
    session.run("mypy", "-p", "mlpersist", "--config-file", "pyproject.toml")
