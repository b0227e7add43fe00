"""Save any trained model with one call, load it back safely with another."""

from ._api import inspect, load_any, save_any, verify
from ._capture import capture_init
from ._manifest import FileEntry, Manifest
from ._payload import Payload
from ._registry import Adapter, AdapterInfo, list_adapters, register_adapter
from .errors import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    CheckFailedError,
    CorruptArtifactError,
    IntegrityError,
    MissingFrameworkError,
    PersistError,
    SignatureError,
    StorageError,
    UnsupportedModelError,
    UntrustedContentError,
    VersionMismatchError,
    VersionMismatchWarning,
)

__all__ = [
    "Adapter",
    "AdapterInfo",
    "ArtifactExistsError",
    "ArtifactNotFoundError",
    "CheckFailedError",
    "CorruptArtifactError",
    "FileEntry",
    "IntegrityError",
    "Manifest",
    "MissingFrameworkError",
    "Payload",
    "PersistError",
    "SignatureError",
    "StorageError",
    "UnsupportedModelError",
    "UntrustedContentError",
    "VersionMismatchError",
    "VersionMismatchWarning",
    "capture_init",
    "inspect",
    "list_adapters",
    "load_any",
    "register_adapter",
    "save_any",
    "verify",
]


def __getattr__(name: str) -> str:
    if name == "__version__":  # read only when asked: importlib.metadata costs milliseconds
        from importlib.metadata import version

        return version("mlpersist")
    raise AttributeError(f"module 'mlpersist' has no attribute {name!r}")
