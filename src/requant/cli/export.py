"""`requant export`: a plain transformers checkpoint of a requant checkpoint's dequantized weights Ŵ."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import emit


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a plain transformers checkpoint of a checkpoint's dequantized weights")
    p.add_argument("checkpoint", help="requant checkpoint directory")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="store Ŵ (dense + sparse, as QuantLinear computes it) in nn.Linear weights: any tool loads the "
        "result with AutoModelForCausalLM.from_pretrained (required: the only export today)",
    )
    p.add_argument("--dtype", default="fp16", help="weight dtype: fp16, bf16 or fp32 (default: fp16)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from ..export import EXPORT_DTYPES, export_dequantized

    if not args.dequantize:
        raise ConfigError("requant export needs --dequantize (a plain checkpoint of Ŵ is the only export today)")
    if args.dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r} is not supported; use one of {', '.join(EXPORT_DTYPES)}")
    out, layers = export_dequantized(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    obj = {"checkpoint": str(args.checkpoint), "out": str(out), "dtype": args.dtype, "layers": layers, "bytes": size}
    emit(args, obj, f"wrote {out}: {layers} dequantized layers in {args.dtype}, {size / 1e6:.1f} MB")
    return 0
