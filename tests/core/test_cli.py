"""The command line, in fresh processes, on machines without the model's framework."""

from __future__ import annotations

import json
from pathlib import Path

from mlp_testkit import DummyModel, run_cli

from mlpersist import save_any


def test_inspect_prints_a_summary_and_json(tmp_path: Path, dummy: DummyModel) -> None:
    m = save_any(dummy, tmp_path / "a", metadata={"owner": "churn"})
    out = run_cli("inspect", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    assert "mlp_testkit:DummyModel" in out.stdout and m.digest in out.stdout and "churn" in out.stdout
    js = run_cli("inspect", "--json", str(tmp_path / "a"))
    doc = json.loads(js.stdout)
    assert doc["manifest_digest"] == m.digest and doc["files"]["params.json"]["size"] > 0


def test_verify_exits_0_when_intact_and_1_naming_the_file_when_not(tmp_path: Path, dummy: DummyModel) -> None:
    save_any(dummy, tmp_path / "a")
    ok = run_cli("verify", str(tmp_path / "a"))
    assert ok.returncode == 0 and "OK" in ok.stdout
    (tmp_path / "a" / "sub" / "extra.bin").write_bytes(b"changed")
    bad = run_cli("verify", str(tmp_path / "a"))
    assert bad.returncode == 1 and "sub/extra.bin" in bad.stderr


def test_errors_exit_2_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    out = run_cli("inspect", str(tmp_path / "missing"))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_adapters_lists_every_builtin_adapter() -> None:
    out = run_cli("adapters")
    assert out.returncode == 0 and "sklearn" in out.stdout and "scikit-learn" in out.stdout
