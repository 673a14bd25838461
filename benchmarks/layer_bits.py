"""Per-layer bit widths vs sparse entries at equal bits, on setting R with SqueezeLLM's per-row LUT.

Dense-and-Sparse and ReQuant spend 0.24 bits per weight on fp16 sparse entries (0.5% of the weights: 3.188 →
3.427 bits). The same bits could instead buy 4-bit codes for the layers where the wider code helps most. Every
layer is fitted at 3 and at 4 bits (SqueezeLLM: Fisher-weighted k-means per row); a layer's gain from the wider
code is its drop in Σ F (w − ŵ)² (the diagonal-Fisher estimate of the loss increase that SqueezeLLM's k-means
minimises), its cost the extra bits of codes and tables; layers are upgraded greedily by gain per extra bit while
the total stays within the budget (default: the D&S budget, 3.427 bits). No sparse entries.

    OMP_NUM_THREADS=1 python benchmarks/layer_bits.py [--seed 0] [--budget 3.4275]

Writes results/layer-bits.{json,md}: the mixed-width point next to the equal-bits D&S / ReQuant rows measured
by the other benchmarks (frontier.md).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from harness import RESULTS

from requant.accounting import total
from requant.config import QuantConfig
from requant.data import text_windows
from requant.eval import evaluate
from requant.loading import load_model
from requant.model import quantizable_layers, unit_weight
from requant.pipeline import compute_fisher, set_weights
from requant.progress import quiet_transformers
from requant.quantizers import make_quantizer

TEXTS = ("wiki:test", "c4")
NARROW, WIDE = 3, 4


def plan(gain: dict[str, float], cost: dict[str, int], room: int) -> list[str]:
    """Layers to widen: by gain per extra bit, each while it fits in `room` bits (a layer that does not fit is
    skipped, a smaller one after it may still fit)."""
    chosen = []
    for n in sorted(gain, key=lambda n: gain[n] / cost[n], reverse=True):
        if gain[n] > 0 and cost[n] <= room:
            chosen.append(n)
            room -= cost[n]
    return chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="calibration seed of the Fisher")
    ap.add_argument("--budget", type=float, default=3.4275, help="bits per weight allowed (codes + tables)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with quiet_transformers():
        model, tok = load_model()
    names = [i.name for i in quantizable_layers(model)]
    cfg = QuantConfig(base="squeezellm", bits=NARROW, seed=args.seed)
    fisher = compute_fisher(model, tok, cfg, names)
    weights = {n: unit_weight(model, n).detach().float().clone() for n in names}
    fits: dict[int, dict[str, Any]] = {}
    for bits in (NARROW, WIDE):
        q = make_quantizer("squeezellm", bits)
        fits[bits] = {n: q.fit(weights[n], importance=fisher[n]) for n in names}
    err = {
        b: {n: float((fisher[n] * (weights[n] - fits[b][n].dequantize().float()).square()).sum()) for n in names}
        for b in fits
    }
    bits = {b: {n: fits[b][n].bit_count(0).total_bits for n in names} for b in fits}
    numel = sum(w.numel() for w in weights.values())
    room = int(args.budget * numel) - sum(bits[NARROW].values())
    gain = {n: err[NARROW][n] - err[WIDE][n] for n in names}
    cost = {n: bits[WIDE][n] - bits[NARROW][n] for n in names}
    wide = plan(gain, cost, room)
    chosen = {n: fits[WIDE if n in wide else NARROW][n] for n in names}
    count = total(t.bit_count(0) for t in chosen.values())
    set_weights(model, {n: t.dequantize() for n, t in chosen.items()})
    row: dict[str, Any] = {
        "variant": f"squeezellm-{NARROW}/{WIDE}bit-by-layer",
        "seed": args.seed,
        "budget": args.budget,
        "bits_per_weight": count.bits_per_weight,
        "wide_layers": wide,
        "wide_share": sum(weights[n].numel() for n in wide) / numel,
        "fisher_error": {
            "narrow": sum(err[NARROW].values()),
            "mixed": sum(err[WIDE if n in wide else NARROW][n] for n in names),
        },
    }
    for t in TEXTS:
        r = evaluate(model, text_windows(tok, t, 512, limit=40), data=t, batch_size=2)
        row[t] = {"perplexity": r.perplexity, "tokens": r.tokens, "windows": r.windows}
    row["wall_s"] = time.perf_counter() - t0
    path = RESULTS / "layer-bits.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    rows[f"{row['variant']}-seed{args.seed}"] = row
    path.write_text(json.dumps(rows, indent=2))
    write_md(rows)
    print({k: v for k, v in row.items() if k != "wide_layers"})
    return 0


def write_md(rows: dict[str, Any]) -> None:
    lines = [
        "| variant | calibration seed | bits/weight | layers at 4 bits (share of weights) | wiki:test | c4 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        kinds = sorted({n.rsplit(".", 1)[-1] for n in r["wide_layers"]})
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['bits_per_weight']:.3f} | {len(r['wide_layers'])} "
            f"({r['wide_share']:.0%}; {', '.join(kinds)}) | {r['wiki:test']['perplexity']:.2f} | "
            f"{r['c4']['perplexity']:.2f} |"
        )
    lines.append(
        "\nSetting R, 40 windows of 512 tokens per text; Fisher from 32 windows × 512 of wiki:train at the seed shown. "
        "No sparse entries: the bits D&S / ReQuant spend on 0.5% fp16 entries go to 4-bit codes on the layers "
        "where they lower Σ F (w − ŵ)² most per bit (benchmarks/layer_bits.py)."
    )
    (RESULTS / "layer-bits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
