"""Test helpers importable from every test and from the fresh processes tests start."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

ROOT = Path(__file__).resolve().parent.parent


def require(module: str) -> ModuleType:
    """Skip when `module` is missing, unless this nox session is the one testing it."""
    if module.partition(".")[0] in os.environ.get("MLPERSIST_REQUIRE", "").split(","):
        return importlib.import_module(module)  # missing here fails the run
    return pytest.importorskip(module)


def grown_tree(draw: Callable[[Any], Any], splits: int) -> tuple[list[int], list[int], list[int]]:
    """A random binary tree laid out as tree ensembles keep theirs: the root first, each split's two children
    appended after it. `draw`: a hypothesis `draw` (leaves to split are drawn). Returns the left and right
    children (-1 at a leaf) and each node's parent (-1 at the root)."""
    from hypothesis import strategies as st

    left, right, parent, leaves = [-1], [-1], [-1], [0]
    for _ in range(splits):
        node = leaves.pop(draw(st.integers(0, len(leaves) - 1)))
        left[node], right[node] = len(left), len(left) + 1
        for _ in range(2):
            leaves.append(len(left))
            left.append(-1)
            right.append(-1)
            parent.append(node)
    return left, right, parent


def run_python(code: str, *, cwd: Path | None = None, timeout: float = 120, check: bool = True,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (same venv) with tests/ importable."""
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT / 'tests' / 'adapters'}", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=full_env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m mlpersist ARGS` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "mlpersist", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")}, check=False)


class DummyModel:
    """A framework-free model: predicts `x * scale + shift`."""

    def __init__(self, scale: float = 2.0, shift: float = 1.0) -> None:
        self.scale, self.shift = scale, shift

    def predict(self, xs: list[float]) -> list[float]:
        return [x * self.scale + self.shift for x in xs]


class ExplodingModel(DummyModel):
    """Its adapter fails halfway through writing its payload."""


class DummyAdapter:
    """Stores a DummyModel as JSON: enough to test the core without any framework."""

    name: ClassVar[str] = "dummy"
    format_version: ClassVar[int] = 1
    dependencies: ClassVar[tuple[str, ...]] = ()

    def save(self, model: Any, dest: Path, *, format: str, **options: Any) -> Mapping[str, Any]:
        (dest / "params.json").write_text(json.dumps({"scale": model.scale, "shift": model.shift}))
        if isinstance(model, ExplodingModel):
            raise RuntimeError("the framework failed while writing")
        (dest / "sub").mkdir()
        (dest / "sub" / "extra.bin").write_bytes(bytes(range(256)) * 4)
        return {"kind": type(model).__name__}

    def load(self, payload: Any, info: Mapping[str, Any], *, format: str, **options: Any) -> Any:
        params = json.loads(payload.read_bytes("params.json"))
        assert payload.read_bytes("sub/extra.bin") == bytes(range(256)) * 4
        return DummyModel(**params)


def register_dummy() -> None:
    """Register DummyAdapter for classes of this module (tests restore the registry afterwards)."""
    from mlpersist import register_adapter

    register_adapter("dummy", "mlp_testkit:DummyAdapter", claims=("mlp_testkit",), package="pytest")


def write_refused(path: Path) -> bool:
    """Whether opening `path` for writing is refused for now: a read lease is held on it (and the attempt
    asks its holder to let go, which breaks the lease)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except BlockingIOError:
        return True
    return False


def write_when_let_in(path: Path, data: bytes) -> threading.Event:
    """Start a thread that opens `path` for writing (waiting while a read lease is held on it), writes
    `data` over its start, and sets the returned event once done."""
    written = threading.Event()

    def write() -> None:
        with open(path, "r+b") as w:
            w.write(data)
        written.set()

    threading.Thread(target=write, daemon=True).start()
    return written


def collections_started(fn: Callable[[], object]) -> int:
    """The garbage collections that start during `fn()`, with one due at every new container."""
    import gc

    started = [0]

    def count(phase: str, info: dict[str, int]) -> None:
        started[0] += phase == "start"

    threshold = gc.get_threshold()
    gc.callbacks.append(count)
    gc.set_threshold(1)
    try:
        fn()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(count)
    return started[0]


def mutated_loads(kind: str, count: int, seed: int = 0, timeout: float = 600) -> dict[str, Any]:
    """Load `count` copies of a `kind` model (tests/mutants.py) with a few payload bytes changed; the tally.

    Each copy is loaded in its own forked child of a fresh interpreter: a crash is counted, not fatal.
    """
    proc = run_python(f"import runpy, sys; sys.argv = ['mutants', {kind!r}, '{count}', '{seed}']; "
                      f"runpy.run_path({str(ROOT / 'tests' / 'mutants.py')!r}, run_name='__main__')", timeout=timeout)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result
