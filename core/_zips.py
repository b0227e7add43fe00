"""Zip archives: a forward-only writer of stored members, and layout checks of archives a framework reads."""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

from .errors import CorruptArtifactError

# zipfile's rules, kept so that ZipOut writes zipfile's very bytes (a test compares them; Python 3.10's zipfile
# writes a large member's local header with version 20 and zero sizes beside its zip64 field): a member of more
# than LIMIT / 1.05 bytes gets zip64 fields in its local header, any size or offset over LIMIT in the
# central directory, and more than COUNT_LIMIT members or a central directory past LIMIT the zip64 end records
LIMIT = (1 << 31) - 1
COUNT_LIMIT = (1 << 16) - 1
_VERSION, _ZIP64_VERSION, _UNIX, _DESCRIBED, _UTF8, _MODE = 20, 45, 3, 0x08, 0x800, 0o600 << 16


class ZipOut:
    """A zip archive of stored members, written forward only: what zipfile writes to a file it cannot seek.

    Each member is a local header with zero CRC and sizes, its bytes, then a data descriptor with its CRC-32
    and sizes; the central directory comes at `close`. Unlike zipfile, which makes a pass over a member's
    bytes for its CRC before it writes them, the bytes are handed to `copy`, which writes them and returns
    their CRC: a writer can compute it beside the write (`Writeback.write_crc`). The Keras adapter writes its
    JSON files through `writestr`, and Keras's stores take it as their archive: `writestr` for the
    weights, `write` for the assets.
    """

    def __init__(self, f: BinaryIO, copy: Callable[[Any], int] | None = None) -> None:
        self._f, self._copy = f, copy or self._write_crc
        self._at = 0  # bytes written so far: the file need not tell()
        self._members: list[tuple[bytes, int, int, int, int, bool]] = []  # name, flags, offset, crc, size, zip64
        self._stamp = _dos_stamp(time.localtime()[:6])

    def writestr(self, name: str, data: bytes | bytearray | memoryview | str) -> None:
        """Add a member `name` holding `data` (a str is written as UTF-8), as zipfile's `writestr` does."""
        if isinstance(data, str):
            data = data.encode()
        size = memoryview(data).nbytes
        encoded, flags = _encode(name)
        zip64 = size * 1.05 > LIMIT  # zipfile's margin: its writer does not know a member's size in advance
        offset = self._at
        extra = struct.pack("<HHQQ", 1, 16, 0, 0) if zip64 else b""
        wide = 0xFFFFFFFF if zip64 else 0
        self._put(struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", _ZIP64_VERSION if zip64 else _VERSION, 0, flags, 0,
                              *self._stamp, 0, wide, wide, len(encoded), len(extra)) + encoded + extra)
        crc = self._copy(data)
        self._at += size
        self._put(struct.pack("<4sLQQ" if zip64 else "<4sLLL", b"PK\x07\x08", crc, size, size))
        self._members.append((encoded, flags, offset, crc, size, zip64))

    def write(self, path: str, arcname: str) -> None:
        """Add the file at `path` as member `arcname` (Keras's assets)."""
        with open(path, "rb") as f:
            self.writestr(arcname, f.read())

    def close(self) -> None:
        """Write the central directory and the end records, as zipfile's `close` does."""
        start = self._at
        for encoded, flags, offset, crc, size, zip64 in self._members:
            wide = [size, size] if size > LIMIT else []
            if offset > LIMIT:
                wide.append(offset)
            extra = struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
            version = _ZIP64_VERSION if wide or zip64 else _VERSION
            stored = 0xFFFFFFFF if size > LIMIT else size
            self._put(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", version, _UNIX, version, 0, flags, 0,
                                  *self._stamp, crc, stored, stored, len(encoded), len(extra), 0, 0, 0, _MODE,
                                  0xFFFFFFFF if offset > LIMIT else offset) + encoded + extra)
        count, length, end = len(self._members), self._at - start, self._at
        if count > COUNT_LIMIT or start > LIMIT or length > LIMIT:
            self._put(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, _ZIP64_VERSION, _ZIP64_VERSION, 0, 0,
                                  count, count, length, start))
            self._put(struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1))
            count, length, start = min(count, 0xFFFF), min(length, 0xFFFFFFFF), min(start, 0xFFFFFFFF)
        self._put(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, length, start, 0))

    def __bool__(self) -> bool:
        return True  # Keras tests `if self.archive:`

    def _put(self, header: bytes) -> None:
        self._f.write(header)
        self._at += len(header)

    def _write_crc(self, data: Any) -> int:
        self._f.write(data)
        return zlib.crc32(data)


def _dos_stamp(when: tuple[int, ...]) -> tuple[int, int]:
    """(time, date) in MS-DOS form, as zip headers hold them."""
    year, month, day, hour, minute, second = when
    return hour << 11 | minute << 5 | second // 2, (year - 1980) << 9 | month << 5 | day


def _encode(name: str) -> tuple[bytes, int]:
    """A member name's bytes and flags: ASCII as is, anything else UTF-8 with the flag that says so."""
    try:
        return name.encode("ascii"), _DESCRIBED
    except UnicodeEncodeError:
        return name.encode("utf-8"), _DESCRIBED | _UTF8


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
