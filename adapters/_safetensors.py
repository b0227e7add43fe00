"""safetensors written from the tensors' own memory and read as views of checked bytes (the torch adapter's)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mlpersist._writeback import Writeback
from mlpersist.errors import CorruptArtifactError

_ST_DTYPES = {getattr(torch, name): code for name, code in {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}.items() if hasattr(torch, name)}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a standard safetensors file straight from each tensor's memory.

    safetensors' own `save_file` first copies every tensor into a new bytes object (1 GB more for a
    1 GB model, each page freshly faulted); this writes the same format (8-byte header length, JSON
    header, data largest element first so every tensor is aligned) from views of the tensors. Tensors
    it does not cover (another device, an exotic dtype, a big-endian machine) go through `save_file`.
    """
    if sys.byteorder != "little" or any(t.device.type != "cpu" or t.dtype not in _ST_DTYPES or t.is_sparse
                                        or not t.is_contiguous() for t in tensors.values()):
        save_file(dict(tensors), path)
        return
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "x+b") as f, Writeback(f) as flushing:  # hashed and sent to the disk as it is written
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in order:
            t = tensors[name]
            if t.numel():
                flushing.write(t.detach().reshape(-1).view(torch.uint8).numpy().data)  # a view of the tensor: no copy


def unique_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of each tied tensor (recording the aliases); make the rest contiguous and unshared."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, value in state.items():
        t = value.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        shared = not t.is_contiguous() or (t.numel() and ptr in storages)  # safetensors refuses shared storage
        out[name] = t.contiguous().clone() if shared else t
        storages.add(ptr)
    return out, aliases


_ST_TORCH = {code: dtype for dtype, code in _ST_DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def read_safetensors(buf: Any, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors of the safetensors file in `buf` (writable bytes), as views of it; None for an unknown dtype.

    The header is checked as strictly as safetensors' own reader does: a JSON object of at most
    100 MB without duplicate names, known dtypes, shapes of non-negative integers, and data offsets
    that tile the data section exactly (in order, no gap, no overlap, to its end), each the tensor's
    size. A tensor whose offset does not suit its dtype's alignment is copied instead of viewed. A dtype
    not in `_ST_DTYPES` (complex, newer float formats) returns None: the caller has safetensors read it.

    Raises:
        mlpersist.errors.CorruptArtifactError: naming what is malformed.

    """
    def bad(why: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{what} is not valid safetensors: {why}; the file is damaged or crafted")

    n = int.from_bytes(buf[:8], "little") if len(buf) >= 8 else -1
    if not 0 <= n <= min(len(buf) - 8, _MAX_HEADER):
        raise bad(f"a header of {n} bytes declared in a file of {len(buf)}")
    try:
        header = json.loads(bytes(buf[8:8 + n]), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the header is not JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise bad("the header is not a JSON object of tensors")
    entries = []
    for name, spec in header.items():
        code = spec.get("dtype") if isinstance(spec, dict) else None
        if isinstance(code, str) and code not in _ST_TORCH:
            return None
        dtype = _ST_TORCH.get(code) if isinstance(code, str) else None
        shape, offsets = (spec.get("shape"), spec.get("data_offsets")) if isinstance(spec, dict) else (None, None)
        if dtype is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) \
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise bad(f"tensor {name!r} has a malformed entry {str(spec)[:100]}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    base, end = 8 + n, 0
    data = torch.frombuffer(buf, dtype=torch.uint8)  # the whole file; every tensor views it
    out: dict[str, torch.Tensor] = {}
    for begin, stop, name, dtype, shape in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin != end or stop - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} has data offsets {begin}..{stop}, where {end}.."
                      f"{end + math.prod(shape) * dtype.itemsize} was due")
        end = stop
        raw = data[base + begin:base + stop]
        try:
            out[name] = raw.view(dtype).reshape(shape)
        except RuntimeError:  # an offset the dtype cannot view at: copy this one
            out[name] = raw.clone().view(dtype).reshape(shape)
    if base + end != len(buf):
        raise bad(f"{len(buf) - base - end} bytes after the last tensor")
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate names")
    return out
