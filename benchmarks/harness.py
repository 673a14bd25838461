"""Shared benchmark harness: quantize named variants of the reference model, evaluate, save JSON + Markdown.

Each finished variant is written to the JSON at once, so an interrupted benchmark resumes where it stopped.
The Fisher of one calibration setting is computed once and shared by every variant that needs it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from requant.config import QuantConfig
from requant.data import text_windows
from requant.eval import evaluate
from requant.format import save_checkpoint
from requant.loading import load_model
from requant.memory import GIB, peak_rss
from requant.model import quantizable_layers
from requant.pipeline import compute_fisher, quantize
from requant.progress import quiet_transformers

RESULTS = Path(__file__).parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows per text")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--only", nargs="*", default=None, help="run only these variants")
    p.add_argument("--texts", default="wiki:test,c4", help="comma-separated evaluation texts")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--tag", default=None, help="name of the result files (default: the script's)")
    return p


def run_variants(
    variants: dict[str, QuantConfig | None], args: argparse.Namespace, tag: str, note: str = ""
) -> dict[str, Any]:
    """Quantize and evaluate each variant (None = the fp32 model); returns and stores all results."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.tag or tag}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    with quiet_transformers():
        model, tok = load_model()
    texts = [t for t in args.texts.split(",") if t]
    windows = {t: text_windows(tok, t, 512, limit=args.limit) for t in texts}
    fisher: dict[str, Any] = {}
    for name, cfg in variants.items():
        if (args.only and name not in args.only) or name in results:
            continue
        with quiet_transformers():
            model, tok = load_model()
        row: dict[str, Any] = {"variant": name}
        if cfg is not None:
            cfg = replace(cfg, nsamples=args.nsamples)
            t = time.perf_counter()
            key = f"{cfg.calib}|{cfg.nsamples}|{cfg.seqlen}|{cfg.seed}|{cfg.grad_dtype}"
            if cfg.needs_fisher and key not in fisher:
                fisher[key] = compute_fisher(model, tok, cfg, [i.name for i in quantizable_layers(model)])
                results.setdefault("_fisher_s", {})[key] = time.perf_counter() - t
            res = quantize(model, tok, cfg, fisher=fisher.get(key) if cfg.needs_fisher else None)
            if getattr(args, "save", None):  # for evaluations beyond the harness's (e.g. the whole texts)
                save_checkpoint(Path(args.save) / name, model, tok, res, metadata={"variant": name}, force=True)
            row.update(
                quantize_s=time.perf_counter() - t,
                bits_per_weight=res.bit_count().bits_per_weight,
                sparse_percent=res.bit_count().sparse_percent,
                config=cfg.to_dict(),
                timings=res.report["timings"],
            )
        else:
            row["bits_per_weight"] = 32.0
        for t_name, w in windows.items():
            r = evaluate(model, w, data=t_name, batch_size=args.batch_size)
            row[t_name] = {"perplexity": r.perplexity, "tokens": r.tokens, "windows": r.windows}
        row["peak_rss_gib"] = peak_rss() / GIB
        results[name] = row
        path.write_text(json.dumps(results, indent=2))
        print(name, {k: v for k, v in row.items() if k not in ("config", "timings")}, flush=True)
    write_table(results, list(variants), texts, args, tag, note)
    return results


def write_table(
    results: dict[str, Any], order: list[str], texts: list[str], args: argparse.Namespace, tag: str, note: str
) -> None:
    head = f"| variant | bits/weight | sparse % | {' | '.join(f'{t} ppl' for t in texts)} | quantize s |"
    lines = [head, "|---|---|---|" + "---|" * len(texts) + "---|"]
    for name in order:
        if name not in results:
            continue
        r = results[name]
        ppl = " | ".join(f"{r[t]['perplexity']:.2f}" if t in r else "" for t in texts)
        lines.append(
            f"| {name} | {r['bits_per_weight']:.3f} | {r.get('sparse_percent', 0):.3f} | {ppl} | "
            f"{r.get('quantize_s', 0):.0f} |"
        )
    some = next((results[n] for n in order if n in results), {})
    seeds = sorted({results[n].get("config", {}).get("seed", 0) for n in order if n in results}) or [0]
    tokens = ", ".join(f"{t}: {some[t]['tokens']} tokens ({some[t]['windows']} windows)" for t in texts if t in some)
    lines.append(
        f"\nSetting R: SmolLM2-135M-Instruct fp32, seqlen 512, {tokens}; calibration {args.nsamples} "
        f"windows × 512 of wiki:train (seed {', '.join(map(str, seeds))}). {note}"
    )
    (RESULTS / f"{args.tag or tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
