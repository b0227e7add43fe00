"""Every error and warning mlpersist raises on purpose.

The tree::

    PersistError (Exception)
    ├── UnsupportedModelError (+ TypeError)      no adapter claims the model's class
    ├── ArtifactExistsError (+ FileExistsError)  save target exists and overwrite is off
    ├── ArtifactNotFoundError (+ FileNotFoundError)  no artifact (or no manifest) at the path
    ├── CorruptArtifactError (+ ValueError)      manifest or payload malformed
    ├── IntegrityError                           a file differs from its manifest entry
    │   └── SignatureError                       signature missing, bad, or by an unknown key
    ├── UntrustedContentError                    loading would run code the caller did not allow
    ├── MissingFrameworkError (+ ImportError)    the adapter's framework is not installed
    ├── CheckFailedError                         the loaded model's answers on the stored example differ
    ├── StorageError (+ OSError)                 a store refused or failed: remote (credentials, bucket, network)
    │                                            or the local disk (a save: full, read-only, a file in the way;
    │                                            a load: a file this user may not read, an I/O error)
    └── VersionMismatchError                     strict=True and the versions differ, or the
                                                 installed version would misread the artifact

    VersionMismatchWarning (UserWarning)         the versions differ (not strict)
"""

from __future__ import annotations

from collections.abc import Sequence


class PersistError(Exception):
    """Base of every error mlpersist raises on purpose."""


class UnsupportedModelError(PersistError, TypeError):
    """No registered adapter claims the model's class."""


class ArtifactExistsError(PersistError, FileExistsError):
    """The save target exists and `overwrite=True` was not given."""


class ArtifactNotFoundError(PersistError, FileNotFoundError):
    """Nothing loadable at the path: no directory, no manifest, or no known file."""


class CorruptArtifactError(PersistError, ValueError):
    """The manifest or a payload is malformed, truncated or inconsistent."""


class IntegrityError(PersistError):
    """A payload file differs from the size or digest in the manifest."""

    def __init__(self, path: str, expected: str, found: str) -> None:
        super().__init__(f"{path}: expected {expected}, found {found}; {self.hint}")
        self.path, self.expected, self.found = path, expected, found

    hint = "re-save or re-fetch the artifact"

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.path, self.expected, self.found)


class SignatureError(IntegrityError):
    """The manifest signature is missing, invalid, or made by a key the caller did not trust."""

    hint = ("have the author sign it (`mlpersist sign PATH --key KEY`) and load with their public key, "
            "or fetch it again from them")


class UntrustedContentError(PersistError):
    """Loading would import or call something the trust policy does not allow."""

    def __init__(self, message: str, names: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.names = tuple(names)

    def __reduce__(self) -> tuple[type, tuple[str, tuple[str, ...]]]:
        return type(self), (str(self), self.names)


class MissingFrameworkError(PersistError, ImportError):
    """The framework an adapter needs is not installed."""


class CheckFailedError(PersistError):
    """`check=True`: the loaded model's outputs on the stored example differ beyond the tolerance."""

    def __init__(self, message: str, report: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.report = tuple(report)

    def __reduce__(self) -> tuple[type, tuple[str, tuple[object, ...]]]:
        return type(self), (str(self), self.report)


class StorageError(PersistError, OSError):
    """A store refused or failed.

    A remote one (an fsspec URL: credentials, permissions, bucket, network), or the local disk: during a
    save (full, read-only, a file where a directory must be), or a read (a file this user may not read,
    an I/O error). Its `errno` is kept.
    """

    @classmethod
    def of(cls, exc: OSError, message: str) -> StorageError:
        """`message`, with the `errno`, `strerror` and `filename` of the OSError it reports."""
        err = cls(message)
        err.errno, err.strerror, err.filename = exc.errno, exc.strerror, exc.filename
        return err

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] strerror: filename"
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class VersionMismatchError(PersistError):
    """The artifact was written by another version of the framework.

    With `strict=True`, any other version raises it. Without, it is raised only when the installed
    version would misread the artifact (an XGBoost older than the one that wrote it, for example), or
    cannot read a file whose digests match while the manifest's package versions differ from these
    (numpy 1 reading numpy 2's pickles): the message names the versions to install.
    """


class VersionMismatchWarning(UserWarning):
    """The artifact was written by another version of the framework than the one installed."""


__all__ = [
    "ArtifactExistsError",
    "ArtifactNotFoundError",
    "CheckFailedError",
    "CorruptArtifactError",
    "IntegrityError",
    "MissingFrameworkError",
    "PersistError",
    "SignatureError",
    "StorageError",
    "UnsupportedModelError",
    "UntrustedContentError",
    "VersionMismatchError",
    "VersionMismatchWarning",
]
