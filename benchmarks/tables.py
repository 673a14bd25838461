"""Rewrite the Markdown tables of the benchmarks from their JSON: benchmarks/results/*.md, the tables of
docs/results.md and the README's headline table (the prose around them is hand-written and kept).

Usage: python benchmarks/tables.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import ablation
import baselines
import methods
from docblocks import splice
from harness import RESULTS, write_table

from requant.recipes import recipe_settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "docs" / "results.md"
README = ROOT / "README.md"

NOTES = {
    "baselines": "D&S = 0.45% IQR outliers + 0.05% Fisher-sensitive values.",
    "methods": "Uniform grids asymmetric, fp16 scale + zero per group; AWQ adds one fp16 scale per input channel. "
    "ReQuant rows: r_o = 0.25% by Algorithm 1 (9 candidates), r_s = 0; SqueezeLLM ReQuant: 0.45% Algorithm 1 + "
    "0.05% detached by PQI of 2 Gauss nodes, or by the gradient at w̃ (-right1).",
    "methods-qtip": "QTIP: L = 10, K = bits, V = 1, 1MAD code, no fine-tuning; ReQuant rows: r_o = 0, r_s = 0.5% by "
    "PQI (Gauss, 2 nodes) in 2 steps of β = 0.25%.",
}

# The ablation's variants (JSON keys) under the names the docs use, in the docs' order.
RECIPE = "PQI right rule, 1 node (gradient at w̃)"
ABLATION_LABELS = {
    "fp32": "fp32",
    "bf16": "bf16",
    "dense-only": "dense-only",
    "random (same budget)": "random 0.45% + 0.05%",
    "Algorithm 2 only": "Algorithm 2 only (0.05% PQI)",
    "SqueezeLLM IQR outliers": "SqueezeLLM IQR outliers (0.45%)",
    "Algorithm 1 only": "Algorithm 1 only (0.45%)",
    "SqueezeLLM D&S (IQR + Fisher)": "SqueezeLLM D&S (0.45% IQR + 0.05% Fisher)",
    "full ReQuant (β=0.025)": "ReQuant, the paper's reading (0.45% Alg. 1 + 0.05% by PQI of 2 Gauss nodes, β = 0.025)",
    RECIPE: "**ReQuant, the recipe: detach ranked by Δw ⊙ ∇F(w̃) (`--pqi-rule right --pqi-nodes 1`)**",
    "right rule, 1 node, β = 0.0125 (4 steps)": "ReQuant, the recipe with β = 0.0125 (4 steps)",
    "right rule, 1 node, calibration seed 1": "ReQuant, the recipe, calibration seed 1",
    "β = 0.05 (1 step)": "ReQuant, β = 0.05 (1 step)",
    "β = 0.0125 (4 steps)": "ReQuant, β = 0.0125 (4 steps)",
    "Alg. 1 objective PQI": "ReQuant, Algorithm 1 objective `pqi` (`--alg1-objective pqi`)",
    "Alg. 1 criterion PQI (pre)": "ReQuant, Algorithm 1 criterion `pqi_pre` (`--alg1-criterion pqi_pre`)",
    "Alg. 1 per block": "ReQuant, Algorithm 1 per block (`--alg1-granularity block`)",
    "detach ranking positive": "ReQuant, detach ranking `positive` (`--detach-ranking positive`)",
    "gradients in bf16": "ReQuant, gradient passes in bf16 (`--grad-dtype bf16`)",
    "PQI 6 Gauss nodes": "ReQuant, PQI with 6 Gauss nodes instead of 2",
    "Alg. 1 max factor 8": "ReQuant, Algorithm 1 candidates up to 8 r_o instead of 4 r_o",
    "r_o 0.30% + r_s 0.20% (β=0.05)": "ReQuant, 0.30% Alg. 1 + 0.20% PQI (β = 0.05): not the paper's split",
    "full ReQuant, calibration seed 1": "ReQuant, calibration seed 1 (another 32 windows)",
    "SqueezeLLM D&S, calibration seed 1": "SqueezeLLM D&S, calibration seed 1",
}

_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def load(tag: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{tag}.json").read_text())


def ppl(x: float) -> str:
    """Perplexity as the docs print it: 2 decimals, whole numbers from 1,000, a·10ⁿ from 100,000."""
    if x >= 1e5:
        exp = len(str(int(x))) - 1
        return f"{x / 10**exp:.1f}·10{str(exp).translate(_SUPERSCRIPT)}"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def bits(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.3f}"


def p1(model: float, dns: float, fp: float) -> float:
    """Share of D&S's excess perplexity over fp32 that remains: (model − fp32) / (D&S − fp32)."""
    return (model - fp) / (dns - fp)


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def ablation_table(bits_: int) -> str:
    res = load(f"ablation-{bits_}bit")
    texts = ["wiki:train", "wiki:test"]
    rows = []
    for key, label in ABLATION_LABELS.items():
        if key not in res:
            continue
        r = res[key]
        cells = [ppl(r[t]["perplexity"]) for t in texts]
        if key == RECIPE:
            cells = [f"**{c}**" for c in cells]
        rows.append([label, bits(r["bits_per_weight"]), *cells])
    return table(["variant", "bits/weight", "wiki:train ppl", "wiki:test ppl"], rows)


def headline_table() -> str:
    """fp32 vs D&S vs ReQuant at 3 bits: 40 windows of each text (methods.json) and the whole texts."""
    m, full = load("methods"), load("fulltext")

    def whole(key: str, text: str) -> str:
        return ppl(next(r["perplexity"] for r in full[key]["results"] if r["data"] == text))

    rows = []
    for label, mkey, fkey in [
        ("fp32", "fp32", "fp32"),
        ("SqueezeLLM Dense-and-Sparse (0.45% IQR + 0.05% Fisher)", "squeezellm-3bit-D&S", "squeezellm-3bit-D&S"),
        ("ReQuant, the paper's reading (PQI of 2 Gauss nodes)", "squeezellm-3bit-ReQuant", "squeezellm-3bit-ReQuant"),
        (
            "**ReQuant, `--recipe requant`** (detach by the gradient at w̃)",
            "squeezellm-3bit-ReQuant-right1",
            "squeezellm-3bit-ReQuant-right1",
        ),
    ]:
        r = m[mkey]
        rows.append(
            [
                label,
                bits(r["bits_per_weight"]),
                ppl(r["wiki:test"]["perplexity"]),
                ppl(r["c4"]["perplexity"]),
                whole(fkey, "wiki:test"),
                whole(fkey, "c4"),
            ]
        )
    return table(
        ["SmolLM2-135M, 3-bit", "bits/weight", "wiki:test (40 win.)", "c4 (40 win.)", "wiki:test (all)", "c4 (all)"],
        rows,
    )


def p1_table() -> str:
    m = load("methods")
    fp = m["fp32"]
    rows = []
    for b in (4, 3, 2):
        dns, paper, right = (
            m[f"squeezellm-{b}bit-D&S"],
            m[f"squeezellm-{b}bit-ReQuant"],
            m[f"squeezellm-{b}bit-ReQuant-right1"],
        )
        recipe_right = recipe_settings("requant", "squeezellm", b)["pqi_rule"] == "right"
        row = [f"{b}-bit", bits(dns["bits_per_weight"])]
        for t in ("wiki:test", "c4"):
            f, d = fp[t]["perplexity"], dns[t]["perplexity"]
            pa, ri = paper[t]["perplexity"], right[t]["perplexity"]
            vals = [ppl(pa), ppl(ri)]
            p1s = [f"{p1(pa, d, f):.2f}", f"{p1(ri, d, f):.2f}"]
            k = 1 if recipe_right else 0
            vals[k], p1s[k] = f"**{vals[k]}**", f"**{p1s[k]}**"
            row += [f"{ppl(d)} → {vals[0]} / {vals[1]}", f"{p1s[0]} / {p1s[1]}"]
        rows.append(row)
    return table(
        [
            "width",
            "bits/weight",
            "wiki:test D&S → paper's reading / gradient at w̃",
            "P1",
            "c4 D&S → paper's reading / gradient at w̃",
            "P1",
        ],
        rows,
    )


def fulltext_table() -> str:
    full = load("fulltext")

    def get(key: str, text: str) -> float:
        return next(r["perplexity"] for r in full[key]["results"] if r["data"] == text)

    texts = ("wiki:test", "c4")
    fp = {t: get("fp32", t) for t in texts}
    points = [
        ("ReQuant, the paper's reading (PQI of 2 Gauss nodes)", "squeezellm-3bit-ReQuant"),
        ("ReQuant, the recipe (detach by the gradient at w̃)", "squeezellm-3bit-ReQuant-right1"),
        (
            "feedback + IQR outliers + ReQuant's detach (`squeezellm-fb-3bit-IQR+detach`)",
            "squeezellm-fb-3bit-IQR+detach",
        ),
        (
            "4-bit codes on the layers that gain most (0.12 bits) + ReQuant at 0.25% "
            "(`squeezellm-3bit-widen-half+ReQuant-0.25%`)",
            "squeezellm-3bit-widen-half+ReQuant-0.25%",
        ),
        (
            "the same widths, feedback + IQR outliers + ReQuant's detach at 0.25% "
            "(`squeezellm-fb-3bit-widen-half+IQR+detach-0.25%`)",
            "squeezellm-fb-3bit-widen-half+IQR+detach-0.25%",
        ),
    ]
    rows = [["fp32", *(ppl(fp[t]) for t in texts)]]
    # Calibration seed 0, then seed 1 (rows keyed "NAME seed1"), each P1 against D&S at the same seed.
    for suffix, seed_label in (("", ""), (" seed1", ", calibration seed 1")):
        if f"squeezellm-3bit-D&S{suffix}" not in full:
            continue
        dns = {t: get(f"squeezellm-3bit-D&S{suffix}", t) for t in texts}
        rows.append([f"SqueezeLLM D&S{seed_label}", *(ppl(dns[t]) for t in texts)])
        for label, key in points:
            if key + suffix not in full:
                continue
            v = {t: get(key + suffix, t) for t in texts}
            rows.append([label + seed_label, *(ppl(v[t]) for t in texts)])
            rows.append(["P1", *(f"{p1(v[t], dns[t], fp[t]):.3f}" for t in texts)])
    # Below 3.3 bits (QTIP's trellis, no D&S to measure P1 against): the excess over fp32.
    key = "qtip-L12-3bit-widen+ReQuant-right1-0.3%"
    if key in full:
        label = f"QTIP L = 12, 4-bit codes on 0.15 bits + ReQuant's detach at 0.3%, 3.297 bits (`{key}`)"
        rows.append([label, *(f"{ppl(get(key, t))} (+{get(key, t) / fp[t] - 1:.1%})" for t in texts)])
    some = full["fp32"]["results"]
    head = ["model", *(f"{r['data']} ({r['windows']} windows, {r['tokens']:,} tokens)" for r in some)]
    return table(head, rows)


def _row(res: dict[str, Any], key: str, label: str, time: bool) -> list[str]:
    r = res[key]
    t = f"{r['quantize_s']:,.0f} s" if time and r.get("quantize_s") else ""
    return [label, bits(r["bits_per_weight"]), ppl(r["wiki:test"]["perplexity"]), ppl(r["c4"]["perplexity"]), t]


def qtip_table() -> str:
    q, m, b = load("methods-qtip"), load("methods"), load("baselines")
    spec = [
        (q, "qtip-2bit", "QTIP 2-bit", True),
        (q, "qtip-2bit+ReQuant", "QTIP 2-bit + ReQuant", True),
        (m, "squeezellm-2bit-D&S", "SqueezeLLM 2-bit D&S", True),
        (m, "squeezellm-2bit-ReQuant", "SqueezeLLM 2-bit ReQuant", True),
        (b, "squeezellm-2bit-dense", "SqueezeLLM 2-bit dense", False),
        (b, "rtn-2bit-row", "RTN 2-bit per row", False),
        (q, "qtip-3bit", "QTIP 3-bit", True),
        (q, "qtip-3bit+ReQuant", "QTIP 3-bit + ReQuant", True),
        (m, "squeezellm-3bit-ReQuant", "SqueezeLLM 3-bit ReQuant", True),
        (m, "rtn-3bit-g64", "RTN 3-bit g64", False),
    ]
    rows = [_row(res, k, label, t) for res, k, label, t in spec if k in res]
    return table(["variant", "bits/weight", "wiki:test", "c4", "quantize (1 thread, shared CPU)"], rows)


def _pair(r: dict[str, Any] | None) -> str:
    return f"{ppl(r['wiki:test']['perplexity'])} / {ppl(r['c4']['perplexity'])}" if r else ""


def bases_table() -> str:
    m, b = load("methods"), load("baselines")
    every = {**b, **m}
    cols = [(4, "g64"), (4, "row"), (3, "g64"), (3, "row")]
    rows = []
    for label, name in [("RTN", "rtn"), ("AWQ", "awq"), ("GPTQ", "gptq"), ("GPTQ, per-row LUT", "gptq-lut")]:
        rows.append([label, *(_pair(every.get(f"{name}-{w}bit-{g}")) for w, g in cols)])
    sq = {(4, "row"): every.get("squeezellm-4bit-dense"), (3, "row"): every.get("squeezellm-3bit-row")}
    rows.append(["SqueezeLLM (per-row LUT)", *(_pair(sq.get(c)) for c in cols)])
    return table(["method", *(f"{w}-bit {'per row' if g == 'row' else g}" for w, g in cols)], rows)


def outliers_table() -> str:
    m = load("methods")
    cols = ["g64", "g96", "g96+ReQuant", "row", "row+IQR", "row+ReQuant"]
    head = [
        "method",
        "g64",
        "g96 alone",
        "g96 + 0.25% outliers",
        "per row",
        "+ 0.25% IQR outliers",
        "+ 0.25% Alg. 1 outliers",
    ]
    bit_row = ["bits (RTN, GPTQ; AWQ +0.02)"]
    for c in cols:
        got = [bits(m[k]["bits_per_weight"]) for k in (f"rtn-3bit-{c}", f"rtn-4bit-{c}") if k in m]
        bit_row.append(" / ".join(got))
    rows = [bit_row]
    for w in (3, 4):
        for label, name in [("RTN", "rtn"), ("AWQ", "awq"), ("GPTQ", "gptq")]:
            rows.append([f"{label} {w}-bit", *(_pair(m.get(f"{name}-{w}bit-{c}")) for c in cols)])
    return table(head, rows)


def pqi_accuracy_table() -> str:
    s = load("sensitivity")
    runs = {b: s[f"nodes:{b}bit"] for b in (4, 3) if f"nodes:{b}bit" in s}
    keys = [(r["rule"], r["nodes"]) for r in next(iter(runs.values()))["rows"]]
    head = ["rule, nodes (= gradient passes per window)"]
    head += [f"{b}-bit: error vs actual ΔF = {run['summary']['actual']:.4f}" for b, run in runs.items()]
    rows = []
    for rule, n in keys:
        cells = []
        for run in runs.values():
            r = next((x for x in run["rows"] if (x["rule"], x["nodes"]) == (rule, n)), None)
            cells.append(f"{100 * r['rel_error']:+.3g}%" if r else "")
        rows.append([f"{'Gauss–Legendre' if rule == 'gauss' else rule} {n}", *cells])
    return table(head, rows)


def detach_rankings_table() -> str:
    d = load("detach-rankings-3bit")
    rows = [[k.replace("|", "\\|"), ppl(v)] for k, v in d["rows"].items()]
    return table([f"key (one step restoring {d['entries_restored']:,} entries, 0.05%)", "wiki:test ppl"], rows)


def speed_table() -> str:
    s = load("speed")
    rows = []
    for name, v in s["variants"].items():
        mib = f"{v['quantized_bytes'] / 2**20:.1f}" if "quantized_bytes" in v else ""
        rows.append(
            [
                name,
                bits(v.get("bits_per_weight", 32)),
                mib,
                f"{v['prefill_tok_s']:.0f}",
                f"{v['decode_tok_s']:.1f}",
                f"{v['decode_speedup']:.2f}×",
            ]
        )
    return table(
        ["variant", "bits/weight", "quantized layers MiB", "prefill tok/s", "decode tok/s", "decode × fp32"], rows
    )


def frontier_table() -> str:
    """The best measured configuration per bits budget (benchmarks/frontier.py), next to llama.cpp's best."""
    res = load("frontier")
    fp = res["setting"]["fp32"]
    llama = [q for q in res["llama.cpp"] if q["type"] != "F32"]
    rows = []
    for b in res["best"]:
        ref = [q for q in llama if q["bits_per_weight"] <= b["budget"]]
        lc = min(ref, key=lambda q: q["wiki:test"], default=None)
        rows.append(
            [
                f"≤ {b['budget']}",
                f"`{b['name']}`",
                bits(b["bits_per_weight"]),
                f"{ppl(b['wiki:test'])} (+{100 * (b['wiki:test'] / fp['wiki:test'] - 1):.0f}%)",
                f"{ppl(b['c4'])} (+{100 * (b['c4'] / fp['c4'] - 1):.0f}%)",
                f"{ppl(lc['wiki:test'])} ({lc['type']}, {lc['bits_per_weight']} bits)" if lc else "no point",
            ]
        )
    head = [
        "bits budget",
        "best measured configuration",
        "bits/weight",
        "wiki:test",
        "c4",
        "llama.cpp's best, wiki:test",
    ]
    return table(head, rows)


def results_blocks() -> dict[str, str]:
    """The generated tables of docs/results.md, from benchmarks/results/*.json."""
    return {
        "headline": headline_table(),
        "ablation-3bit": ablation_table(3),
        "ablation-4bit": ablation_table(4),
        "p1": p1_table(),
        "fulltext": fulltext_table(),
        "qtip": qtip_table(),
        "bases": bases_table(),
        "outliers": outliers_table(),
        "pqi-accuracy": pqi_accuracy_table(),
        "detach-rankings": detach_rankings_table(),
        "speed": speed_table(),
        "frontier": frontier_table(),
    }


def render_results(text: str) -> str:
    """docs/results.md with its tables brought up to date."""
    return splice(text, results_blocks())


def render_readme(text: str) -> str:
    """README.md with its headline and frontier tables brought up to date."""
    return splice(text, {"headline": headline_table(), "frontier": frontier_table()})


def write_benchmark_tables() -> None:
    """benchmarks/results/<tag>.md of the perplexity benchmarks, from their JSON."""
    for tag, order, texts in [
        ("baselines", list(baselines.VARIANTS), ["wiki:test", "c4"]),
        ("methods", list(methods.variants([2, 3, 4])), ["wiki:test", "c4"]),
        ("methods-qtip", list(methods.qtip_variants([2, 3])), ["wiki:test", "c4"]),
        # bf16: the unquantized model evaluated in bf16 (a row added by hand, no quantization config)
        *[
            (f"ablation-{b}bit", [*ablation.variants(b, 2, "gauss"), "bf16"], ["wiki:train", "wiki:test"])
            for b in (3, 4)
        ],
    ]:
        path = RESULTS / f"{tag}.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        args = argparse.Namespace(nsamples=32, tag=tag)
        b = tag.removeprefix("ablation-").removesuffix("bit")
        note = NOTES.get(tag, f"SqueezeLLM {b}-bit per-row LUT; PQI gauss with 2 nodes unless a row says otherwise.")
        write_table(results, order, texts, args, tag, note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/results.md or README.md is stale")
    args = ap.parse_args()
    stale = []
    for path, render in ((RESULTS_MD, render_results), (README, render_readme)):
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check:
        for p in stale:
            print(f"{p} is stale: run python benchmarks/tables.py", file=sys.stderr)
        return 1 if stale else 0
    write_benchmark_tables()
    return 0


if __name__ == "__main__":
    sys.exit(main())
