"""Issue-2 baselines on the reference setting R: perplexity and bits of fp32, RTN and SqueezeLLM variants.

Full wiki:test and c4 texts at seqlen 512 (GPTQ protocol), calibration 32 windows of wiki:train.
Each finished variant is stored in the JSON at once, so an interrupted run resumes where it stopped.
Usage: python benchmarks/baselines.py [--limit N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from requant.config import QuantConfig
from requant.data import text_windows
from requant.eval import evaluate
from requant.model import load_model, quantizable_layers
from requant.pipeline import compute_fisher, quantize
from requant.progress import quiet_transformers

OUT = Path(__file__).parent / "results"
VARIANTS: dict[str, QuantConfig | None] = {
    "fp32": None,
    "rtn-4bit-row": QuantConfig(base="rtn", bits=4),
    "rtn-3bit-row": QuantConfig(base="rtn", bits=3),
    "rtn-2bit-row": QuantConfig(base="rtn", bits=2),
    "rtn-3bit-g64": QuantConfig(base="rtn", bits=3, group_size=64),
    "squeezellm-4bit-dense": QuantConfig(base="squeezellm", bits=4),
    "squeezellm-3bit-dense": QuantConfig(base="squeezellm", bits=3),
    "squeezellm-2bit-dense": QuantConfig(base="squeezellm", bits=2),
    "squeezellm-3bit-D&S": QuantConfig(base="squeezellm", bits=3, outliers=0.45, significant=0.05),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows per text")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--texts", default="wiki:test,c4")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--tag", default="baselines")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.tag}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    with quiet_transformers():
        model, tok = load_model()
    texts = args.texts.split(",")
    windows = {t: text_windows(tok, t, 512, limit=args.limit) for t in texts}
    fisher = None
    for name, cfg in VARIANTS.items():
        if (args.only and name not in args.only) or name in results:
            continue
        with quiet_transformers():
            model, tok = load_model()
        row: dict = {"variant": name}
        if cfg is not None:
            cfg = replace(cfg, nsamples=args.nsamples)
            t = time.perf_counter()
            if cfg.needs_fisher and fisher is None:
                fisher = compute_fisher(model, tok, cfg, [i.name for i in quantizable_layers(model)])
                results["_fisher_s"] = time.perf_counter() - t
            res = quantize(model, tok, cfg, fisher=fisher if cfg.needs_fisher else None)
            row["quantize_s"] = time.perf_counter() - t
            row["bits_per_weight"] = res.bit_count().bits_per_weight
            row["sparse_percent"] = res.bit_count().sparse_percent
            row["config"] = cfg.to_dict()
        else:
            row["bits_per_weight"] = 32.0
        for t_name, w in windows.items():
            r = evaluate(model, w, data=t_name, batch_size=args.batch_size)
            row[t_name] = {"perplexity": r.perplexity, "tokens": r.tokens, "windows": r.windows}
        results[name] = row
        path.write_text(json.dumps(results, indent=2))
        print(name, {k: v for k, v in row.items() if k != "config"}, flush=True)
    lines = [
        f"| variant | bits/weight | sparse % | {' | '.join(f'{t} ppl' for t in texts)} | quantize s |",
        "|---|---|---|" + "---|" * len(texts) + "---|",
    ]
    for name in VARIANTS:
        if name not in results:
            continue
        r = results[name]
        ppl = " | ".join(f"{r[t]['perplexity']:.2f}" if t in r else "" for t in texts)
        lines.append(
            f"| {name} | {r['bits_per_weight']:.3f} | {r.get('sparse_percent', 0):.3f} | {ppl} | "
            f"{r.get('quantize_s', 0):.0f} |"
        )
    tokens = ", ".join(
        f"{t}: {results['fp32'][t]['tokens']} tokens" for t in texts if t in results.get("fp32", {})
    )
    lines.append(
        f"\nSetting R: SmolLM2-135M-Instruct fp32, seqlen 512, {tokens}; calibration {args.nsamples} "
        "windows of wiki:train (seed 0). Fisher time: "
        f"{results.get('_fisher_s', 0):.0f} s (shared by the SqueezeLLM variants)."
    )
    (OUT / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
