"""Where an artifact lives: a local path, or a store behind an fsspec URL."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PersistError

if TYPE_CHECKING:
    from ._remote import Store


def where(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> Path | Store:
    """A local artifact path, or the store of an fsspec URL."""
    text = as_text(path)
    if is_url(text):
        from . import _remote

        return _remote.open_store(text, storage_options)
    if storage_options:
        raise PersistError(f"{text}: storage_options= applies to URLs (s3://..., memory://...), not local paths")
    return local(text)


def local(path: str | os.PathLike[str], what: str = "") -> Path:
    """The absolute local path `path` names (`file://` accepted); URLs refused for `what`."""
    text = as_text(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif is_url(text):
        raise PersistError(f"{text}: {what or 'this call'} takes a local path; URLs are for save_any, load_any, "
                           "inspect and verify")
    if not text:
        raise PersistError("path is empty")
    return Path(os.path.abspath(text))


def is_url(text: str) -> bool:
    """A URL fsspec must open (`file://` is a local path: it keeps the local, rename-based commit)."""
    return ("://" in text or "::" in text) and not text.startswith("file://")


def as_text(path: str | os.PathLike[str]) -> str:
    """`path` as a str (bytes paths decoded as the file system does)."""
    text = os.fspath(path)
    return os.fsdecode(text) if isinstance(text, bytes) else text
