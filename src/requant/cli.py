"""The `requant` command line. Every RequantError becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, RequantError
from .progress import quiet_transformers, set_quiet


def _percent(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number (percent of quantized weights)") from None


def _add_calib(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default="wiki:train", help="calibration text (default: wiki:train)")
    g.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: 32)")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    g.add_argument("--seed", type=int, default=0, help="seed of the window sampling (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="requant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    q.add_argument("--outliers", type=_percent, default=0.0, help="outlier percent of quantized weights")
    q.add_argument("--outlier-select", default="iqr", help="outlier selection: iqr")
    q.add_argument("--significant", type=_percent, default=0.0, help="sensitive-value percent of weights")
    q.add_argument("--significant-select", default="fisher", help="sensitive-value selection: fisher")
    q.add_argument("--include", action="append", default=[], help="regex of layer names to quantize (repeat)")
    q.add_argument("--exclude", action="append", default=[], help="regex of layer names to skip (repeat)")
    q.add_argument("--grad-dtype", default="fp32", help="model dtype for gradients: fp32 or bf16")
    q.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    q.add_argument("--force", action="store_true", help="replace an existing different checkpoint")
    q.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    _add_calib(q)

    e = sub.add_parser("eval", help="perplexity (and KL) of a model or checkpoint")
    e.add_argument("model", nargs="?", default=None, help="checkpoint or model (default: SmolLM2 fp32)")
    e.add_argument("--data", default="wiki:test", help="comma-separated texts (default: wiki:test)")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows of each text")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    e.add_argument("--kl-to", default=None, help="reference model for KL ('source' = the checkpoint's model)")
    e.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    e.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    return parser


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj, indent=2) if args.json else text)


def cmd_quantize(args: argparse.Namespace) -> int:
    from .config import QuantConfig
    from .format import save_checkpoint
    from .format.checkpoint import _check_replace
    from .model import load_model, resolve_model_path
    from .pipeline import quantize

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
    _emit(
        args,
        obj,
        f"wrote {out}: {len(result.layers)} layers, {bits.bits_per_weight:.3f} bits/weight, "
        f"{bits.sparse_percent:.3f}% sparse, {meta['wall_s']:.1f} s",
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import load
    from .data import text_windows
    from .eval import evaluate
    from .format import is_checkpoint
    from .io import read_json

    names = [d.strip() for d in args.data.split(",") if d.strip()]
    if not names:
        raise ConfigError(f"--data {args.data!r} names no text")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    model, tok = load(args.model, device=args.device)
    reference = None
    if args.kl_to is not None:
        ref_spec = args.kl_to
        if ref_spec == "source":
            if args.model is None or not is_checkpoint(args.model):
                raise ConfigError("--kl-to source needs a requant checkpoint as MODEL")
            ref_spec = read_json(Path(args.model) / "requant.json")["metadata"].get("model")
        reference, _ = load(ref_spec, device=args.device)
    results = []
    for name in names:
        windows = text_windows(tok, name, args.seqlen, limit=args.limit)
        results.append(evaluate(model, windows, data=name, reference=reference, batch_size=args.batch_size))
    rows = ["| data | perplexity | tokens | windows | KL (nats/token) |", "|---|---|---|---|---|"]
    for r in results:
        kl = "" if r.kl is None else f"{r.kl:.5f}"
        rows.append(f"| {r.data} | {r.perplexity:.4f} | {r.tokens} | {r.windows} | {kl} |")
    obj = {"model": str(args.model) if args.model else "default", "results": [r.to_dict() for r in results]}
    _emit(args, obj, "\n".join(rows))
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_quiet(bool(getattr(args, "json", False)))
    try:
        with quiet_transformers():
            return COMMANDS[args.command](args)
    except RequantError as e:
        print(f"requant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("requant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
