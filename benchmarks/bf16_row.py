"""The bf16 row of the ablation table: the unquantized model evaluated in bf16 on the same windows.

Usage: python benchmarks/bf16_row.py [--bits 3]   (adds a "bf16" row to results/ablation-<bits>bit.json)
"""

from __future__ import annotations

import argparse
import json

from harness import RESULTS

from requant.data import text_windows
from requant.eval import evaluate
from requant.loading import load_model
from requant.memory import GIB, peak_rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--limit", type=int, default=40)
    args = p.parse_args()
    path = RESULTS / f"ablation-{args.bits}bit.json"
    model, tok = load_model(dtype="bf16")
    row = {"variant": "bf16", "bits_per_weight": 16.0}
    for t in ("wiki:train", "wiki:test"):
        r = evaluate(model, text_windows(tok, t, 512, limit=args.limit), data=t)
        row[t] = {"perplexity": r.perplexity, "tokens": r.tokens, "windows": r.windows}
        print(t, r.perplexity, flush=True)
    row["peak_rss_gib"] = peak_rss() / GIB
    results = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({"bf16": row, **results}, indent=2))


if __name__ == "__main__":
    main()
