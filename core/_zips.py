"""Zip archives a framework reads after mlpersist: checks of their layout that no honest writer fails."""

from __future__ import annotations

import io
import zipfile
from typing import Any

from .errors import CorruptArtifactError


def no_overlap(infos: list[zipfile.ZipInfo], f: Any, what: str) -> None:
    """Refuse members whose bytes would overlap: their local headers and data add up to more than the archive.

    Members that share their data each pass a per-member check (a "quoted overlap" zip bomb, or stored
    records that all point at one), and the framework reads or extracts every one of them: n members then
    cost n times the shared bytes. Python's zipfile detects overlaps only in newer releases (3.13.0, not
    3.11.7 or 3.12.1), and native readers (torch's miniz) not at all. With no byte counted twice, the
    members together hold at most the archive's size (times the inflation of each, where compressed).
    """
    size = f.seek(0, io.SEEK_END)
    claimed = sum(30 + len(i.orig_filename.encode("utf-8" if i.flag_bits & 0x800 else "cp437", "replace"))
                  + i.compress_size for i in infos)
    if claimed > size:
        raise CorruptArtifactError(f"{what} members overlap: their local headers and data take {claimed} bytes "
                                   f"of an archive of {size} (a zip bomb of overlapping members)")
