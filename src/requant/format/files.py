"""safetensors files as requant reads and writes them: headers, content hashes, verification.

Every safetensors file requant writes records, in its `__metadata__`, the sha256 of each tensor's bytes
(`requant_sha256`, a JSON object name → hex digest) and the sha256 of the layer table it was written with
(`requant_layers_sha256`). Loading hashes every tensor straight from the memory-mapped file and compares:
a flipped byte or an edited layer table is refused instead of decoded. Only headers and raw bytes are read
here; no pickle, no code.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

DIGESTS_KEY = "requant_sha256"
TABLE_KEY = "requant_layers_sha256"
MAX_HEADER_BYTES = 100_000_000

ST_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
}

Header = dict[str, tuple[torch.dtype, tuple[int, ...], int]]  # name → (dtype, shape, stored bytes)


def _raw_header(file: Path) -> tuple[dict[str, Any], int, int]:
    """(header JSON, header length, file size) of a safetensors file; corrupt or truncated files refused."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(file)!r} has a corrupt header: {e}") from None
    return header, n, size


def read_header(file: str | Path) -> Header:
    """Tensor names, dtypes, shapes and byte sizes of a safetensors file, checked against the file size."""
    file = Path(file)
    return _parse_header(file, *_raw_header(file))


def _parse_header(file: Path, header: dict[str, Any], n: int, size: int) -> Header:
    out: Header = {}
    end = 0
    try:
        for name, h in header.items():
            if name == "__metadata__":
                continue
            dtype = ST_DTYPES.get(h["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} has unsupported dtype {h['dtype']}")
            begin, stop = (int(v) for v in h["data_offsets"])
            out[name] = (dtype, tuple(int(s) for s in h["shape"]), stop - begin)
            end = max(end, stop)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {str(file)!r} has a corrupt header: {e}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is truncated: {size} bytes, its header needs {8 + n + end}"
        )
    return out


def file_metadata(file: str | Path) -> dict[str, str]:
    """The `__metadata__` map of a safetensors file (empty if it has none)."""
    meta = _raw_header(Path(file))[0].get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's bytes as safetensors stores them (row-major, little-endian)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()


def table_digest(layers: Mapping[str, Any]) -> str:
    """sha256 (hex) of a layer table in canonical JSON: ties config.json's table to the tensor files."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def integrity_metadata(tensors: Mapping[str, torch.Tensor], layers: Mapping[str, Any]) -> dict[str, str]:
    """The `__metadata__` entries that let a loader verify these tensors and the layer table."""
    digests = {name: tensor_digest(t) for name, t in tensors.items()}
    return {DIGESTS_KEY: json.dumps(digests, sort_keys=True), TABLE_KEY: table_digest(layers)}


def verify_files(files: Iterable[str | Path], layers: Mapping[str, Any]) -> None:
    """Hash every tensor of each file and compare with its recorded sha256; check the layer table's digest.

    Raises CheckpointError naming the first tensor (or the table) that does not match.
    """
    want_table = table_digest(layers)
    for file in files:
        file = Path(file)
        header, n, size = _raw_header(file)
        _parse_header(file, header, n, size)  # the offsets lie inside the file
        meta = header.get("__metadata__") or {}
        try:
            digests = json.loads(meta[DIGESTS_KEY])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{str(file)!r} records no content hashes (written by another tool, or re-saved by one that drops "
                "safetensors metadata); load it with verify=False (--no-verify) if you trust it"
            ) from None
        if meta.get(TABLE_KEY) != want_table:
            raise CheckpointError(
                f"{str(file)!r} was written with another layer table than config.json's quantization_config.layers "
                "(config.json was edited?); refusing to decode the tensors with it"
            )
        with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                base = 8 + n
                for name, h in header.items():
                    if name == "__metadata__":
                        continue
                    begin, stop = (int(v) for v in h["data_offsets"])
                    got = hashlib.sha256(view[base + begin : base + stop]).hexdigest()
                    if digests.get(name) != got:
                        what = "has no recorded hash" if name not in digests else "does not match its recorded sha256"
                        raise CheckpointError(
                            f"{str(file)!r}: tensor {name} {what} (the file was modified or corrupted); "
                            "re-create or re-download the checkpoint (--no-verify loads it anyway)"
                        )
            finally:
                view.release()
