"""`requant convert`: rewrite a format v0/v1 checkpoint as format v2 (the layout transformers loads itself)."""

from __future__ import annotations

import argparse

from .common import emit


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="upgrade a format v0/v1 checkpoint to format v2")
    p.add_argument("checkpoint", help="format v0/v1 checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory (format v2)")
    p.add_argument(
        "--dense-dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="dtype of the unquantized tensors (default auto: 16-bit; fp32 keeps v1's exact values)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing different checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from ..format import convert

    out = convert(args.checkpoint, args.output, force=args.force, dense=args.dense_dtype)
    emit(args, {"output": str(out), "format_version": 2}, f"wrote {out} (format v2)")
    return 0
