"""Fresh interpreters: `import mlpersist` imports no framework; a load imports only its own."""

from __future__ import annotations

from pathlib import Path

from mlp_testkit import require, run_python

# fsspec too: remote stores are imported with the first URL, not with mlpersist
FRAMEWORKS = ("numpy", "sklearn", "joblib", "scipy", "torch", "tensorflow", "keras", "xgboost", "lightgbm", "fsspec")


def test_import_mlpersist_imports_no_framework() -> None:
    out = run_python(f"""
        import sys, mlpersist
        print([m for m in {FRAMEWORKS!r} if m in sys.modules])
    """)
    assert out.stdout.strip() == "[]"


# Standard-library modules that cost milliseconds each at import (dataclasses brings inspect, ast, dis,
# tokenize: ~20 ms; hashlib loads OpenSSL): imported on first use, never by `import mlpersist`.
SLOW_STDLIB = ("dataclasses", "inspect", "ast", "hashlib", "blake3", "shutil", "importlib.metadata", "mmap",
               "tempfile", "zipfile")


def test_import_mlpersist_leaves_slow_stdlib_modules_for_first_use() -> None:
    out = run_python(f"""
        import sys, mlpersist
        print([m for m in {SLOW_STDLIB!r} if m in sys.modules])
    """)
    assert out.stdout.strip() == "[]"


def test_the_cli_imports_no_framework() -> None:
    out = run_python(f"""
        import sys, mlpersist.cli
        mlpersist.cli.main(["adapters"])
        print([m for m in {FRAMEWORKS!r} if m in sys.modules])
    """)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_loading_an_sklearn_artifact_imports_no_other_framework(tmp_path: Path) -> None:
    require("sklearn")
    run_python(f"""
        from sklearn.linear_model import LogisticRegression
        import mlpersist
        mlpersist.save_any(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), {str(tmp_path / 'm')!r})
    """)
    out = run_python(f"""
        import sys, mlpersist
        mlpersist.load_any({str(tmp_path / 'm')!r})
        print([m for m in ("torch", "tensorflow", "keras", "xgboost", "lightgbm") if m in sys.modules])
    """)
    assert out.stdout.strip() == "[]"
