"""Artifacts in S3 (`nox -s remote`): moto's real HTTP server, reached through s3fs as a user's code reaches AWS."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlp_testkit import ROOT, require, run_python
from moto_s3 import S3

from mlpersist import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    IntegrityError,
    StorageError,
    UntrustedContentError,
    _cache,
    _remote,
    _upload,
    inspect,
    load_any,
    save_any,
    verify,
)

np = require("numpy")
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

X, Y = make_classification(n_samples=200, n_features=6, random_state=0)
X32 = X.astype("float32")


def sklearn_model() -> tuple[Any, Callable[[Any], Any]]:
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)
    return model, lambda m: m.predict_proba(X)


def torch_model() -> tuple[Any, Callable[[Any], Any]]:
    torch = require("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()

    def predict(m: Any) -> Any:
        with torch.no_grad():
            return m(torch.from_numpy(X32)).numpy()

    return net, predict


def xgboost_model() -> tuple[Any, Callable[[Any], Any]]:
    xgboost = require("xgboost")
    model = xgboost.XGBClassifier(n_estimators=5, max_depth=3).fit(X, Y)
    return model, lambda m: m.predict_proba(X)


def keras_model() -> tuple[Any, Callable[[Any], Any]]:
    keras = require("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(X32, Y, epochs=1, verbose=0)
    return model, lambda m: np.asarray(m.predict(X32, verbose=0))


MODELS = {"sklearn": sklearn_model, "torch": torch_model, "xgboost": xgboost_model, "keras": keras_model}


@pytest.mark.parametrize("framework", sorted(MODELS))
def test_a_model_of_each_framework_round_trips_through_s3_bit_for_bit(s3: S3, bucket: str, framework: str) -> None:
    model, predict = MODELS[framework]()
    url = f"s3://{bucket}/team/{framework}/v1"
    manifest = save_any(model, url, storage_options=s3.options)
    assert inspect(url, storage_options=s3.options) == manifest
    verify(url, storage_options=s3.options)
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"team/{framework}/v1/manifest.json"} | {
        f"team/{framework}/v1/blobs/{e.digest.replace(':', '/')}" for e in manifest.files.values()}
    _cache.Cache().evict(limit=0)  # the save left its files in the cache: load from the bucket, not from them
    loaded = load_any(url, storage_options=s3.options)
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(predict(loaded), predict(model))


def test_a_mixed_bundle_with_an_example_round_trips_and_checks(s3: S3, bucket: str) -> None:
    (pipe, _), (xgb, _) = sklearn_model(), xgboost_model()
    url = f"s3://{bucket}/bundle"
    save_any({"pre": pipe, "model": xgb, "labels": ["no", "yes"]}, url, storage_options=s3.options,
             example={"pre": X[:5], "model": X[:5]})
    _cache.Cache().evict(limit=0)
    loaded = load_any(url, storage_options=s3.options, check=0.0)
    assert loaded["labels"] == ["no", "yes"]
    np.testing.assert_array_equal(loaded["model"].predict_proba(X), xgb.predict_proba(X))


def test_the_second_load_transfers_no_payload(s3: S3, bucket: str) -> None:
    model, predict = sklearn_model()
    url = f"s3://{bucket}/churn"
    save_any(model, url, storage_options=s3.options)
    _cache.Cache().evict(limit=0)
    load_any(url, storage_options=s3.options)  # cold: downloads into the cache
    client = s3.client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="churn/blobs/")["Contents"]:
        client.delete_object(Bucket=bucket, Key=obj["Key"])  # the bucket now holds the manifest only
    np.testing.assert_array_equal(predict(load_any(url, storage_options=s3.options)), predict(model))
    with pytest.raises(IntegrityError, match="no such object"):
        verify(url, storage_options=s3.options)  # verify reads the store itself, never the cache


def test_a_damaged_cache_file_is_fetched_again(s3: S3, bucket: str) -> None:
    model, predict = sklearn_model()
    url = f"s3://{bucket}/churn"
    manifest = save_any(model, url, storage_options=s3.options)
    (entry,) = manifest.files.values()
    blob = _cache.Cache().path(entry.digest)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    np.testing.assert_array_equal(predict(load_any(url, storage_options=s3.options)), predict(model))
    f = _cache.Cache().open(entry.digest, entry.size, verify=True)
    assert f is not None  # fetched again, whole
    f.close()


def test_a_cache_file_rewritten_right_after_its_download_does_not_change_what_loads(
        s3: S3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes checked as they streamed are the bytes loaded: a local writer that zeroes the cached
    file in place the moment it lands (same size, same inode) changes the file, not the model."""
    model, predict = sklearn_model()
    url = f"s3://{bucket}/churn"
    save_any(model, url, storage_options=s3.options)
    _cache.Cache().evict(limit=0)
    real, rewritten = _cache.Cache.adopt, []

    def adopt_then_rewrite(self: _cache.Cache, file: Path, digest: str) -> Any:
        f = real(self, file, digest)
        path = self.path(digest)
        os.chmod(path, 0o644)
        with open(path, "r+b") as w:
            w.write(bytes(path.stat().st_size))
        rewritten.append(path)
        return f

    monkeypatch.setattr(_cache.Cache, "adopt", adopt_then_rewrite)
    np.testing.assert_array_equal(predict(load_any(url, storage_options=s3.options)), predict(model))
    (blob,) = rewritten
    assert set(blob.read_bytes()) == {0}  # the rewrite did happen, before the adapter read anything
    monkeypatch.undo()
    np.testing.assert_array_equal(predict(load_any(url, storage_options=s3.options)), predict(model))  # refetched


def test_a_tampered_blob_in_the_bucket_is_refused(s3: S3, bucket: str) -> None:
    model, _ = sklearn_model()
    url = f"s3://{bucket}/churn"
    manifest = save_any(model, url, storage_options=s3.options)
    _cache.Cache().evict(limit=0)
    (entry,) = manifest.files.values()
    key = f"churn/blobs/{entry.digest.replace(':', '/')}"
    client = s3.client()
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[10] ^= 1
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(IntegrityError, match=r"model\.joblib"):
        load_any(url, storage_options=s3.options)
    with pytest.raises(IntegrityError, match=r"model\.joblib"):
        verify(url, storage_options=s3.options)


def test_saving_over_an_artifact_needs_overwrite_and_readers_then_get_the_new_one(s3: S3, bucket: str) -> None:
    (first, predict), second = sklearn_model(), make_pipeline(LogisticRegression(C=0.01)).fit(X, Y)
    url = f"s3://{bucket}/churn"
    save_any(first, url, storage_options=s3.options)
    with pytest.raises(ArtifactExistsError, match="overwrite=True"):
        save_any(second, url, storage_options=s3.options)
    save_any(second, url, storage_options=s3.options, overwrite=True)
    np.testing.assert_array_equal(predict(load_any(url, storage_options=s3.options)), predict(second))


def test_a_prefix_holding_other_objects_is_never_written_into(s3: S3, bucket: str) -> None:
    s3.client().put_object(Bucket=bucket, Key="data/train.csv", Body=b"a,b\n")
    with pytest.raises(ArtifactExistsError, match="no mlpersist manifest"):
        save_any(sklearn_model()[0], f"s3://{bucket}/data", storage_options=s3.options, overwrite=True)
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["data/train.csv"]


def test_old_blobs_are_collected_once_unreferenced_and_older_than_the_grace(s3: S3, bucket: str) -> None:
    url = f"s3://{bucket}/churn"
    first = save_any(sklearn_model()[0], url, storage_options=s3.options)
    second = save_any(make_pipeline(LogisticRegression(C=0.01)).fit(X, Y), url, storage_options=s3.options,
                      overwrite=True)

    def blobs() -> set[str]:
        found = s3.client().list_objects_v2(Bucket=bucket, Prefix="churn/blobs/").get("Contents", [])
        return {":".join(o["Key"].rsplit("/", 2)[1:]) for o in found}  # churn/blobs/<algo>/<hex>

    old, new = {e.digest for e in first.files.values()}, {e.digest for e in second.files.values()}
    assert blobs() == old | new  # the previous artifact's files stay for readers that hold its manifest
    store = _remote.open_store(url, s3.options)
    assert _upload.collect_garbage(store, keep=()) == 0  # all younger than an hour
    assert _upload.collect_garbage(store, keep=(), grace=0) == len(old - new)
    assert blobs() == new
    verify(url, storage_options=s3.options)


def test_wrong_credentials_give_a_storage_error_and_write_nothing(s3: S3, bucket: str) -> None:
    bad = {**s3.options, "secret": "not-the-secret"}
    url = f"s3://{bucket}/churn"
    with pytest.raises(StorageError, match=r"access denied.*credentials"):
        save_any(sklearn_model()[0], url, storage_options=bad)
    assert "Contents" not in s3.client().list_objects_v2(Bucket=bucket)
    save_any(sklearn_model()[0], url, storage_options=s3.options)
    for call in (load_any, inspect, verify):
        with pytest.raises(StorageError, match="access denied"):
            call(url, storage_options={**s3.options, "key": "AKIAUNKNOWN"})


def test_a_missing_bucket_is_a_typed_error_naming_it(s3: S3) -> None:
    url = "s3://no-such-bucket-here/churn"
    with pytest.raises(StorageError, match="bucket"):
        save_any(sklearn_model()[0], url, storage_options=s3.options)
    for call in (load_any, inspect):
        with pytest.raises(ArtifactNotFoundError, match="no artifact at s3://no-such-bucket-here/churn"):
            call(url, storage_options=s3.options)


def test_a_prefix_without_a_manifest_is_not_found(s3: S3, bucket: str) -> None:
    with pytest.raises(ArtifactNotFoundError, match=r"no manifest\.json"):
        load_any(f"s3://{bucket}/nothing", storage_options=s3.options)


def test_a_model_file_saved_without_mlpersist_loads_from_its_url_under_the_trust_rules(s3: S3, bucket: str) -> None:
    import io
    import pickle

    import joblib

    model, predict = sklearn_model()
    buf = io.BytesIO()
    joblib.dump(model, buf)
    client = s3.client()
    client.put_object(Bucket=bucket, Key="shared/model.joblib", Body=buf.getvalue())
    url = f"s3://{bucket}/shared/model.joblib"
    np.testing.assert_array_equal(predict(load_any(url, storage_options=s3.options)), predict(model))
    described = inspect(url, storage_options=s3.options)
    assert (described.adapter, described.metadata) == ("sklearn", {"source": url})

    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned",))

    client.put_object(Bucket=bucket, Key="shared/evil.pkl", Body=pickle.dumps(Boom(), protocol=4))
    with pytest.raises(UntrustedContentError, match=r"(os|posix)\.system"):
        load_any(f"s3://{bucket}/shared/evil.pkl", storage_options=s3.options)
    assert not list((_cache.Cache().tmp).iterdir())  # the downloaded copy is gone either way


# --- processes ----------------------------------------------------------------------------------

SAVER = """
    import sys, numpy as np
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from mlpersist import save_any
    X, Y = make_classification(n_samples=200, n_features=6, random_state=0)
    def model(c):
        return LogisticRegression(C=c).fit(X, Y)
"""


def test_an_upload_killed_midway_leaves_the_previous_artifact_loadable(s3: S3, bucket: str) -> None:
    url = f"s3://{bucket}/churn"
    old = LogisticRegression(C=1.0).fit(X, Y)
    before = save_any(old, url, storage_options=s3.options)
    # the child replaces it with a 3-part bundle and is killed after the first part's upload, mid-save
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SAVER) + textwrap.dedent(f"""
        from mlpersist import _upload
        real = _upload._put_blob
        def put_then_stall(*args, **kwargs):
            real(*args, **kwargs)
            print("uploaded", flush=True)
            import time; time.sleep(600)
        _upload._put_blob = put_then_stall
        save_any({{"a": model(0.1), "b": model(0.2), "c": model(0.3)}}, {url!r}, overwrite=True)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, **s3.env})
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "uploaded"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    blobs = s3.client().list_objects_v2(Bucket=bucket, Prefix="churn/blobs/")["Contents"]
    assert len(blobs) == 2  # the old model's and the new bundle's first part: the killed save got that far
    assert inspect(url, storage_options=s3.options) == before
    _cache.Cache().evict(limit=0)
    np.testing.assert_array_equal(load_any(url, storage_options=s3.options).predict_proba(X), old.predict_proba(X))


def test_racing_writers_leave_one_whole_artifact_and_readers_never_see_a_mix(s3: S3, bucket: str) -> None:
    url = f"s3://{bucket}/churn"
    save_any(LogisticRegression(C=1.0).fit(X, Y), url, storage_options=s3.options)
    writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(SAVER) + textwrap.dedent(f"""
        for i in range(6):
            save_any(model({c}), {url!r}, overwrite=True)
    """)], env={**os.environ, **s3.env}, stderr=subprocess.PIPE, text=True) for c in (0.01, 100.0)]
    expected = {c: LogisticRegression(C=c).fit(X, Y).predict_proba(X) for c in (0.01, 1.0, 100.0)}
    seen = set()
    while any(w.poll() is None for w in writers):
        _cache.Cache().evict(limit=0)
        got = load_any(url, storage_options=s3.options).predict_proba(X)
        seen.add(next(c for c, p in expected.items() if np.array_equal(p, got)))  # StopIteration = a mix
    for w in writers:
        err = w.communicate(timeout=120)[1]
        assert w.returncode == 0, err
    assert seen  # the reader ran while they wrote
    final = load_any(url, storage_options=s3.options).predict_proba(X)
    assert any(np.array_equal(final, expected[c]) for c in (0.01, 100.0))
    verify(url, storage_options=s3.options)


def test_of_two_writers_without_overwrite_exactly_one_wins(s3: S3, bucket: str) -> None:
    url = f"s3://{bucket}/new"
    code = textwrap.dedent(SAVER) + textwrap.dedent(f"""
        from mlpersist import ArtifactExistsError
        try:
            save_any(model(float(sys.argv[1])), {url!r})
            print("saved")
        except ArtifactExistsError:
            print("exists")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), c], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **s3.env}) for c in ("0.1", "10")]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["exists", "saved"]
    load_any(url, storage_options=s3.options)


def test_processes_sharing_a_cold_cache_all_load(s3: S3, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/churn"
    model = LogisticRegression(C=1.0).fit(X, Y)
    save_any(model, url, storage_options=s3.options)
    np.save(tmp_path / "expected.npy", model.predict_proba(X))
    shared = tmp_path / "shared-cache"
    code = textwrap.dedent(SAVER) + textwrap.dedent(f"""
        from mlpersist import load_any
        got = load_any({url!r}).predict_proba(X)
        assert np.array_equal(got, np.load({str(tmp_path / "expected.npy")!r}))
    """)
    env = {**os.environ, **s3.env, "MLPERSIST_CACHE_DIR": str(shared),
           "PYTHONPATH": str(ROOT / "tests")}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for p in procs:
        err = p.communicate(timeout=120)[1]
        assert p.returncode == 0, err
    assert len(list((shared / "blobs").rglob("*"))) == 2  # blake3/ and the one blob, whoever wrote it
    assert not list((shared / "tmp").iterdir())


def test_the_cache_stays_under_its_size_limit(s3: S3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = f"s3://{bucket}/a", f"s3://{bucket}/b"
    ma = save_any(LogisticRegression(C=1.0).fit(X, Y), a, storage_options=s3.options)
    mb = save_any(LogisticRegression(C=2.0).fit(X, Y), b, storage_options=s3.options)
    (ea,), (eb,) = ma.files.values(), mb.files.values()
    monkeypatch.setenv("MLPERSIST_CACHE_MAX_BYTES", str(max(ea.size, eb.size) + 10))
    cache = _cache.Cache()
    cache.evict(limit=0)
    load_any(a, storage_options=s3.options)
    assert cache.path(ea.digest).exists()
    load_any(b, storage_options=s3.options)
    assert cache.size() <= max(ea.size, eb.size) + 10
    assert not cache.path(ea.digest).exists()  # least recently used: evicted
    assert cache.path(eb.digest).exists()


def test_loading_an_sklearn_model_from_s3_imports_no_other_framework(s3: S3, bucket: str) -> None:
    url = f"s3://{bucket}/churn"
    save_any(LogisticRegression().fit(X, Y), url, storage_options=s3.options)
    out = run_python(f"""
        import sys, mlpersist
        mlpersist.load_any({url!r})
        print([m for m in ("torch", "tensorflow", "keras", "xgboost") if m in sys.modules])
    """, env=s3.env)
    assert out.stdout.strip() == "[]"


# --- command line and progress ------------------------------------------------------------------

def test_the_cli_inspects_verifies_and_checks_a_url_with_credentials_from_the_environment(
        s3: S3, bucket: str) -> None:
    model, _ = sklearn_model()
    url = f"s3://{bucket}/churn"
    save_any(model, url, storage_options=s3.options, example=X[:4])
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret,
           "AWS_DEFAULT_REGION": "us-east-1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mlpersist", *args, "-o", f"endpoint_url={s3.endpoint}"],
                              capture_output=True, text=True, env=env, timeout=120, check=False)

    out = cli("inspect", url)
    assert out.returncode == 0, out.stderr
    assert "sklearn.pipeline:Pipeline" in out.stdout
    assert cli("verify", url).returncode == 0
    checked = cli("check", url, "--tolerance", "0")
    assert checked.returncode == 0, checked.stderr
    assert "2 of 2 output(s) within tolerance 0" in checked.stdout
    refused = cli("inspect", url, "-o", "key=AKIAWRONG", "-o", "secret=wrong")
    assert refused.returncode == 2
    assert "access denied" in refused.stderr


def _on_a_terminal(code: str, env: dict[str, str]) -> str:
    """Run `code` with stderr on a pseudo-terminal; return what it printed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(30) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_progress_bars_show_on_a_terminal_for_large_transfers_only(s3: S3, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/big"
    code = f"""
        import numpy as np
        from sklearn.preprocessing import StandardScaler
        from mlpersist import load_any, save_any
        big = StandardScaler().fit(np.random.default_rng(0).normal(size=(10, 10)))
        big.scale_ = np.arange(3_000_000, dtype=np.float64)  # 24 MB: above the 16 MiB threshold
        save_any(big, {url!r}, overwrite=True, progress=PROGRESS)
        load_any({url!r}, progress=PROGRESS)
        save_any(StandardScaler().fit(np.ones((3, 2))), {url + "-small"!r}, overwrite=True, progress=PROGRESS)
    """
    env = {**os.environ, **s3.env, "MLPERSIST_CACHE_DIR": str(tmp_path / "empty-cache")}
    shown = _on_a_terminal(code.replace("PROGRESS", "None"), env)
    assert f"upload {url}" in shown and "100%" in shown
    assert f"download {url}" not in shown  # the save left its files in the cache: nothing to download
    assert f"{url}-small" not in shown
    assert _on_a_terminal(code.replace("PROGRESS", "False"), env).strip() == ""
    piped = run_python(code.replace("PROGRESS", "None"), env={**s3.env})
    assert piped.stderr.strip() == ""


def test_the_cache_command_shows_and_clears_the_cache(s3: S3, bucket: str, tmp_path: Path) -> None:
    model, predict = sklearn_model()
    url = f"s3://{bucket}/churn"
    save_any(model, url, storage_options=s3.options)  # the save leaves its files in the cache
    env = {**os.environ, "MLPERSIST_CACHE_DIR": str(tmp_path / "cache")}

    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "mlpersist", "cache", *args], capture_output=True, text=True,
                              env=env, timeout=60, check=True).stdout

    assert "holds         1 file(s)" in cli()
    assert "holds         0 file(s), 0 bytes" in cli("--clear")
    assert not [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
    np.testing.assert_array_equal(predict(load_any(url, storage_options=s3.options)), predict(model))
