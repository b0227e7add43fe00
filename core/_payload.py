"""What an adapter's `load` receives: payload files already checked, and the caller's trust policy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ._policy import TrustPolicy
from .errors import CorruptArtifactError

if TYPE_CHECKING:
    import mmap


class Payload:
    """The payload files of one artifact, each opened once and checked against the manifest.

    Adapters read through this object only: it hands out the very handles that were hashed
    (so a file swapped after the check is never read), and its `unpickle` applies the trust
    policy the caller gave `load_any`.
    """

    def __init__(self, handles: Mapping[str, BinaryIO], policy: TrustPolicy, root: Path | None = None,
                 dirs: Mapping[str, Path] | None = None, labels: Mapping[str, str] | None = None) -> None:
        self._handles, self.policy, self.root, self._dirs = dict(handles), policy, root, dict(dirs or {})
        self._labels = dict(labels or {})

    def label(self, name: str) -> str:
        """How to name payload file `name` in a message: its name, or the caller's path for a bare file."""
        return self._labels.get(name, name)

    @property
    def names(self) -> list[str]:
        """The payload file names, sorted."""
        return sorted(self._handles)

    def open(self, name: str) -> BinaryIO:
        """Return the checked handle of `name`, rewound.

        Raises:
            mlpersist.errors.CorruptArtifactError: the manifest lists no such file.

        """
        try:
            f = self._handles[name]
        except KeyError:
            raise CorruptArtifactError(f"the artifact has no payload file {name!r} (it has: "
                                       f"{', '.join(self.names) or 'none'}); it was written by another "
                                       "adapter or format") from None
        f.seek(0)
        return f

    def read_bytes(self, name: str) -> bytes:
        """Return the whole content of `name`."""
        return self.open(name).read()

    def checked_bytes(self, name: str) -> bytearray | mmap.mmap | None:
        """The very bytes that were hashed, if the core kept them, else None.

        The core keeps every file under 16 MiB, and any file the adapter names in its `read_whole`
        class attribute (torch: its safetensors files, whose tensors then view these bytes): a
        `bytearray`, or for a large file on Linux an anonymous memory mapping holding its copy (both
        writable, and tied to no file). Read from them and a writer that rewrites the file after the
        check changes nothing that is loaded; `open` and `read_bytes` serve them too. A large file in
        the adapter's `read_by_path` gives None here: `open`, `read_bytes` and `local_path` serve it
        where it lies under a read lease, or its sealed copy. Other large files are read where they lie,
        under a read lease where the kernel grants one (no one can write to them until `load` returns).
        """
        from ._checked import Checked

        f = self.open(name)
        return f.data if isinstance(f, Checked) else None

    def local_path(self, name: str) -> Path:
        """A path that opens the very file that was checked (for frameworks that only take paths).

        On Linux, for a file whose bytes the core kept (under 16 MiB, or named in the adapter's
        `read_whole`), it is `/proc/self/fd/N` of a sealed in-memory file holding exactly those bytes:
        no later write to the artifact reaches the framework. For a large file named in `read_by_path`
        it is `/proc/self/fd/N` of the checked file under a read lease (a writer waits until the load is
        over, and if one asked meanwhile the core loads again from a sealed copy), or of a sealed copy
        where no lease can be had. For another large file it is `/proc/self/fd/N` of the checked
        file (under a read lease where one can be had), so a file swapped after the check is never
        read; elsewhere it is the file's path in the artifact.
        """
        from ._checked import Checked

        f = self.open(name)
        if isinstance(f, Checked) and (named := f.path()) is not None:
            return Path(named)
        proc = Path(f"/proc/self/fd/{f.fileno()}")
        if proc.exists():
            return proc
        return self.root / name if self.root is not None else Path(f.name)

    def directory(self, name: str) -> Path:
        """The path of a payload directory, for formats a framework reads only as a tree (a SavedModel).

        Its files were checked like any other, but the framework then reads them by path: use it only
        for content loaded with trusted=True.

        Raises:
            mlpersist.errors.CorruptArtifactError: there is no such directory.

        """
        path = self._dirs.get(name) or (self.root / name if self.root is not None else None)
        if path is None or not path.is_dir():
            raise CorruptArtifactError(f"the artifact has no payload directory {name!r}")
        return path

    def unpickle(self, name: str, *, joblib_format: bool = True) -> Any:
        """Unpickle `name` under the caller's trust policy (the one way pickles are read).

        Raises:
            mlpersist.errors.UntrustedContentError: it names globals outside the policy; none ran.
            mlpersist.errors.CorruptArtifactError: it is not a readable pickle.

        """
        from . import _safepickle  # imported with the first pickle, not with mlpersist

        return _safepickle.load(self.open(name), self.policy, what=self.label(name),
                                 joblib_format=joblib_format)
