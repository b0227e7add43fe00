"""The public surface: flat, explicit, and pinned."""

from __future__ import annotations

import pickle

import mlpersist
from mlpersist import errors


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in dir(mlpersist) if not n.startswith("_")} - {"adapters", "cli", "errors"}
    assert set(mlpersist.__all__) == public
    assert mlpersist.__all__ == sorted(mlpersist.__all__, key=lambda n: (n[0].islower(), n))


def test_every_error_is_a_persist_error_and_the_fitting_builtin() -> None:
    assert issubclass(errors.UnsupportedModelError, TypeError)
    assert issubclass(errors.ArtifactExistsError, FileExistsError)
    assert issubclass(errors.ArtifactNotFoundError, FileNotFoundError)
    assert issubclass(errors.CorruptArtifactError, ValueError)
    assert issubclass(errors.MissingFrameworkError, ImportError)
    assert issubclass(errors.SignatureError, errors.IntegrityError)
    assert issubclass(errors.StorageError, OSError)
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.PersistError) or cls is errors.VersionMismatchWarning
    assert not issubclass(errors.VersionMismatchWarning, errors.PersistError)


def test_errors_with_fields_survive_pickling_across_processes() -> None:
    e = pickle.loads(pickle.dumps(errors.IntegrityError("m.bin", "sha256:aa", "sha256:bb")))
    assert (e.path, e.expected, e.found) == ("m.bin", "sha256:aa", "sha256:bb")
    u = pickle.loads(pickle.dumps(errors.UntrustedContentError("refused", ["os.system"])))
    assert u.names == ("os.system",) and str(u) == "refused"


def test_version_is_read_lazily_from_metadata() -> None:
    assert mlpersist.__version__ == "0.1.0"
