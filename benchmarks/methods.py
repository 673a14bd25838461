"""Issue-6 base methods on setting R: RTN, AWQ, GPTQ and SqueezeLLM at 3 and 4 bits, each with ReQuant at equal bits.

Grids: uniform asymmetric with fp16 scale + zero per group of 64 inputs ("g64") or per output row ("row");
SqueezeLLM and GPTQ-LUT use a per-row LUT of 2^bits fp16 values. AWQ also stores one fp16 scale per input.

ReQuant at equal bits (the paper's AWQ g128 vs AWQ g256 + 0.25% outliers):
  * uniform g64 vs g96 + 0.25% Algorithm-1 outliers (r_s = 0): 32/64 = 0.5 vs 32/96 + 0.0025·48 = 0.453 bits;
  * uniform per row: + 0.25% outliers by SqueezeLLM's IQR rule vs + 0.25% by Algorithm 1 (same bits);
  * SqueezeLLM: its D&S (0.45% IQR + 0.05% Fisher) vs ReQuant (0.45% Algorithm 1 + 0.05% detached in 2 steps,
    ranked by PQI of 2 Gauss nodes as in the paper, and by the gradient at w̃: "-right1"; the recipe takes
    the latter at 3 and 4 bits, the former at 2).
Algorithm 1 scores AWQ/GPTQ candidates by the layer output error tr(ΔW H ΔWᵀ) with the fp model's inputs.
Its candidate grid is {0, ½, 1, ..., 4} × r_o here (alg1_steps = 2, 9 fits per layer; the CLI default is 33):
every candidate of AWQ re-runs its 20-point scale search, so 33 would take hours on 2 CPU cores.

Usage: OMP_NUM_THREADS=1 python benchmarks/methods.py [--limit N] [--only NAME ...] [--bits 3 4]
       OMP_NUM_THREADS=1 python benchmarks/methods.py --qtip --bits 2 3 [--limit N]   (issue 8 rows)
"""

from __future__ import annotations

from dataclasses import replace

from harness import parser, run_variants

from requant.config import QuantConfig
from requant.recipes import recipe_settings

UNIFORM = ("rtn", "awq", "gptq")
OUTLIERS = dict(outliers=0.25, outlier_select="adaptive", significant=0.0, alg1_steps=2)


def variants(bits_list: list[int]) -> dict[str, QuantConfig | None]:
    """Baselines first (cheap), then the ReQuant rows, per bit width."""
    out: dict[str, QuantConfig | None] = {"fp32": None}
    for bits in bits_list:
        for m in UNIFORM:
            out[f"{m}-{bits}bit-g64"] = QuantConfig(base=m, bits=bits, group_size=64)
        for m in UNIFORM:
            out[f"{m}-{bits}bit-row"] = QuantConfig(base=m, bits=bits)
        out[f"gptq-lut-{bits}bit-row"] = QuantConfig(base="gptq", bits=bits, base_options={"grid": "lut"})
        out[f"squeezellm-{bits}bit-row"] = QuantConfig(base="squeezellm", bits=bits)
    for bits in bits_list:
        for m in UNIFORM:
            # g96 alone separates the two effects of "+ReQuant" at g96: coarser groups, and the outliers.
            out[f"{m}-{bits}bit-g96"] = QuantConfig(base=m, bits=bits, group_size=96)
            out[f"{m}-{bits}bit-g96+ReQuant"] = QuantConfig(base=m, bits=bits, group_size=96, **OUTLIERS)
    for bits in bits_list:
        for m in UNIFORM:
            requant = QuantConfig(base=m, bits=bits, **OUTLIERS)
            out[f"{m}-{bits}bit-row+IQR"] = replace(requant, outlier_select="iqr")
            out[f"{m}-{bits}bit-row+ReQuant"] = requant
        sq = QuantConfig(base="squeezellm", bits=bits, **recipe_settings("requant", "squeezellm", bits))
        out[f"squeezellm-{bits}bit-D&S"] = replace(sq, outlier_select="iqr", significant_select="fisher", step=None)
        # The paper's reading (PQI of 2 Gauss nodes), then the recipe (the gradient at w̃: right rule, 1 node).
        out[f"squeezellm-{bits}bit-ReQuant"] = replace(sq, pqi_rule="gauss", pqi_nodes=2)
        out[f"squeezellm-{bits}bit-ReQuant-right1"] = replace(sq, pqi_rule="right", pqi_nodes=1)
    return out


def qtip_variants(bits_list: list[int]) -> dict[str, QuantConfig | None]:
    """Issue 8: QTIP and QTIP + ReQuant (r_o 0, r_s 0.5%, β 0.25%; docs/method.md) at the paper's low widths."""
    out: dict[str, QuantConfig | None] = {}
    for bits in bits_list:
        out[f"qtip-{bits}bit"] = QuantConfig(base="qtip", bits=bits)
        out[f"qtip-{bits}bit+ReQuant"] = QuantConfig(base="qtip", bits=bits, **recipe_settings("requant", "qtip"))
    return out


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--qtip", action="store_true", help="the QTIP rows instead (result tag methods-qtip)")
    args = p.parse_args()
    run_variants(
        qtip_variants(args.bits) if args.qtip else variants(args.bits),
        args,
        "methods-qtip" if args.qtip else "methods",
        "QTIP: L = 10, K = bits, V = 1, 1MAD code, no fine-tuning; ReQuant rows: r_o = 0, r_s = 0.5% by PQI "
        "(Gauss, 2 nodes) in 2 steps of β = 0.25%."
        if args.qtip
        else "Uniform grids asymmetric, fp16 scale + zero per group; AWQ adds one fp16 scale per input channel. "
        "ReQuant rows: r_o = 0.25% by Algorithm 1 (9 candidates), r_s = 0; SqueezeLLM ReQuant: 0.45% Algorithm 1 "
        "+ 0.05% detached by PQI of 2 Gauss nodes, or by the gradient at w̃ (-right1).",
    )
