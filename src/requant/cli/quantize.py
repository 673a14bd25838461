"""`requant quantize`: quantize a model and write a checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import add_calib, emit, percent


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint")
    q.add_argument(
        "model", nargs="?", default=None, help="model dir, .gguf or cached hub id (default: SmolLM2)"
    )
    q.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    q.add_argument("--base", default="squeezellm", help="base method: rtn, squeezellm (default: squeezellm)")
    q.add_argument("--bits", type=int, default=3, help="bits per dense weight: 2, 3, 4 or 8 (default: 3)")
    q.add_argument(
        "--group-size", type=int, default=None, help="inputs per scale group (rtn; default per row)"
    )
    q.add_argument("--sym", action="store_true", help="symmetric uniform grid (rtn)")
    q.add_argument("--outliers", type=percent, default=0.0, help="outlier percent of quantized weights")
    q.add_argument("--outlier-select", default="iqr", help="outlier selection: iqr")
    q.add_argument("--significant", type=percent, default=0.0, help="sensitive-value percent of weights")
    q.add_argument("--significant-select", default="fisher", help="sensitive-value selection: fisher")
    q.add_argument("--include", action="append", default=[], help="regex of layer names to quantize (repeat)")
    q.add_argument("--exclude", action="append", default=[], help="regex of layer names to skip (repeat)")
    q.add_argument("--grad-dtype", default="fp32", help="model dtype for gradients: fp32 or bf16")
    q.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    q.add_argument("--force", action="store_true", help="replace an existing different checkpoint")
    q.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    add_calib(q)

    return q


def run(args: argparse.Namespace) -> int:
    from ..config import QuantConfig
    from ..format import save_checkpoint
    from ..format.checkpoint import _check_replace
    from ..model import load_model, resolve_model_path
    from ..pipeline import quantize

    config = QuantConfig(
        base=args.base,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        outliers=args.outliers,
        outlier_select=args.outlier_select,
        significant=args.significant,
        significant_select=args.significant_select,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        grad_dtype=args.grad_dtype,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
    )
    out = Path(args.output)
    if out.exists():
        _check_replace(out, config, args.force)  # refuse before hours of work, not after
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    result = quantize(model, tok, config)
    meta = {"model": resolve_model_path(args.model), "argv": sys.argv[1:], "wall_s": time.perf_counter() - t0}
    save_checkpoint(out, model, tok, result, metadata=meta, force=args.force)
    bits = result.bit_count()
    obj = {
        "output": str(out),
        "bits_per_weight": bits.bits_per_weight,
        "sparse_percent": bits.sparse_percent,
        "layers": len(result.layers),
        "wall_s": meta["wall_s"],
        "report": result.report,
    }
    emit(
        args,
        obj,
        f"wrote {out}: {len(result.layers)} layers, {bits.bits_per_weight:.3f} bits/weight, "
        f"{bits.sparse_percent:.3f}% sparse, {meta['wall_s']:.1f} s",
    )
    return 0
