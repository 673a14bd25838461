"""Weighted 1-D k-means: requant's solvers vs a per-row scikit-learn KMeans loop, on real layers.

Every solver fits every row of the reference model's layer-3 weights with the same sample weights, at k = 8
and 16: Fisher-like weights ((standard gaussian)², fixed seed; no real Fisher is computed here) and uniform
weights. Solvers, timed side by side in interleaved rounds (median of --repeats rounds):
  exact  — the C kernel's dynamic program (the default of weighted_kmeans_1d): the optimum of every row;
  c-heur — the C kernel's heuristic (exact=False, n_init=3);
  torch  — the PyTorch reference heuristic (REQUANT_KERNELS=0, n_init=3), the previous implementation;
  sklearn — KMeans(n_clusters=k, n_init="auto", max_iter=50, random_state=0) per row, thread pools limited to
            --sklearn-threads, over --sklearn-rows rows (all by default; fewer are extrapolated per row).
Objectives are the weighted SSE of each solver's float32 centroids with nearest assignment, summed over all
rows. With --full-model, also times a SqueezeLLM 3-bit fit (make_quantizer("squeezellm", 3).fit) of all
quantizable layers with Fisher-like importance, per solver. Writes benchmarks/results/kmeans.json and .md.

Usage: python benchmarks/kmeans.py [--threads 2] [--repeats 5] [--full-model] [--layers NAME ...]
       [--save-weights FILE | --weights-file FILE]   (run on a machine without the model)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

from requant.quantizers import kmeans
from requant.quantizers.kmeans import weighted_kmeans_1d

LAYERS = ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.down_proj"]
RESULTS = Path(__file__).resolve().parent / "results"
SOLVERS = ("exact", "c-heur", "torch")


TORCH_THREADS = 1  # set by --torch-threads


@contextlib.contextmanager
def solver_env(solver: str) -> Iterator[None]:
    """Run weighted_kmeans_1d's default path as `solver` (for callers that do not pass `exact`)."""
    old_env, old_budget, old_threads = os.environ.get("REQUANT_KERNELS"), kmeans.EXACT_BUDGET, torch.get_num_threads()
    if solver == "torch":
        os.environ["REQUANT_KERNELS"] = "0"
        torch.set_num_threads(TORCH_THREADS)
    elif solver == "c-heur":
        kmeans.EXACT_BUDGET = 0
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        kmeans.EXACT_BUDGET = old_budget
        if old_env is None:
            os.environ.pop("REQUANT_KERNELS", None)
        else:
            os.environ["REQUANT_KERNELS"] = old_env


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from requant.loading import load_model as load

    return load(None)[0]


def load_weights(names: list[str]) -> dict[str, torch.Tensor]:
    """The named Linear weights of the embedded SmolLM2-135M (dequantized from its Q4_1 GGUF)."""
    modules = dict(load_model().named_modules())
    return {name: modules[name].weight.detach().float().clone() for name in names}


def fisher_like(shape: torch.Size, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 2).to(dtype)


def timed(fn: Callable[[], object]) -> tuple[float, object, float]:
    """Wall seconds, the result, and CPU seconds of the whole process (all threads)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, out, time.process_time() - c


def sklearn_rows(x: np.ndarray, w: np.ndarray, k: int, rows: range) -> tuple[float, float, float]:
    """Wall seconds, total weighted SSE and CPU seconds of per-row sklearn fits over `rows`."""
    from sklearn.cluster import KMeans

    total, seconds, cpu = 0.0, 0.0, 0.0
    for i in rows:
        t, c = time.perf_counter(), time.process_time()
        km = KMeans(n_clusters=k, n_init="auto", max_iter=50, random_state=0)
        centers = km.fit(x[i, :, None], sample_weight=w[i]).cluster_centers_[:, 0]
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
        total += float((w[i] * ((x[i, :, None] - centers[None, :]) ** 2).min(1)).sum())
    return seconds, total, cpu


def layer_table(args, weights: dict[str, torch.Tensor]) -> list[dict]:
    from threadpoolctl import threadpool_limits

    records = []
    for name in args.layers:
        x = weights[name]
        rows, n = x.shape
        fisher = fisher_like(x.shape, 0)
        for wname, w in (("fisher-like (gaussian²)", fisher), ("uniform", None)):
            wn = fisher.numpy() if w is not None else np.ones((rows, n))
            xn = x.double().numpy()
            for k in args.ks:
                fits = {
                    "exact": partial(weighted_kmeans_1d, x, w, k, exact=True),
                    "c-heur": partial(weighted_kmeans_1d, x, w, k, exact=False),
                    "torch": partial(weighted_kmeans_1d, x, w, k),  # under solver_env("torch")
                }
                timed_rows = rows if args.sklearn_rows <= 0 else min(rows, args.sklearn_rows)
                times: dict[str, list[float]] = {s: [] for s in (*SOLVERS, "sklearn")}
                cpu: dict[str, list[float]] = {s: [] for s in (*SOLVERS, "sklearn")}
                objective: dict[str, float] = {}
                for s in SOLVERS:  # warm-up (kernel build and load, allocator)
                    with solver_env(s):
                        objective[s] = fits[s]().objective.sum().item()
                for r in range(args.repeats):  # interleaved rounds: load changes hit every solver alike
                    for s in SOLVERS:
                        with solver_env(s):
                            sec, _, c = timed(fits[s])
                        times[s].append(sec)
                        cpu[s].append(c)
                    if r < args.sklearn_repeats:
                        with threadpool_limits(args.sklearn_threads):
                            sec, sk_timed, c = sklearn_rows(xn, wn, k, range(timed_rows))
                        times["sklearn"].append(sec * rows / timed_rows)
                        cpu["sklearn"].append(c * rows / timed_rows)
                with threadpool_limits(args.sklearn_threads):  # the objective covers all rows
                    _, sk_rest, _ = sklearn_rows(xn, wn, k, range(timed_rows, rows))
                objective["sklearn"] = sk_timed + sk_rest
                med = {s: statistics.median(v) for s, v in times.items()}
                best = {s: min(v) for s, v in times.items()}
                cpu_med = {s: statistics.median(v) for s, v in cpu.items()}
                rec = {
                    "layer": name,
                    "shape": [rows, n],
                    "k": k,
                    "weights": wname,
                    "seconds": med,
                    "seconds_all": times,
                    "sklearn_timing": "measured" if timed_rows == rows else f"extrapolated from {timed_rows} rows",
                    "seconds_min": best,
                    "speedup_vs_sklearn": {s: med["sklearn"] / med[s] for s in SOLVERS},
                    "speedup_vs_sklearn_min": {s: best["sklearn"] / best[s] for s in SOLVERS},
                    "cpu_seconds": cpu_med,
                    "cpu_speedup_vs_sklearn": {s: cpu_med["sklearn"] / cpu_med[s] for s in SOLVERS},
                    "objective": objective,
                    "rel_diff_vs_sklearn": {s: objective[s] / objective["sklearn"] - 1 for s in SOLVERS},
                    "load_after": os.getloadavg()[0],
                }
                records.append(rec)
                print(
                    f"{name:32s} {rows}x{n} k={k:2d} {wname:24s} "
                    + "  ".join(
                        f"{s} {med[s] * 1e3:.1f}ms x{rec['speedup_vs_sklearn'][s]:.0f} "
                        f"{rec['rel_diff_vs_sklearn'][s]:+.2%}"
                        for s in SOLVERS
                    )
                    + f"  sklearn {med['sklearn'] * 1e3:.0f}ms  load {rec['load_after']:.1f}",
                    flush=True,
                )
    return records


def full_model(args) -> dict:
    """Seconds and Σ importance·(W − Ŵ)² of a SqueezeLLM 3-bit fit of every quantizable layer, per solver."""
    from requant.model import quantizable_layers
    from requant.quantizers import make_quantizer

    model = load_model()
    modules = dict(model.named_modules())
    layers = quantizable_layers(model)
    quantizer = make_quantizer("squeezellm", 3)
    out: dict[str, dict] = {"layers": len(layers), "rows": sum(info.out_features for info in layers)}
    for solver in (*SOLVERS,):
        seconds, err = 0.0, 0.0
        with solver_env(solver):
            for i, info in enumerate(layers):
                w = modules[info.name].weight.detach()
                imp = fisher_like(w.shape, 1000 + i, torch.float32)  # like Fisher: float32, per layer
                sec, q, _ = timed(partial(quantizer.fit, w, importance=imp))
                seconds += sec
                err += float((imp.double() * (w.double() - q.dequantize().double()) ** 2).sum())
        out[solver] = {"seconds": seconds, "weighted_sse": err}
        print(f"full model, {len(layers)} layers, squeezellm 3-bit, {solver}: {seconds:.1f} s, Σ imp·err² {err:.6g}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the C kernel uses as many)")
    p.add_argument("--sklearn-threads", type=int, default=1, help="thread-pool limit for sklearn")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads for the PyTorch reference (its many small parallel ops stall on a busy machine)",
    )
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (medians reported)")
    p.add_argument("--sklearn-repeats", type=int, default=3, help="rounds that also time sklearn")
    p.add_argument("--sklearn-rows", type=int, default=0, help="rows timed for sklearn (0 = all)")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--full-model", action="store_true", help="also time a full-model SqueezeLLM 3-bit fit")
    p.add_argument("--skip-layers", action="store_true", help="only the full-model timing")
    p.add_argument("--note", default="", help="a line about the machine, added to the Markdown table")
    p.add_argument("--layers", nargs="+", default=LAYERS)
    p.add_argument("--weights-file", type=Path, help="read the layers from this file (see --save-weights)")
    p.add_argument("--save-weights", type=Path, help="also save the layers here, for machines without the model")
    args = p.parse_args()
    if not 1 <= args.sklearn_repeats <= args.repeats:
        p.error("--sklearn-repeats must be between 1 and --repeats")
    import sklearn

    global TORCH_THREADS
    TORCH_THREADS = args.torch_threads
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    records = []
    if not args.skip_layers:
        weights = torch.load(args.weights_file) if args.weights_file else load_weights(args.layers)
        if args.save_weights:
            torch.save({name: weights[name] for name in args.layers}, args.save_weights)
        records = layer_table(args, weights)
    full = full_model(args) if args.full_model else None
    meta = {
        "threads": args.threads,
        "sklearn_threads": args.sklearn_threads,
        "torch_reference_threads": args.torch_threads,
        "repeats": args.repeats,
        "sklearn_repeats": args.sklearn_repeats,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "machine": platform.processor() or platform.machine(),
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "kernel": kmeans.backend(),
        "exact_budget": kmeans.EXACT_BUDGET,
        "objective": "weighted SSE Σ w·(x − c)², summed over rows; float32 centroids, nearest assignment",
        "fisher_like_weights": "standard gaussian squared, torch seed 0 (not real Fisher information)",
        "note": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kmeans.json").write_text(
        json.dumps({"meta": meta, "results": records, "full_model": full}, indent=2) + "\n"
    )
    (RESULTS / "kmeans.md").write_text(markdown(meta, records, full, args))
    print(f"wrote {RESULTS / 'kmeans.json'} and {RESULTS / 'kmeans.md'}")


def markdown(meta: dict, records: list[dict], full: dict | None, args) -> str:
    lo, hi = meta["loadavg_1min_before_after"]
    lines = [
        "# Weighted 1-D k-means: requant vs per-row scikit-learn KMeans",
        "",
        f"torch {meta['torch']}; C kernel ({meta['kernel']}) on {args.threads} threads, PyTorch reference on"
        f" {args.torch_threads}; sklearn {meta['sklearn']}"
        f" KMeans(n_init='auto', max_iter=50) per row, {args.sklearn_threads} thread(s); {meta['cpus_usable']}"
        f" of {meta['cpu_count']} CPUs usable; 1-min load average {lo:.1f} before / {hi:.1f} after. Times are"
        f" medians of {args.repeats} interleaved rounds ({args.sklearn_repeats} for sklearn), measured side by"
        " side in one run.",
        "",
        *([args.note, ""] if args.note else []),
        "Solvers: **exact** = C kernel dynamic program (weighted_kmeans_1d's default; the optimum of each row),"
        " **c-heur** = C kernel heuristic (exact=False, n_init=3), **torch** = PyTorch reference heuristic"
        " (no compiler or REQUANT_KERNELS=0; the previous implementation). Speedup = sklearn time / solver"
        " time. Objective: weighted SSE summed over all rows (lower is better); rel. = solver / sklearn − 1.",
        "",
    ]
    if records:
        lines += [
            "| layer | shape | k | weights | sklearn (ms) | exact (ms) | speedup | c-heur (ms) | speedup"
            " | torch (ms) | speedup | sklearn obj | exact rel. | c-heur rel. | torch rel. |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in records:
            s, sp, rel = r["seconds"], r["speedup_vs_sklearn"], r["rel_diff_vs_sklearn"]
            sk = f"{s['sklearn'] * 1e3:.0f}" + ("" if r["sklearn_timing"] == "measured" else " (extrap.)")
            lines.append(
                f"| {r['layer'].removeprefix('model.layers.')} | {r['shape'][0]}×{r['shape'][1]} | {r['k']}"
                f" | {r['weights']} | {sk}"
                + "".join(f" | {s[v] * 1e3:.1f} | {sp[v]:.3g}×" for v in SOLVERS)
                + f" | {r['objective']['sklearn']:.5g}"
                + "".join(f" | {rel[v]:+.2%}" for v in SOLVERS)
                + " |"
            )
    if records:
        lines += [
            "",
            "The same speedups from the fastest round instead of the median (other processes only ever add"
            " time), and per CPU second (median process CPU time, all threads: the work each solver does,"
            " whatever the machine's load):",
            "",
            "| layer | k | weights | exact fastest | c-heur fastest | torch fastest | exact CPU | c-heur CPU"
            " | torch CPU |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in records:
            sp, cs = r["speedup_vs_sklearn_min"], r["cpu_speedup_vs_sklearn"]
            lines.append(
                f"| {r['layer'].removeprefix('model.layers.')} | {r['k']} | {r['weights']}"
                + "".join(f" | {sp[v]:.3g}×" for v in SOLVERS)
                + "".join(f" | {cs[v]:.3g}×" for v in SOLVERS)
                + " |"
            )
    if full:
        lines += [
            "",
            f"Full-model SqueezeLLM 3-bit fit (make_quantizer('squeezellm', 3).fit, all {full['layers']} layers,"
            f" {full['rows']} rows, Fisher-like float32 importance):",
            "",
            "| solver | seconds | Σ importance·(W − Ŵ)² | vs torch |",
            "|---|---|---|---|",
        ]
        ref = full["torch"]
        for v in SOLVERS:
            f = full[v]
            speed, rel = ref["seconds"] / f["seconds"], f["weighted_sse"] / ref["weighted_sse"] - 1
            lines.append(f"| {v} | {f['seconds']:.1f} | {f['weighted_sse']:.6g} | {speed:.1f}× faster, {rel:+.2%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
