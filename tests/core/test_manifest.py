"""The manifest reader: every malformed field is a CorruptArtifactError naming it, before any payload."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlpersist import CorruptArtifactError, Manifest
from mlpersist._manifest import FORMAT_VERSION, MAX_MANIFEST_BYTES

DIGEST = "sha256:" + "ab" * 32


def doc(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "adapter": "sklearn", "format": "joblib",
        "class": "sklearn.linear_model._logistic:LogisticRegression",
        "framework": {"name": "scikit-learn", "version": "1.9.1"},
        "files": {"model.joblib": {"size": 10, "digest": DIGEST}},
        "environment": {"python": "3.11.7"}, "created_at": "2026-11-24T00:00:00Z",
        "mlpersist_version": "0.1.0", "metadata": {"owner": "churn-team"}, "info": {},
    }
    base.update(changes)
    return base


def parse(d: Any) -> Manifest:
    return Manifest.from_json(json.dumps(d).encode())


def test_a_valid_manifest_round_trips_exactly() -> None:
    m = parse(doc())
    assert Manifest.from_json(m.to_json()) == m
    assert m.files["model.joblib"].size == 10 and m.metadata == {"owner": "churn-team"}
    assert m.digest.startswith("sha256:") and len(m.digest) == 71


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert parse(doc(future_field=[1, 2])).adapter == "sklearn"


@pytest.mark.parametrize("field", ["format_version", "adapter", "format", "class", "framework", "files",
                                   "environment", "created_at", "mlpersist_version"])
def test_a_missing_field_is_named(field: str) -> None:
    d = doc()
    del d[field]
    with pytest.raises(CorruptArtifactError, match=field):
        parse(d)


@pytest.mark.parametrize("version", [999, 2, 0, -1, "1", 1.0, None, True])
def test_unknown_or_mistyped_format_version_is_refused(version: Any) -> None:
    with pytest.raises(CorruptArtifactError, match="format_version"):
        parse(doc(format_version=version))


def test_a_future_format_version_says_to_upgrade() -> None:
    with pytest.raises(CorruptArtifactError, match="upgrade mlpersist"):
        parse(doc(format_version=FORMAT_VERSION + 1))


@pytest.mark.parametrize("adapter", ["os:system", "../evil", "", "a" * 65, "ev il", 3])
def test_adapter_must_be_a_plain_name(adapter: Any) -> None:
    with pytest.raises(CorruptArtifactError, match="adapter"):
        parse(doc(adapter=adapter))


BAD_NAMES = ["../../x", "/etc/passwd", "C:\\x", "C:x", "\\\\host\\share\\x", "a\\..\\..\\x", "", ".", "a/./b",
             "a//b", "dir/", "x\x00y", "\ud800", "manifest.json", "manifest.sig", "x::http://host/y",
             "file:///etc/passwd", "a/../b", "..", "tab\tname", "cafe\u0301"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_file_names_that_leave_the_artifact_or_are_not_canonical_are_refused(name: str) -> None:
    with pytest.raises(CorruptArtifactError, match="file name"):
        parse(doc(files={name: {"size": 1, "digest": DIGEST}}))


def test_names_equal_but_for_case_are_refused() -> None:
    files = {"Model.bin": {"size": 1, "digest": DIGEST}, "model.bin": {"size": 1, "digest": DIGEST}}
    with pytest.raises(CorruptArtifactError, match="case"):
        parse(doc(files=files))


def test_too_many_files_are_refused() -> None:
    files = {f"f{i}": {"size": 1, "digest": DIGEST} for i in range(10_001)}
    with pytest.raises(CorruptArtifactError, match="at most"):
        parse(doc(files=files))


@pytest.mark.parametrize("size", [10**18, -1, 1.5, True, "12", None])
def test_sizes_must_be_plain_bounded_integers(size: Any) -> None:
    with pytest.raises(CorruptArtifactError, match="size"):
        parse(doc(files={"m": {"size": size, "digest": DIGEST}}))


@pytest.mark.parametrize("digest", ["md5:" + "a" * 32, "crc32:deadbeef", "sha1:" + "a" * 40, "a" * 64,
                                    "sha256:" + "a" * 63, "sha256:" + "A" * 64, "sha256: " + "a" * 63,
                                    "sha256:" + "g" * 64, None, 5])
def test_digests_must_be_a_known_algorithm_with_exact_hex(digest: Any) -> None:
    with pytest.raises(CorruptArtifactError, match="digest"):
        parse(doc(files={"m": {"size": 1, "digest": digest}}))


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"\xef\xbb\xbf{}", b'{"format_version": 1', b"[1, 2]", b'"text"', b"null",
    b'{"a": 1, "a": 2}', b'{"a": NaN}', b'{"a": Infinity}', b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe{}",
])
def test_hostile_manifest_bytes_raise_only_corrupt_artifact(raw: bytes) -> None:
    with pytest.raises(CorruptArtifactError):
        Manifest.from_json(raw)


def test_an_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(CorruptArtifactError, match="bytes"):
        Manifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(doc())) | st.text(max_size=12), json_values, max_size=14))
def test_any_json_object_either_parses_or_raises_corrupt_artifact(d: dict[str, Any]) -> None:
    with contextlib.suppress(CorruptArtifactError):
        parse(d)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutating_one_field_of_a_valid_manifest_never_escapes_as_another_error(data: st.DataObject) -> None:
    d = copy.deepcopy(doc())
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(json_values)
    try:
        m = parse(d)
    except CorruptArtifactError:
        return
    assert Manifest.from_json(m.to_json()) == m


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_another_error(raw: bytes) -> None:
    with contextlib.suppress(CorruptArtifactError):
        Manifest.from_json(raw)


def test_a_parsed_manifest_is_a_read_only_value() -> None:
    """Manifest, FileEntry and AdapterInfo behave as the frozen dataclasses they replaced."""
    import pickle

    from mlpersist import AdapterInfo, FileEntry

    raw = json.dumps(doc()).encode()
    m = Manifest.from_json(raw)
    with pytest.raises(AttributeError, match="read-only"):
        m.adapter = "torch"
    with pytest.raises(AttributeError, match="read-only"):
        del m.files
    spaced = Manifest.from_json(json.dumps(doc(), indent=4).encode())
    assert spaced == m and spaced.raw != m.raw  # the exact bytes are not part of equality...
    assert "raw=" not in repr(m) and "adapter='sklearn'" in repr(m)  # ...nor of the repr
    assert m != spaced.replace(adapter="torch") and spaced.replace(adapter="torch").adapter == "torch"
    e = FileEntry(10, DIGEST)
    assert m.files == {"model.joblib": e} and hash(e) == hash(FileEntry(10, DIGEST)) and e != FileEntry(11, DIGEST)
    assert repr(e) == f"FileEntry(size=10, digest={DIGEST!r})"
    info = AdapterInfo("x", "x-framework", ("a",), True, "pkg:Cls")
    assert pickle.loads(pickle.dumps(info)) == info and pickle.loads(pickle.dumps(e)) == e
    assert {e, FileEntry(10, DIGEST)} == {e}
