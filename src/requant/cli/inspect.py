"""`requant inspect`: bits per weight, stored bytes and sparse counts of a checkpoint, total and per layer."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common import emit

_CODES = {"weight", "qweight", "codes"}
_SPARSE = {"sparse_rowptr", "sparse_col", "sparse_value", "sparse_index"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="bits per weight, memory and sparse counts of a checkpoint")
    p.add_argument("checkpoint", help="requant checkpoint directory")
    p.add_argument("--summary", action="store_true", help="totals only, no per-layer table")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the files' sha256 check")
    return p


def describe(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Everything `inspect` reports, from the layer table checked against the safetensors headers (every
    shape and dtype agrees with the stated kind, bits and nnz) and, with `verify`, the files' sha256s."""
    from ..accounting import SPARSE_ENTRY_BITS, total
    from ..format.checkpoint import stored_headers, tensor_files
    from ..format.files import verify_files

    path = Path(path)
    meta, layouts, header, dense_header = stored_headers(path)
    if verify and meta["format_version"] >= 2:
        verify_files(tensor_files(path), meta["layers"])
    layers = []
    for name, layout in layouts.items():
        parts = {"code_bytes": 0, "table_bytes": 0, "sparse_bytes": 0}
        for key, (_, _, nbytes) in header.items():
            if not key.startswith(name + "."):
                continue
            suffix = key[len(name) + 1 :]
            if "." in suffix or suffix == "bias":
                continue
            part = "code_bytes" if suffix in _CODES else "sparse_bytes" if suffix in _SPARSE else "table_bytes"
            parts[part] += nbytes
        stored = sum(parts.values())
        count = layout.bit_count()
        layers.append(
            {
                "name": name,
                "shape": [layout.out_features, layout.in_features],
                "kind": layout.kind,
                "bits": layout.bits,
                "group_size": layout.params.get("group_size"),
                "nnz": layout.nnz,
                "sparse_percent": count.sparse_percent,
                **parts,
                "stored_bytes": stored,
                "bits_per_weight": count.bits_per_weight,
                "stored_bits_per_weight": 8 * stored / layout.numel,
            }
        )
    bits = total(lo.bit_count() for lo in layouts.values())
    quantized_bytes = sum(nbytes for _, _, nbytes in header.values())
    accounting_bytes = bits.total_bits / 8
    other = sum(nbytes for _, _, nbytes in dense_header.values())
    config = meta.get("config", {})
    return {
        "checkpoint": str(path),
        "format_version": meta["format_version"],
        "base": config.get("base"),
        "bits": config.get("bits"),
        "source_model": meta.get("metadata", {}).get("model"),
        "layers_quantized": len(layers),
        "numel": bits.numel,
        "bits_per_weight": bits.bits_per_weight,
        "stored_bits_per_weight": 8 * quantized_bytes / bits.numel if bits.numel else 0.0,
        "quantized_bytes": quantized_bytes,
        "accounting_bytes": accounting_bytes,
        "overhead_percent": 100.0 * (quantized_bytes - accounting_bytes) / accounting_bytes,
        "code_bytes": sum(lay["code_bytes"] for lay in layers),
        "table_bytes": sum(lay["table_bytes"] for lay in layers),
        "sparse_bytes": sum(lay["sparse_bytes"] for lay in layers),
        "sparse_entries": bits.sparse_entries,
        "sparse_percent": bits.sparse_percent,
        "sparse_entry_bits_accounted": SPARSE_ENTRY_BITS,
        "other_bytes": other,
        "dense_dtype": ", ".join(sorted({str(dt).removeprefix("torch.") for dt, _, _ in dense_header.values()})),
        "file_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "block_coverage": block_share(meta.get("layers", {}), layouts, dense_header),
        "experts": _experts_line(meta.get("report", {}).get("experts")),
        "layers": layers,
    }


def block_share(
    table: Mapping[str, Any], layouts: Mapping[str, Any], dense_header: Mapping[str, Any]
) -> dict[str, Any]:
    """Share of the decoder blocks' weight matrices (≥ 2-D tensors) that are quantized, from the layer table and
    the headers of the other stored tensors: {"share", "summary"} as the quantize report's coverage has them."""
    prefixes = set()
    quant: dict[int, int] = {}
    qnumel = 0
    for name, lo in layouts.items():
        b = table.get(name, {}).get("block")
        if b is None:
            continue
        m = re.match(rf"^(.*?)\.{b}\.", name)
        if m:
            prefixes.add(m.group(1))
        quant[b] = quant.get(b, 0) + 1
        qnumel += lo.out_features * lo.in_features
    total: dict[int, int] = dict(quant)
    numel = qnumel
    for key, (_, shape, _) in dense_header.items():
        m = next((re.match(rf"^{re.escape(p)}\.(\d+)\.", key) for p in prefixes), None)
        if m is None or len(shape) < 2:
            continue
        b = int(m.group(1))
        total[b] = total.get(b, 0) + (shape[0] if len(shape) == 3 else 1)
        n = 1
        for d in shape:
            n *= d
        numel += n
    if not numel:
        return {"share": None, "summary": "no quantized layers inside decoder blocks"}
    per = {(quant.get(b, 0), t) for b, t in total.items()}
    if len(per) == 1:
        q, t = per.pop()
        where = f"{q} of {t} matrices in each block"
    else:
        where = f"{sum(quant.values())} of {sum(total.values())} matrices over {len(total)} blocks"
    share = qnumel / numel
    return {"share": share, "summary": f"quantized {100 * share:.1f}% of block weights ({where})"}


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _experts_line(experts: Mapping[str, Any] | None) -> str | None:
    """The quantize report's MoE line: tokens per expert and the fallbacks (None for a dense model)."""
    if not experts:
        return None
    return expert_summary(experts)


def expert_summary(experts: Mapping[str, Any]) -> str:
    """One line: how many expert units, their calibration-token range, and how many fell back."""
    tokens = experts.get("tokens")
    fell = experts.get("fallback") or []
    if tokens is None:
        return "experts: calibration tokens not measured (the method reads no calibration data)"
    counts = list(tokens.values())
    return (
        f"experts: {len(counts)} expert matrices saw {min(counts)}–{max(counts)} calibration tokens; "
        f"{len(fell)} below {experts.get('min_tokens')} fell back (pooled inputs / uniform Fisher)"
        + (f": {', '.join(fell[:3])}{' …' if len(fell) > 3 else ''}" if fell else "")
    )


def run(args: argparse.Namespace) -> int:
    d = describe(args.checkpoint, verify=args.verify)
    lines = [
        f"checkpoint {d['checkpoint']} (format v{d['format_version']}): {d['base']} {d['bits']}-bit, "
        f"{d['layers_quantized']} quantized layers, {d['numel']:,} weights",
        f"bits per weight: {d['bits_per_weight']:.4f} (accounting), {d['stored_bits_per_weight']:.4f} (as stored)",
        f"quantized layers: {_mib(d['quantized_bytes'])} stored = codes {_mib(d['code_bytes'])} + "
        f"LUT/scales {_mib(d['table_bytes'])} + sparse {_mib(d['sparse_bytes'])}; accounting "
        f"{_mib(d['accounting_bytes'])} ({d['overhead_percent']:+.2f}%)",
        f"sparse entries: {d['sparse_entries']:,} ({d['sparse_percent']:.3f}% of quantized weights)",
        f"other parameters ({d['dense_dtype']}): {_mib(d['other_bytes'])}; files: {_mib(d['file_bytes'])}",
        d["block_coverage"]["summary"],
    ]
    if d["experts"]:
        lines.append(d["experts"])
    if not args.summary:
        lines += [
            "",
            "| layer | shape | bits | nnz | codes B | LUT/scales B | sparse B | bits/weight | stored b/w |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for lay in d["layers"]:
            lines.append(
                f"| {lay['name']} | {lay['shape'][0]}×{lay['shape'][1]} | {lay['bits']} | {lay['nnz']} | "
                f"{lay['code_bytes']} | {lay['table_bytes']} | {lay['sparse_bytes']} | "
                f"{lay['bits_per_weight']:.4f} | {lay['stored_bits_per_weight']:.4f} |"
            )
    emit(args, d, "\n".join(lines))
    return 0
