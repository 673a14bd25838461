"""The quality frontier on setting R: perplexity vs bits per weight for every base method, alone, with
Dense-and-Sparse and with ReQuant, the Pareto front marked and llama.cpp's measured points as a reference series.

Every point is one measured configuration at one calibration setting (32 windows × 512 of wiki:train, seed 0 or
1) evaluated on the first 40 windows of wiki:test and c4. Points already measured by the other benchmarks
(results/methods.json, methods-qtip.json, baselines.json, ablation-*.json) are reused when their stored config
equals a grid point's (rows of the frontier's own runs take precedence: `--fresh --only NAME` re-measures a
point with today's code); the rest of the grid is quantized here, one variant at a time, each stored at once
(results/frontier-runs*.json), so an interrupted run resumes.

    OMP_NUM_THREADS=1 python benchmarks/frontier.py                  # run what is missing, then write the results
    python benchmarks/frontier.py --report-only                       # collect and write only
    OMP_NUM_THREADS=1 python benchmarks/frontier.py --only NAME ...   # some grid points
    OMP_NUM_THREADS=1 python benchmarks/frontier.py --seed 1 --only NAME ...   # the second calibration seed

Writes results/frontier.{json,md,png} and src/requant/frontier.json: the measured table `--recipe best
--bits-budget B` picks from (the points with both texts, ranked by their mean log-perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness import RESULTS, run_variants

from requant.config import QuantConfig
from requant.recipes import BEST_TABLE, best_point, recipe_settings

TEXTS = ("wiki:test", "c4")
CALIBRATION = {"calib": "wiki:train", "nsamples": 32, "seqlen": 512}
SOURCES = ("methods", "methods-qtip", "baselines", "ablation-3bit", "ablation-4bit")
LEVELS = (2.25, 3.0, 3.3, 3.5, 4.0, 4.62)  # bit budgets of the summary (4.62: the 4-bit D&S budget)
LLAMACPP = Path(__file__).parent / "reference" / "llamacpp.json"
IQR_DNS = {"outliers": 0.45, "outlier_select": "iqr", "significant": 0.05, "significant_select": "fisher"}
WIDEN = 0.2395  # bits per weight of 0.5% sparse entries (3.188 → 3.427 at 3 bits), for --widen-bits at equal bits
ALG1 = {"outlier_select": "adaptive", "alg1_steps": 2}  # 9 candidate fits per layer (methods.py's grid)


def grid() -> dict[str, QuantConfig]:
    """The configurations the frontier needs (2/3/4 bits × base × alone / D&S / ReQuant at two sparse budgets)."""
    out: dict[str, QuantConfig] = {}
    for bits in (2, 3, 4):
        for m in ("rtn", "awq", "gptq"):
            out[f"{m}-{bits}bit-g64"] = QuantConfig(base=m, bits=bits, group_size=64)
            out[f"{m}-{bits}bit-g96+ReQuant"] = QuantConfig(
                base=m, bits=bits, group_size=96, outliers=0.25, significant=0.0, **ALG1
            )
            # Per row: Algorithm 1 scored by the base's own error vs the Fisher-weighted error, and the IQR rule.
            row = QuantConfig(base=m, bits=bits, outliers=0.25, significant=0.0, **ALG1)
            out[f"{m}-{bits}bit-row+ReQuant"] = row
            out[f"{m}-{bits}bit-row+ReQuant-fisher"] = replace(row, alg1_objective="fisher")
            out[f"{m}-{bits}bit-row+IQR"] = replace(row, outlier_select="iqr")
        sq = QuantConfig(base="squeezellm", bits=bits)
        rq = replace(sq, **recipe_settings("requant", "squeezellm", bits))
        out[f"squeezellm-{bits}bit-row"] = sq
        # SqueezeLLM's D&S as methods.py builds it (the recipe's settings with its IQR + Fisher selection).
        out[f"squeezellm-{bits}bit-D&S"] = replace(rq, outlier_select="iqr", significant_select="fisher", step=None)
        out[f"squeezellm-{bits}bit-ReQuant"] = rq
        out[f"squeezellm-{bits}bit-ReQuant-0.25%"] = replace(rq, outliers=0.2, significant=0.05)
        out[f"squeezellm-{bits}bit-ReQuant-1%"] = replace(rq, outliers=0.9, significant=0.1)
        # The same 0.5% split towards detached values (a detached entry bought more than an outlier in the ablation).
        for r_o in (0.25, 0.1):
            out[f"squeezellm-{bits}bit-ReQuant-{r_o}+{0.5 - r_o:g}"] = replace(
                rq, outliers=r_o, significant=round(0.5 - r_o, 4), step=0.05
            )
        if bits == 3:
            # The D&S budget's 0.24 bits per weight spent on 4-bit codes for the layers that gain most
            # (--widen-bits, no sparse entries), and half of it so (+ ReQuant at 0.25%).
            out[f"squeezellm-{bits}bit-widen"] = replace(sq, widen_bits=WIDEN)
            out[f"squeezellm-{bits}bit-widen-half+ReQuant-0.25%"] = replace(
                out[f"squeezellm-{bits}bit-ReQuant-0.25%"], widen_bits=WIDEN / 2
            )
        # SqueezeLLM's tables with GPTQ's error-feedback rounding (--base-option feedback=true), with its D&S and
        # ReQuant (same settings as the plain rows).
        fb = {"base_options": {"feedback": True}}
        out[f"squeezellm-fb-{bits}bit-row"] = replace(sq, **fb)
        out[f"squeezellm-fb-{bits}bit-D&S"] = replace(out[f"squeezellm-{bits}bit-D&S"], **fb)
        out[f"squeezellm-fb-{bits}bit-ReQuant"] = replace(rq, **fb)
        # Algorithm 1 refits every candidate (33 per layer, each a GPTQ pass with feedback): the IQR outliers with
        # ReQuant's detach are the affordable reading.
        out[f"squeezellm-fb-{bits}bit-IQR+detach"] = replace(rq, outlier_select="iqr", **fb)
        if bits == 3:
            # The detached entries refitted inside the feedback (--detach-refit) / values fitted to the layer
            # inputs (--sparse-values fit).
            iqr_fb = out[f"squeezellm-fb-{bits}bit-IQR+detach"]
            out[f"squeezellm-fb-{bits}bit-IQR+detach-refit"] = replace(iqr_fb, detach_refit=True)
            out[f"squeezellm-fb-{bits}bit-IQR+detach-fit"] = replace(iqr_fb, sparse_values="fit")
            out[f"squeezellm-fb-{bits}bit-widen"] = replace(out[f"squeezellm-fb-{bits}bit-row"], widen_bits=WIDEN)
            out[f"squeezellm-fb-{bits}bit-widen-half+IQR+detach-0.25%"] = replace(
                iqr_fb, outliers=0.2, widen_bits=WIDEN / 2
            )
        # A LUT fitted with error feedback (GPTQ over the per-row LUT grid), alone and with the sparse parts.
        lut = QuantConfig(base="gptq", bits=bits, base_options={"grid": "lut"})
        out[f"gptq-lut-{bits}bit-row"] = lut
        out[f"gptq-lut-{bits}bit-D&S"] = replace(lut, **IQR_DNS)
        out[f"gptq-lut-{bits}bit-IQR+detach"] = replace(
            lut, **{**IQR_DNS, "significant_select": "pqi", "step": 0.025, "pqi_nodes": 1, "pqi_rule": "right"}
        )
        qt = QuantConfig(base="qtip", bits=bits)
        out[f"qtip-{bits}bit"] = qt
        out[f"qtip-{bits}bit+ReQuant"] = replace(
            qt, outliers=0.0, significant=0.5, significant_select="pqi", step=0.25, pqi_nodes=2, pqi_rule="gauss"
        )
        out[f"qtip-{bits}bit+ReQuant-right1"] = replace(out[f"qtip-{bits}bit+ReQuant"], pqi_nodes=1, pqi_rule="right")
        # A longer trellis (L = 12: lower MSE at the same bits, about the same encoding time per weight).
        out[f"qtip-L12-{bits}bit+ReQuant-right1"] = replace(
            out[f"qtip-{bits}bit+ReQuant-right1"], base_options={"L": 12}
        )
        if bits == 3:
            # All the sparse budget below 3.3 bits (3.003 + 0.6% × 48 = 3.29): the ≤ 3.3-bit point of the goals.
            out[f"qtip-L12-{bits}bit+ReQuant-right1-0.6%"] = replace(
                out[f"qtip-L12-{bits}bit+ReQuant-right1"], significant=0.6, step=0.3
            )
            out[f"qtip-L12-{bits}bit+ReQuant-right1-0.6%-fit"] = replace(
                out[f"qtip-L12-{bits}bit+ReQuant-right1-0.6%"], sparse_values="fit"
            )
            # About half of that budget as 4-bit codes on the layers that gain most (--widen-bits 0.15) and half as
            # detached entries (0.3% × 48 = 0.144): 3.003 + 0.144 + ≤ 0.15 ≤ 3.3.
            out[f"qtip-L12-{bits}bit-widen+ReQuant-right1-0.3%"] = replace(
                out[f"qtip-L12-{bits}bit+ReQuant-right1"], significant=0.3, step=0.15, widen_bits=0.15
            )
        out[f"qtip-{bits}bit+ReQuant-0.25%"] = replace(
            qt, outliers=0.0, significant=0.25, significant_select="pqi", step=0.125, pqi_nodes=2, pqi_rule="gauss"
        )
    return out


def _key(cfg: QuantConfig) -> str:
    """A config's identity for matching rows: settings without effect under it are reset to their defaults
    (e.g. the PQI rule of a D&S run that ranks by Fisher), so rows stored before a recipe changed still match."""
    d, default = cfg.to_dict(), QuantConfig().to_dict()
    detach = cfg.significant > 0 and cfg.significant_select == "pqi"
    idle = [] if detach or cfg.needs_pqi_pre else ["pqi_nodes", "pqi_rule"]
    idle += [] if detach else ["step", "detach_scope", "detach_ranking"]
    idle += [] if cfg.outliers > 0 and cfg.outlier_select == "adaptive" else [k for k in d if k.startswith("alg1_")]
    return json.dumps({**d, **{k: default[k] for k in idle}}, sort_keys=True)


def _usable(row: dict[str, Any], seed: int) -> bool:
    """Measured at the frontier's calibration setting and seed, on 40 windows of wiki:test."""
    c = row["config"]
    same = all(c.get(k) == v for k, v in CALIBRATION.items()) and c.get("seed", 0) == seed
    return same and row.get("wiki:test", {}).get("windows") == 40


def measured(seed: int) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, Any] | None]:
    """Every usable row of the result files, by config key -> (source, row); and the fp32 row."""
    rows: dict[str, tuple[str, dict[str, Any]]] = {}
    fp32 = None
    runs = sorted(p.stem for p in RESULTS.glob("frontier-runs*.json"))
    for src in (*SOURCES, *runs):
        path = RESULTS / f"{src}.json"
        if not path.exists():
            continue
        for name, row in json.loads(path.read_text()).items():
            if not isinstance(row, dict):
                continue
            if name == "fp32" and all(row.get(t, {}).get("windows") == 40 for t in TEXTS):
                fp32 = fp32 or row
            if "config" not in row or not _usable(row, seed):
                continue
            key = _key(QuantConfig.from_dict(row["config"]))
            # The frontier's own runs (today's code) replace older rows; else a row with both texts wins.
            if key not in rows or src in runs or ("c4" in row and "c4" not in rows[key][1]):
                rows[key] = (f"{src}.json: {name}", row)
    return rows, fp32


def model_sizes() -> tuple[int, int]:
    """(quantized block weights, other parameters) of the reference model."""
    from requant.loading import load_model
    from requant.model import quantizable_layers, unit_weight
    from requant.progress import quiet_transformers

    with quiet_transformers():
        model, _ = load_model()
    nq = sum(unit_weight(model, u.name).numel() for u in quantizable_layers(model))
    total = sum(p.numel() for p in model.parameters())
    return nq, total - nq


def pareto(points: list[dict[str, Any]], text: str) -> list[str]:
    """Names of the points no other point beats at the same or fewer bits on `text`."""
    front, best = [], math.inf
    for p in sorted((p for p in points if text in p), key=lambda p: (p["bits_per_weight"], p[text])):
        if p[text] < best:
            front.append(p["name"])
            best = p[text]
    return front


def collect(seed: int) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """The frontier's points (grid points measured, named by the grid), fp32, and the grid points not measured."""
    rows, fp32 = measured(seed)
    if fp32 is None:
        raise SystemExit("no fp32 row with 40 windows of both texts; run benchmarks/methods.py --only fp32")
    nq, other = model_sizes()
    named = {_key(replace(cfg, seed=seed)): name for name, cfg in grid().items()}
    points, missing = [], [n for k, n in named.items() if k not in rows]
    for key, (src, row) in rows.items():
        cfg = QuantConfig.from_dict(row["config"])
        bpw = row["bits_per_weight"]
        p = {
            "name": named.get(key, src.replace(".json: ", "/")),  # other measured rows: "<file>/<variant>"
            "source": src,
            "base": cfg.base,
            "bits": cfg.bits,
            "bits_per_weight": bpw,
            "sparse_percent": row.get("sparse_percent", 0.0),
            "model_mb": (bpw * nq / 8 + 2 * other) / 1e6,  # block linears as stored + the rest in 16 bits
            "config": cfg.to_dict(),
        }
        p.update({t: row[t]["perplexity"] for t in TEXTS if t in row and row[t].get("windows") == 40})
        points.append(p)
    return sorted(points, key=lambda p: p["bits_per_weight"]), fp32, missing


def summary(points: list[dict[str, Any]], fp32: dict[str, Any]) -> list[dict[str, Any]]:
    """The best measured configuration at each budget of LEVELS (as `--recipe best` would pick it)."""
    table = [p for p in points if all(t in p for t in TEXTS)]
    out = []
    for level in LEVELS:
        p = best_point(table, level)
        if p is not None:
            excess = {t: p[t] / fp32[t]["perplexity"] - 1 for t in TEXTS}
            out.append(
                {"budget": level, "name": p["name"], **{k: p[k] for k in ("bits_per_weight", *TEXTS)}, "excess": excess}
            )
    return out


def write(points: list[dict[str, Any]], fp32: dict[str, Any], missing: list[str], seed: int) -> None:
    llama = json.loads(LLAMACPP.read_text())
    fronts = {t: pareto(points, t) for t in TEXTS}
    best = summary(points, fp32)
    suffix = "" if seed == 0 else f"-seed{seed}"
    fp = {t: fp32[t]["perplexity"] for t in TEXTS}
    doc = {
        "setting": {**CALIBRATION, "seed": seed, "eval": "first 40 windows of 512 tokens", "fp32": fp},
        "points": points,
        "front": fronts,
        "best": best,
        "missing": missing,
        "llama.cpp": llama["points"],
    }
    (RESULTS / f"frontier{suffix}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        f"# Quality frontier on R (calibration seed {seed})",
        "",
        f"SmolLM2-135M-Instruct; calibration {CALIBRATION['nsamples']} windows × 512 of wiki:train (seed {seed}); "
        f"perplexity on the first 40 windows of 512 tokens; fp32 {fp['wiki:test']:.2f} / {fp['c4']:.2f}. Bits per "
        "weight of the block linear weights as stored (codes, tables, sparse entries); model MB: the whole model "
        "with everything else in 16 bits. ★ = on the Pareto front of that text.",
        "",
        "## Best measured configuration per budget (ranked by mean log-perplexity over both texts)",
        "",
        "| budget (bits) | configuration | bits/weight | wiki:test | c4 | over fp32 (wiki / c4) |",
        "|---|---|---|---|---|---|",
    ]
    for b in best:
        lines.append(
            f"| ≤ {b['budget']} | {b['name']} | {b['bits_per_weight']:.3f} | {b['wiki:test']:.2f} | {b['c4']:.2f} | "
            f"+{100 * b['excess']['wiki:test']:.0f}% / +{100 * b['excess']['c4']:.0f}% |"
        )
    lines += [
        "",
        "## llama.cpp (reference series, `benchmarks/reference/llamacpp.json`)",
        "",
        "| type | imatrix | bits/weight | wiki:test |",
        "|---|---|---|---|",
    ]
    for q in llama["points"]:
        lines.append(f"| {q['type']} | {'yes' if q['imatrix'] else 'no'} | {q['bits_per_weight']} | {q['wiki:test']} |")
    lines += [
        "",
        "## Every point",
        "",
        "| configuration | bits/weight | model MB | sparse % | wiki:test | c4 | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        cells = [f"{p[t]:.2f}{' ★' if p['name'] in fronts[t] else ''}" if t in p else "" for t in TEXTS]
        lines.append(
            f"| {p['name']} | {p['bits_per_weight']:.3f} | {p['model_mb']:.1f} | {p['sparse_percent']:.2f} | "
            f"{' | '.join(cells)} | {p['source'].split(':')[0]} |"
        )
    if missing:
        lines += ["", f"Grid points not measured yet: {', '.join(missing)}."]
    (RESULTS / f"frontier{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if seed == 0:
        keep = ("name", "base", "bits", "bits_per_weight", "sparse_percent", *TEXTS, "config")
        table = [{k: p[k] for k in keep} for p in points if all(t in p for t in TEXTS)]
        BEST_TABLE.write_text(
            json.dumps({"model": "SmolLM2-135M-Instruct", "setting": doc["setting"], "points": table}, indent=1) + "\n"
        )
    plot(points, fronts, llama["points"], fp, RESULTS / f"frontier{suffix}.png")


def plot(
    points: list[dict[str, Any]],
    fronts: dict[str, list[str]],
    llama: list[dict[str, Any]],
    fp: dict[str, float],
    path: Path,
) -> None:
    from requant.analysis.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {
        "rtn": "tab:gray",
        "awq": "tab:orange",
        "gptq": "tab:green",
        "squeezellm": "tab:blue",
        "qtip": "tab:purple",
    }
    for ax, text in zip(axes, TEXTS, strict=True):
        for base, color in colors.items():
            pts = [p for p in points if p["base"] == base and text in p and p[text] < 4 * fp[text]]
            ax.scatter([p["bits_per_weight"] for p in pts], [p[text] for p in pts], c=color, s=18, label=base)
        front = [p for p in points if p["name"] in fronts[text] and p[text] < 4 * fp[text]]
        ax.plot([p["bits_per_weight"] for p in front], [p[text] for p in front], "k-", lw=1, label="Pareto front")
        if text == "wiki:test":
            lp = sorted((q for q in llama if q["bits_per_weight"] < 8), key=lambda q: q["bits_per_weight"])
            ax.scatter(
                [q["bits_per_weight"] for q in lp], [q[text] for q in lp], marker="x", c="tab:red", label="llama.cpp"
            )
        ax.axhline(fp[text], color="k", ls=":", lw=1, label="fp32")
        ax.set_xlabel("bits per weight (block linears, as stored)")
        ax.set_ylabel(f"{text} perplexity (40 windows)")
        ax.set_yscale("log")
        ax.set_title(f"SmolLM2-135M on {text}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="grid points to run (default: every missing one)")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (0 or 1)")
    ap.add_argument("--report-only", action="store_true", help="write the results from what is measured")
    ap.add_argument(
        "--fresh", action="store_true", help="run the --only points even if another benchmark measured them"
    )
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help="also write each point's checkpoint to DIR/NAME (DIR/seedS/NAME at seed S > 0)",
    )
    ap.add_argument(
        "--runs",
        default="frontier-runs",
        help="result file of this run's points (frontier-runs*; two runs at once need two files)",
    )
    args = ap.parse_args()
    _, _, missing = collect(args.seed)
    todo = [n for n in (args.only or missing) if n in missing or args.fresh]
    unknown = [n for n in args.only or () if n not in grid()]
    if unknown:
        raise SystemExit(f"not grid points: {', '.join(unknown)}; see grid() in {__file__}")
    if todo and not args.report_only:
        run = argparse.Namespace(
            limit=40,
            nsamples=CALIBRATION["nsamples"],
            only=None,
            texts=",".join(TEXTS),
            batch_size=args.batch_size,
            tag=args.runs + ("" if args.seed == 0 else f"-seed{args.seed}"),
            # Two seeds run at once must not write the same checkpoint directory.
            save=args.save if args.save is None or args.seed == 0 else str(Path(args.save) / f"seed{args.seed}"),
        )
        variants = {n: replace(grid()[n], seed=args.seed) for n in todo}
        run_variants(variants, run, run.tag, note="Grid points of benchmarks/frontier.py.")
    write(*collect(args.seed), seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
