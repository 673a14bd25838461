"""`requant eval`: perplexity (and KL to a reference) of a model or checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import add_verify_flag, emit


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="perplexity (and KL) of a model or checkpoint")
    e.add_argument("model", nargs="?", default=None, help="checkpoint or model (default: SmolLM2 fp32)")
    e.add_argument("--data", default="wiki:test", help="comma-separated texts (default: wiki:test)")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows of each text")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    e.add_argument("--kl-to", default=None, help="reference model for KL ('source' = the checkpoint's model)")
    e.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    e.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    add_verify_flag(e)
    return e


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..data import text_windows
    from ..eval import evaluate
    from ..format import is_checkpoint
    from ..io import read_json
    from ..loading import check_seqlen

    names = [d.strip() for d in args.data.split(",") if d.strip()]
    if not names:
        raise ConfigError(f"--data {args.data!r} names no text")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    check_seqlen(args.model, args.seqlen)
    model, tok = load(args.model, device=args.device, verify=args.verify)
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
    emit(args, obj, "\n".join(rows))
    return 0
