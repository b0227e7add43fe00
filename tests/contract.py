"""What every adapter owes: subclass AdapterContract in tests/adapters/test_<fw>.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
from mlp_testkit import mutated_loads, run_python

from mlpersist import IntegrityError, _registry, inspect, load_any, save_any, verify


class AdapterContract:
    """Round trip, fresh-process load, manifest facts, integrity: for one representative model."""

    adapter: str
    framework_module: str  # imported by loading; nothing heavier may be
    setup_code = ""  # run first in fresh processes (an adapter registered in code, not by entry point)
    load_options: ClassVar[dict[str, Any]] = {}  # what every load passes (trusted=True where the format needs it)
    mutants: ClassVar[tuple[tuple[str, int], ...]] = ()  # (tests/mutants.py kind, copies) to load with bytes changed

    def make_model(self) -> Any:
        raise NotImplementedError

    def make_input(self) -> Any:
        raise NotImplementedError

    def outputs(self, model: Any, x: Any) -> Any:
        """Return the model's outputs on `x` as a numpy array."""
        raise NotImplementedError

    @pytest.fixture
    def saved(self, tmp_path: Path) -> tuple[Any, Path]:
        model = self.make_model()
        save_any(model, tmp_path / "artifact")
        return model, tmp_path / "artifact"

    def test_round_trip_gives_bit_identical_outputs(self, saved: tuple[Any, Path]) -> None:
        import numpy as np

        model, path = saved
        x = self.make_input()
        np.testing.assert_array_equal(self.outputs(load_any(path, **self.load_options), x), self.outputs(model, x))

    def test_the_manifest_names_adapter_class_and_framework(self, saved: tuple[Any, Path]) -> None:
        model, path = saved
        m = inspect(path)
        assert m.adapter == self.adapter
        assert m.model_class == f"{type(model).__module__}:{type(model).__qualname__}"
        assert m.framework_version not in ("", "unknown")
        spec = _registry.get_spec(m.adapter)
        assert spec is not None  # recorded under the distribution installed (xgboost-cpu provides xgboost)
        assert any(m.environment["packages"].get(d) == m.framework_version for d in (spec.package, *spec.alt_packages))
        verify(path)

    def test_a_fresh_process_loads_the_same_outputs(self, saved: tuple[Any, Path], tmp_path: Path) -> None:
        import numpy as np

        model, path = saved
        x = self.make_input()
        np.save(tmp_path / "x.npy", x)
        run_python(f"""
            import numpy as np, sys, mlpersist
            {self.setup_code}
            import test_{self.adapter} as t
            model = mlpersist.load_any({str(path)!r}, **{self.load_options!r})
            out = t.{type(self).__name__}().outputs(model, np.load({str(tmp_path / 'x.npy')!r}))
            np.save({str(tmp_path / 'out.npy')!r}, out)
        """)
        np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), self.outputs(model, x))

    def test_a_tampered_payload_is_refused_before_the_framework_reads_it(self, saved: tuple[Any, Path]) -> None:
        _, path = saved
        manifest = json.loads((path / "manifest.json").read_text())
        name = max(manifest["files"], key=lambda n: manifest["files"][n]["size"])
        data = bytearray((path / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (path / name).write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=name):  # trusted or not: digests are always checked
            load_any(path, **self.load_options)

    def test_inspect_and_verify_import_no_framework(self, saved: tuple[Any, Path]) -> None:
        _, path = saved
        proc = run_python(f"""
            import sys, mlpersist
            mlpersist.inspect({str(path)!r}); mlpersist.verify({str(path)!r})
            heavy = [m for m in ("numpy", "sklearn", "torch", "tensorflow", "keras", "xgboost") if m in sys.modules]
            print(heavy)
        """)
        assert proc.stdout.strip() == "[]"

    def test_loading_imports_only_its_own_framework(self, saved: tuple[Any, Path]) -> None:
        _, path = saved
        others = sorted({"sklearn", "torch", "tensorflow", "keras", "xgboost", "lightgbm"} - {self.framework_module})
        proc = run_python(f"""
            import importlib, sys
            importlib.import_module({self.framework_module!r})  # what the framework pulls in itself is its own
            before = {{m for m in {others!r} if m in sys.modules}}
            import mlpersist
            {self.setup_code}
            mlpersist.load_any({str(path)!r}, **{self.load_options!r})
            print(sorted({{m for m in {others!r} if m in sys.modules}} - before))
        """)
        assert proc.stdout.strip() == "[]"

    def test_copies_with_a_few_bytes_changed_load_or_fail_typed(self) -> None:
        """Copies of a saved model with one to four payload bytes changed (the manifest rewritten to match), each
        loaded and used in its own process: none may crash it, and what fails to load fails with a PersistError.
        This is how the crashes behind several of the adapters' checks were found."""
        if not self.mutants:
            pytest.skip(f"{self.adapter}: loaded only on trust, whose bytes are the author's")
        # `nox -s mutants` (not in the default run) scales the counts and picks a new seed: other copies each run
        scale, seed = int(os.environ.get("MUTANTS_SCALE", "1")), int(os.environ.get("MUTANTS_SEED", "1"))
        for kind, count in self.mutants:
            result = mutated_loads(kind, count * scale, seed=seed, timeout=600 * scale)
            assert result["findings"] == [], result
            assert result["tally"].get("refused", 0) > 0 and result["tally"].get("loaded", 0) > 0, result
