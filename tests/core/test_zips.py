"""The forward-only zip writer: zipfile's very bytes, zip64 included, and a CRC taken beside the write."""

from __future__ import annotations

import io
import os
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlpersist import _storage, _writeback, _zips


class Forward(io.RawIOBase):
    """A file zipfile cannot seek or ask its position: it writes data descriptors, as ZipOut does."""

    def __init__(self) -> None:
        super().__init__()
        self.data = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self.data.write(b)


def zipfile_bytes(members: list[tuple[str, bytes]], when: tuple[int, ...]) -> bytes:
    out = Forward()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=when)
            info.external_attr = 0o600 << 16  # what writestr gives a member named by a string
            zf.writestr(info, data)
    return out.data.getvalue()


def zipout_bytes(members: list[tuple[str, bytes]], when: tuple[int, ...]) -> bytes:
    out = Forward()
    archive = _zips.ZipOut(out)
    archive._stamp = _zips._dos_stamp(when)
    for name, data in members:
        archive.writestr(name, data)
    archive.close()
    return out.data.getvalue()


names = st.text(st.characters(blacklist_characters="\x00/", blacklist_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(members=st.lists(st.tuples(names, st.binary(max_size=3000)), max_size=6, unique_by=lambda m: m[0]),
       limits=st.sampled_from([None, (200, None), (5000, None), (200, 2), (None, 1)]))
@example(members=[("just over the limit / 1.05", bytes(195))], limits=(200, None))  # zip64 in the local header only
def test_zipout_writes_the_bytes_zipfile_writes_to_a_file_it_cannot_seek(
        members: list[tuple[str, bytes]], limits: tuple[int | None, int | None] | None) -> None:
    """Zipfile, given the same members and times, is the reference; small limits reach the zip64 fields of
    large members, far offsets and many members (member headers, the central directory, the end records)."""
    when = (2026, 11, 28, 19, 41, 7)
    with pytest.MonkeyPatch.context() as mp:
        if limits is not None:
            size, count = limits
            for module, name, value in ((zipfile, "ZIP64_LIMIT", size), (_zips, "LIMIT", size),
                                        (zipfile, "ZIP_FILECOUNT_LIMIT", count), (_zips, "COUNT_LIMIT", count)):
                if value is not None:
                    mp.setattr(module, name, value)
        ours = zipout_bytes(members, when)
        if sys.version_info >= (3, 11) or all(len(data) * 1.05 <= zipfile.ZIP64_LIMIT for _, data in members):
            assert ours == zipfile_bytes(members, when)  # 3.10 marks a large member's local header otherwise

    with zipfile.ZipFile(io.BytesIO(ours)) as zf:  # and it reads back under the real limits
        assert zf.testzip() is None
        assert [(i.filename, zf.read(i)) for i in zf.infolist()] == members


def test_zipout_takes_each_members_crc_from_the_copy_function_and_asks_for_a_file_it_has(tmp_path: Path) -> None:
    copied: list[int] = []

    def copy(data: Any) -> int:
        copied.append(len(data))
        out.write(data)
        return zlib.crc32(data)

    out = Forward()
    archive = _zips.ZipOut(out, copy)
    (tmp_path / "vocab.txt").write_bytes(b"a\nb\n")
    archive.writestr("config.json", '{"é": 1}')
    archive.write(str(tmp_path / "vocab.txt"), "assets/vocab.txt")
    archive.close()
    assert copied == [len('{"é": 1}'.encode()), 4]
    with zipfile.ZipFile(io.BytesIO(out.data.getvalue())) as zf:
        assert zf.read("config.json") == '{"é": 1}'.encode() and zf.read("assets/vocab.txt") == b"a\nb\n"
        assert zf.getinfo("config.json").date_time[:3] == time.localtime()[:3]
    assert _zips.ZipOut(out)  # Keras tests `if archive:`


@settings(max_examples=300, deadline=None)
@given(a=st.binary(max_size=5000), b=st.binary(max_size=5000))
def test_crc32_combine_gives_the_crc_of_the_two_parts_joined(a: bytes, b: bytes) -> None:
    assert _writeback.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("size", [0, 1, _writeback.PIECE - 1, _writeback.PIECE, _writeback.PIECE + 1,
                                  2 * _writeback.PIECE, 5 * _writeback.PIECE + 12345])
def test_write_crc_writes_the_bytes_returns_their_crc_and_the_file_is_hashed_as_written(
        size: int, tmp_path: Path) -> None:
    """Half the CRC is taken on the writeback thread, half on the writer, and joined; the hash of the whole
    file (a header before the data, a descriptor after it) is still that of its bytes."""
    data = os.urandom(size)
    with _storage.following() as followed, open(tmp_path / "f", "x+b") as f, _writeback.Writeback(f) as following:
        f.write(b"header")
        crcs = [following.write_crc(data), following.write_crc(data[::-1])]  # each a CRC of its own
        f.write(b"descriptor")
    assert crcs == [zlib.crc32(data), zlib.crc32(data[::-1])]
    whole = (tmp_path / "f").read_bytes()
    assert whole == b"header" + data + data[::-1] + b"descriptor"
    if len(whole) - len(b"descriptor") >= _writeback.PIECE:  # else under a piece: the core hashes the file
        assert [v[-1] for v in followed.values()] == ["blake3:" + blake3(whole).hexdigest()]
    else:
        assert followed == {}
