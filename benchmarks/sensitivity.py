"""Sensitivity benchmark on the reference setting R: the paper's Tables 1-5 analogs and the cost of PQI.

SqueezeLLM dense-only at 4 and 3 bits; calibration = the first n random 512-token windows of wiki:train
(seed 0), used for the quantizer's Fisher and for F alike. Parts (each saved as soon as it finishes, so an
interrupted run resumes; a part is redone only if its setting changed):

  nodes    Table 3: every rule × N from one sweep of distinct nodes; the paper's midpoint N=32 element-wise
           PQI is kept on the way for Table 4 (sublayers) and Table 5 (coverage)
  lambda   Table 2: Taylor terms at w against F(w + λΔw) − F(w)
  blocks   Table 1: per block alone (+ all): gᵀΔw, ½ΔwᵀHΔw (HVP), ½ΣF_iiΔw², actual ΔF, PQI
  timing   one PQI pass vs the bare forward+backward passes of the same windows (medians), peak RSS

    .venv/bin/python benchmarks/sensitivity.py --bits 4 3 --nsamples 4 --parts nodes lambda timing
    .venv/bin/python benchmarks/sensitivity.py --bits 4 --parts blocks --blocks-nsamples 1

Writes benchmarks/results/sensitivity.json, sensitivity.md and PNG plots in results/sensitivity/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from requant.analysis.plots import write_plots
from requant.analysis.reports import (
    Problem,
    Report,
    blocks_report,
    coverage_report,
    lambda_report,
    nodes_report,
    prepare_problem,
    sublayers_report,
)
from requant.assets import cache_dir
from requant.config import QuantConfig
from requant.io import write_json_atomic
from requant.loading import load_model
from requant.memory import peak_rss
from requant.progress import quiet_transformers
from requant.sensitivity import post_quantization_integral, window_gradients

RESULTS = Path(__file__).parent / "results"
COMPOSITE = [1, 2, 4, 8, 16, 32]
GAUSS = [1, 2, 3, 4, 6, 8]
LAMBDAS = [1.0, 0.5, 0.2, 1e-1, 5e-2, 1e-2, 5e-3, 1e-3]


def maxrss_mib() -> float:
    return peak_rss() / 2**20


def load_problem(bits: int, nsamples: int, seqlen: int, dtype: str, device: str) -> tuple[Problem, float]:
    """Model with w restored and w̃ from SqueezeLLM dense-only; w̃ cached on disk (it is exact in fp16)."""
    from safetensors.torch import load_file, save_file

    with quiet_transformers():
        model, tok = load_model(dtype=dtype, device=device)
    cfg = QuantConfig(base="squeezellm", bits=bits, nsamples=nsamples, seqlen=seqlen, seed=0, grad_dtype=dtype)
    cache = cache_dir() / "bench-sensitivity" / f"sqllm{bits}-n{nsamples}-L{seqlen}-{dtype}.safetensors"
    t = time.perf_counter()
    if cache.is_file():
        from requant.data import text_windows
        from requant.model import quantizable_layers

        layers = quantizable_layers(model)
        names = [i.name for i in layers]
        original = {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in names}
        quantized = {k: v.float() for k, v in load_file(cache).items()}
        windows = text_windows(tok, cfg.calib, seqlen, nsamples=nsamples, seed=0)
        problem = Problem(model, layers, original, quantized, windows)
    else:
        problem = prepare_problem(model, tok, cfg)
        half = {n: w.half() for n, w in problem.quantized.items()}
        assert all(torch.equal(half[n].float(), problem.quantized[n]) for n in half), "w̃ not exact in fp16"
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(half, str(cache))
    return problem, time.perf_counter() - t


def bare_passes(problem: Problem, windows: torch.Tensor, nodes: int) -> None:
    """The forward+backward passes a PQI pass needs, and nothing else."""
    for _ in range(nodes):
        for _ in window_gradients(problem.model, problem.names, windows, desc="bare"):
            pass


def run_timing(problem: Problem, windows: int, nodes: int, rule: str, repeats: int) -> dict[str, Any]:
    w = problem.windows[:windows]
    rss0 = maxrss_mib()
    bare, pqi = [], []
    for _ in range(repeats):  # interleaved, so load changes on the shared machine hit both alike
        t = time.perf_counter()
        bare_passes(problem, w, nodes)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        post_quantization_integral(*problem.args()[:4], w, nodes=nodes, rule=rule)
        pqi.append(time.perf_counter() - t)
    ratios = [p / b for p, b in zip(pqi, bare, strict=True)]
    return {
        "windows": windows,
        "nodes": nodes,
        "rule": rule,
        "repeats": repeats,
        "bare_s": bare,
        "pqi_s": pqi,
        "median_bare_s": statistics.median(bare),
        "median_pqi_s": statistics.median(pqi),
        "ratio_of_medians": statistics.median(pqi) / statistics.median(bare),
        "median_ratio": statistics.median(ratios),
        "fwd_bwd_s_per_window": statistics.median(bare) / (windows * nodes),
        "maxrss_before_mib": rss0,
        "maxrss_after_mib": maxrss_mib(),
    }


def taylor_gap(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How much the Taylor terms at w underestimate |actual ΔF|: |actual| / |gᵀΔw + ½ΔwᵀHΔw|."""
    gaps = [abs(r["actual"]) / max(abs(r["first_order"] + r["second_order"]), 1e-30) for r in rows]
    blocks = [g for g, r in zip(gaps, rows, strict=True) if r["block"] != "all"]
    out: dict[str, Any] = {"all": gaps[-1]}
    if blocks:
        out |= {"blocks_min": min(blocks), "blocks_median": statistics.median(blocks)}
    return out


def save_report(results: dict[str, Any], key: str, report: Report, setting: dict[str, Any], plots: Path) -> None:
    files = [str(p.relative_to(RESULTS)) for p in write_plots(report, plots / key.replace(":", "_"))]
    results[key] = {"setting": setting, **report.to_dict(), "plots": files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--nsamples", type=int, default=4, help="calibration windows (quantizer Fisher and F)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--parts", nargs="+", default=["nodes", "lambda", "timing", "blocks"])
    p.add_argument("--blocks-nsamples", type=int, default=1, help="windows for the per-block table (HVP per block)")
    p.add_argument("--blocks-pqi", default="gauss:4", help="rule:N of the blocks table's PQI column")
    p.add_argument("--timing-windows", type=int, default=2)
    p.add_argument("--timing-nodes", type=int, default=4)
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--rules", nargs="+", default=["midpoint", "trapezoid", "left", "gauss"], help="nodes part")
    p.add_argument("--composite", type=int, nargs="+", default=COMPOSITE, help="N of the composite rules")
    p.add_argument("--gauss", type=int, nargs="+", default=GAUSS, help="N of the Gauss-Legendre rule")
    p.add_argument("--tag", default="sensitivity")
    p.add_argument("--redo", action="store_true", help="recompute parts already in the JSON")
    args = p.parse_args()

    path = RESULTS / f"{args.tag}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    plots = RESULTS / args.tag
    base = {"model": "SmolLM2-135M (embedded)", "base": "squeezellm dense-only", "calib": "wiki:train", "seed": 0}
    base |= {"seqlen": args.seqlen, "dtype": args.dtype, "device": args.device, "host": platform.node()}
    base |= {"threads": torch.get_num_threads()}
    for bits in args.bits:
        problem = None
        for part in args.parts:
            key = f"{part}:{bits}bit"
            n = {"blocks": args.blocks_nsamples, "timing": args.timing_windows}.get(part, args.nsamples)
            setting = {**base, "bits": bits, "quant_nsamples": args.nsamples, "windows": n}
            if part == "timing":
                setting |= {"nodes": args.timing_nodes, "repeats": args.timing_repeats}
            if part == "blocks":
                setting["pqi"] = args.blocks_pqi
            if part == "nodes":
                setting |= {"rules": args.rules, "composite": args.composite, "gauss": args.gauss}
            old = results.get(key, {}).get("setting", {})
            if not args.redo and {k: v for k, v in old.items() if k != "host"} == {
                k: v for k, v in setting.items() if k != "host"
            }:
                print(f"{key}: done before, skipped")
                continue
            if problem is None:
                problem, prep_s = load_problem(bits, args.nsamples, args.seqlen, args.dtype, args.device)
                print(f"{bits}-bit problem ready in {prep_s:.0f} s, maxrss {maxrss_mib():.0f} MiB", flush=True)
            sub = Problem(problem.model, problem.layers, problem.original, problem.quantized, problem.windows[:n])
            t = time.perf_counter()
            if part == "nodes":
                nodes = {r: args.gauss if r == "gauss" else args.composite for r in args.rules}
                rep = nodes_report(sub, rules=list(nodes), nodes=nodes, pqi_rule="midpoint", pqi_nodes=32)
                save_report(results, key, rep, setting, plots)
                for name, table in (("sublayers", sublayers_report), ("coverage", coverage_report)):
                    save_report(results, f"{name}:{bits}bit", table(sub, pqi=rep.pqi), setting, plots)
            elif part == "lambda":
                save_report(results, key, lambda_report(sub, lambdas=LAMBDAS), setting, plots)
            elif part == "blocks":
                rule, nn = args.blocks_pqi.split(":")
                rep = blocks_report(sub, pqi_nodes=int(nn), pqi_rule=rule)
                rep.summary["taylor_gap"] = taylor_gap(rep.rows)
                save_report(results, key, rep, setting, plots)
            elif part == "timing":
                results[key] = {
                    "setting": setting,
                    **run_timing(sub, n, args.timing_nodes, "gauss", args.timing_repeats),
                }
            else:
                raise SystemExit(f"unknown part {part!r}")
            results[key]["wall_s"] = time.perf_counter() - t
            write_json_atomic(path, results)
            (RESULTS / f"{args.tag}.md").write_text(markdown(results))
            print(f"{key}: {results[key]['wall_s']:.0f} s", flush=True)
        del problem
    (RESULTS / f"{args.tag}.md").write_text(markdown(results))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    return [Report("", rows, cols).to_markdown(), ""]


def markdown(results: dict[str, Any]) -> str:
    """The whole results file as Markdown, findings first."""
    out = ["# Sensitivity on R: SqueezeLLM dense-only, SmolLM2-135M, wiki:train calibration", ""]
    order = ["nodes", "timing", "lambda", "blocks", "sublayers", "coverage"]

    def rank(key: str) -> tuple[int, int]:
        part, bits = key.split(":")
        return (order.index(part) if part in order else len(order), -int(bits.removesuffix("bit")))

    for key, r in sorted(results.items(), key=lambda kv: rank(kv[0])):
        s = r["setting"]
        where = (
            f"{s['bits']}-bit, F over {s['windows']} x {s['seqlen']} tokens (quantizer Fisher over "
            f"{s['quant_nsamples']}), {s['dtype']}, {s['device']}, {s.get('threads', '?')} threads; "
            f"{r.get('wall_s', 0):.0f} s"
        )
        part = key.split(":")[0]
        out += [f"## {key}", "", where, ""]
        summ = r.get("summary", {})
        if part == "nodes":
            out.append(
                f"actual ΔF = {summ['actual']:.5f} nats; {summ['distinct_nodes']} distinct nodes; smallest "
                f"gradient evaluations per window within {100 * summ['target_rel_error']:g}%: "
                f"{summ['smallest_grad_evals_within_target']}"
            )
            out.append("")
            out += _table(r["rows"], ["rule", "nodes", "grad_evals", "predicted", "actual", "rel_error"])
        elif part == "timing":
            out.append(
                f"PQI ({r['rule']} {r['nodes']} nodes x {r['windows']} windows) median {r['median_pqi_s']:.1f} s "
                f"vs bare fwd+bwd {r['median_bare_s']:.1f} s: ratio {r['ratio_of_medians']:.3f} (median of "
                f"per-repeat ratios {r['median_ratio']:.3f}); fwd+bwd {r['fwd_bwd_s_per_window']:.2f} s/window; "
                f"peak RSS {r['maxrss_before_mib']:.0f} MiB before, {r['maxrss_after_mib']:.0f} MiB after"
            )
            out.append("")
        else:
            if part == "blocks" and "taylor_gap" in summ:
                out += [f"|actual| / |first + second order|: {summ['taylor_gap']}", ""]
            if part == "coverage":
                out += [f"Σ|ΔF_PQI| = {summ['abs_total']:.4g} vs signed Σ = {summ['predicted']:.4g}", ""]
            cols = list(dict.fromkeys(k for row in r["rows"] for k in row))
            out += _table(r["rows"], cols)
        out += [f"![{key}]({f})" for f in r.get("plots", [])] + [""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
