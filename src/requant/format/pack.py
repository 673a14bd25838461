"""Bit packing of dense codes and the CSR form of sparse residuals, as pure functions over tensors.

Packed codes: each output row is a little-endian bit stream with code i at bits [i·b, i·b + b), padded
with zero codes to a multiple of 8 codes, so every 8 codes fill exactly b bytes (3-bit: 8 codes in 3
bytes, no wasted bits) and every row starts on a byte boundary.
"""

from __future__ import annotations

import torch

from ..sparse import SparseResidual

PACK_BITS = (2, 3, 4, 8)
CODES_PER_CHUNK = 8


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row of `in_features` codes at `bits` each (padded to whole 8-code chunks)."""
    return -(-in_features // CODES_PER_CHUNK) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (out, in), each < 2^bits → packed uint8 (out, packed_row_bytes(in, bits))."""
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; packable widths are {PACK_BITS}")
    out, inp = codes.shape
    chunks = -(-inp // CODES_PER_CHUNK)
    dev = codes.device
    padded = torch.zeros(out, chunks * CODES_PER_CHUNK, dtype=torch.int64, device=dev)
    padded[:, :inp] = codes
    shifts = torch.arange(CODES_PER_CHUNK, dtype=torch.int64, device=dev) * bits
    words = (padded.view(out, chunks, CODES_PER_CHUNK) << shifts).sum(-1)  # ≤ 64 bits per chunk
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=dev) * 8
    return ((words[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).view(out, chunks * bits)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_codes: packed uint8 (out, row_bytes), or its (out, chunks, bits) view → uint8 codes (out, in)."""
    if bits not in PACK_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes; packable widths are {PACK_BITS}")
    out = packed.shape[0]
    chunks = packed.numel() // (out * bits) if out else 0
    dev = packed.device
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=dev) * 8
    words = (packed.view(out, chunks, bits).to(torch.int64) << byte_shifts).sum(-1)
    shifts = torch.arange(CODES_PER_CHUNK, dtype=torch.int64, device=dev) * bits
    codes = (words[..., None] >> shifts) & (2**bits - 1)
    return codes.view(out, chunks * CODES_PER_CHUNK)[:, :in_features].to(torch.uint8).contiguous()


def to_csr(sparse: SparseResidual) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row pointers int32 (out+1), column indices int32 (nnz), fp16 values (nnz)) of a residual."""
    out, inp = sparse.shape
    index = sparse.index.long()
    order = torch.argsort(index, stable=True)
    index, value = index[order], sparse.value[order]
    rows = torch.div(index, inp, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=out)
    rowptr = torch.zeros(out + 1, dtype=torch.int64, device=index.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    return rowptr.to(torch.int32), (index - rows * inp).to(torch.int32), value.to(torch.float16).contiguous()


def from_csr(rowptr: torch.Tensor, col: torch.Tensor, value: torch.Tensor, shape: tuple[int, int]) -> SparseResidual:
    """Inverse of to_csr: the residual with sorted flat int64 indices."""
    out, inp = shape
    counts = (rowptr[1:].long() - rowptr[:-1].long()).clamp(min=0)
    rows = torch.repeat_interleave(torch.arange(out, dtype=torch.int64, device=col.device), counts)
    return SparseResidual(rows * inp + col.long(), value, (out, inp))
