"""`make demo`: quantize the embedded SmolLM2 with each recipe and print perplexity, bits and time.

fp32, then 3-bit RTN, SqueezeLLM dense-only, SqueezeLLM's Dense-and-Sparse and ReQuant at the same sparse
budget, side by side. Sized to finish in about ten minutes on 2 CPU cores: Fisher from 16 calibration windows
of wiki:train, PQI on 8 of them, perplexity on the first 40 windows × 512 tokens of wiki:test.
`requant eval` gives full-text figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from .config import QuantConfig
from .data import text_windows
from .eval import evaluate
from .loading import load_model
from .memory import GIB, peak_rss
from .model import quantizable_layers
from .pipeline import compute_fisher, quantize
from .progress import quiet_transformers
from .recipes import recipe_settings

RECIPES: list[tuple[str, QuantConfig]] = [
    ("RTN 3-bit g64", QuantConfig(base="rtn", bits=3, group_size=64)),
    ("SqueezeLLM 3-bit dense", QuantConfig(base="squeezellm", bits=3)),
    (
        "SqueezeLLM 3-bit D&S (0.45% IQR + 0.05% Fisher)",
        QuantConfig(base="squeezellm", bits=3, **recipe_settings("dns", "squeezellm")),
    ),
    (
        "ReQuant SqueezeLLM 3-bit (0.45% Alg. 1 + 0.05% PQI)",
        QuantConfig(base="squeezellm", bits=3, pqi_nsamples=8, **recipe_settings("requant", "squeezellm", 3)),
    ),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows for Fisher (default 16)")
    p.add_argument("--limit", type=int, default=40, help="wiki:test windows to evaluate (default 40)")
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args(argv)
    t_all = time.perf_counter()
    print(
        f"requant demo: SmolLM2-135M-Instruct (embedded), calibration {args.nsamples} × {args.seqlen} tokens "
        f"of wiki:train, perplexity on the first {args.limit} × {args.seqlen} tokens of wiki:test\n",
        flush=True,
    )
    with quiet_transformers():
        model, tok = load_model()
    windows = text_windows(tok, "wiki:test", args.seqlen, limit=args.limit)
    rows = []
    t = time.perf_counter()
    fp = evaluate(model, windows, data="wiki:test")
    rows.append(("fp32", fp.perplexity, 32.0, 0.0, time.perf_counter() - t))
    fisher = None
    for label, cfg in RECIPES:
        cfg = replace(cfg, nsamples=args.nsamples, seqlen=args.seqlen)
        with quiet_transformers():
            model, tok = load_model()
        # Each stage shows a bar on a terminal and one line on stderr otherwise (requant.progress).
        print(f"  {label}: quantizing ...", flush=True)
        t = time.perf_counter()
        if cfg.needs_fisher and fisher is None:
            fisher = compute_fisher(model, tok, cfg, [i.name for i in quantizable_layers(model)])
            print(f"  Fisher over {args.nsamples} windows: {time.perf_counter() - t:.0f} s", flush=True)
        res = quantize(model, tok, cfg, fisher=fisher if cfg.needs_fisher else None)
        q_time = time.perf_counter() - t
        r = evaluate(model, windows, data="wiki:test")
        rows.append((label, r.perplexity, res.bit_count().bits_per_weight, q_time, time.perf_counter() - t))
        print(f"  {label}: ppl {r.perplexity:.2f} ({q_time:.0f} s to quantize)", flush=True)
    print(f"\n| variant | wiki:test ppl ({fp.tokens} tokens) | bits/weight | quantize s | total s |")
    print("|---|---|---|---|---|")
    for label, ppl, bits, qs, ts in rows:
        print(f"| {label} | {ppl:.2f} | {bits:.3f} | {qs:.0f} | {ts:.0f} |")
    peak = peak_rss() / GIB
    print(f"\ndemo wall time {time.perf_counter() - t_all:.0f} s, peak memory {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
