"""Which key should the detach rank by? One detach step of r_s from the Algorithm-1-only model, many keys.

From w̃ = the dense fit + 0.45% Algorithm-1 outliers (SqueezeLLM per row, the recipe's Algorithm 1), the
gradient is taken once at each t of {Gauss-2 nodes, 1} along w → w̃, then r_s of all weights are restored in
one step by each key and the model is evaluated. Keys: Δw ⊙ ∇F(w + tΔw) for one t, or the Gauss-2 PQI
Δw ⊙ ḡ; ranked by |·|, or by the positive or negative part alone.

Usage: OMP_NUM_THREADS=2 python benchmarks/detach_rankings.py [--bits 3] [--limit 40]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from harness import RESULTS

from requant.config import QuantConfig
from requant.data import text_windows
from requant.eval import evaluate
from requant.loading import load_model
from requant.model import get_linear, quantizable_layers
from requant.pipeline import quantize, set_weights
from requant.progress import quiet_transformers
from requant.recipes import recipe_settings
from requant.sensitivity.pqi import path_gradients
from requant.sensitivity.quadrature import quadrature
from requant.sparse.detach import restore_entries, select_top
from requant.sparse.outliers import budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--limit", type=int, default=40, help="evaluate the first N windows of wiki:test")
    args = p.parse_args()
    with quiet_transformers():
        model, tok = load_model()
        ref, _ = load_model()  # holds w; the path is walked on it
    names = [i.name for i in quantizable_layers(model)]
    w = {n: get_linear(ref, n).weight.detach().float().clone() for n in names}
    full = QuantConfig(base="squeezellm", bits=args.bits, **recipe_settings("requant", "squeezellm", args.bits))
    t0 = time.perf_counter()
    res = quantize(model, tok, replace(full, significant=0.0, step=None))
    w_q = {n: get_linear(model, n).weight.detach().float().clone() for n in names}
    sparse = {n: res.layers[n].sparse.mask() for n in names}
    count = budget(full.significant, sum(x.numel() for x in w.values()))
    calib = text_windows(tok, full.calib, full.seqlen, nsamples=full.nsamples, seed=full.seed)
    ts, cs = quadrature("gauss", 2)
    out: dict = {"bits": args.bits, "entries_restored": count, "nodes": {}, "rows": {}}
    grads = {}
    for node in path_gradients(ref, names, w, w_q, calib, [*ts.tolist(), 1.0]):
        grads[node.t] = node.grad
        out["nodes"][f"{node.t:.4f}"] = {"loss": node.loss, "dF_dt": node.derivative}
    out["quantize_and_gradients_s"] = time.perf_counter() - t0  # the Algorithm-1 model, then 3 nodes
    dw = {n: w_q[n] - w[n] for n in names}
    t1, t2 = ts.tolist()
    gauss = {n: dw[n] * (cs[0].item() * grads[t1][n] + cs[1].item() * grads[t2][n]) for n in names}
    end = {n: dw[n] * grads[1.0][n] for n in names}
    early = {n: dw[n] * grads[t1][n] for n in names}
    test = text_windows(tok, "wiki:test", 512, limit=args.limit)

    def row(label: str, scores: dict[str, torch.Tensor] | None, part: str = "abs") -> None:
        if scores is None:
            set_weights(model, w_q)
        else:
            keys = {n: s.abs() if part == "abs" else (s if part == "+" else -s).clamp_min(0) for n, s in scores.items()}
            sel = select_top(keys, count, sparse)
            set_weights(model, {n: restore_entries(w_q[n], w[n], sel[n]) for n in names})
        r = evaluate(model, test, data="wiki:test", batch_size=2)
        out["rows"][label] = r.perplexity
        print(f"{label}: {r.perplexity:.2f}", flush=True)

    row("Algorithm 1 only (nothing restored)", None)
    row(f"|Δw ⊙ ∇F(w + {t1:.2f}Δw)|", early)
    row("|Δw ⊙ ḡ|, ḡ of 2 Gauss nodes (the paper's PQI)", gauss)
    row("|Δw ⊙ ∇F(w̃)| (right rule, 1 node: the recipe)", end)
    row("max(Δw ⊙ ḡ, 0)", gauss, "+")
    row("max(−Δw ⊙ ḡ, 0)", gauss, "-")
    row("max(Δw ⊙ ∇F(w̃), 0)", end, "+")
    path = RESULTS / f"detach-rankings-{args.bits}bit"
    path.with_suffix(".json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    path.with_suffix(".md").write_text(table(out, args.limit))


def table(out: dict, limit: int) -> str:
    lines = ["| key (one step, r_s = 0.05%) | wiki:test ppl |", "|---|---|"]
    lines += [f"| {k.replace('|', chr(92) + '|')} | {v:.2f} |" for k, v in out["rows"].items()]
    lines.append(
        f"\nSetting R, SqueezeLLM {out['bits']}-bit per row, 0.45% Algorithm-1 outliers; first {limit} windows "
        f"of wiki:test; gradients over 32 × 512 windows of wiki:train."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
