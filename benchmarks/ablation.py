"""Table 8 analog on the reference setting R: which part of ReQuant helps, with train and test perplexity.

Per-row SqueezeLLM at --bits (3 and 4 in the closing note); r_o = 0.45%, r_s = 0.05% unless a row says otherwise.
Usage: python benchmarks/ablation.py --bits 3 [--limit N] [--texts wiki:train,wiki:test]
"""

from __future__ import annotations

from dataclasses import replace

from harness import parser, run_variants

from requant.config import QuantConfig
from requant.recipes import recipe_settings


def variants(bits: int, nodes: int, rule: str) -> dict[str, QuantConfig | None]:
    full = QuantConfig(
        base="squeezellm",
        bits=bits,
        **{**recipe_settings("requant", "squeezellm", bits), "pqi_nodes": nodes, "pqi_rule": rule},
    )
    # Most telling rows first (P1 needs fp32, full and D&S), so a cut-short run still answers the headline.
    return {
        "fp32": None,
        "full ReQuant (β=0.025)": full,
        "SqueezeLLM D&S (IQR + Fisher)": replace(full, outlier_select="iqr", significant_select="fisher", step=None),
        "dense-only": replace(full, outliers=0.0, significant=0.0, step=None),
        "Algorithm 1 only": replace(full, significant=0.0, step=None),
        "SqueezeLLM IQR outliers": replace(full, outlier_select="iqr", significant=0.0, step=None),
        "random (same budget)": replace(full, outlier_select="random", significant_select="random", step=None),
        "Algorithm 2 only": replace(full, outliers=0.0),
        "β = 0.05 (1 step)": replace(full, step=0.05),
        "β = 0.0125 (4 steps)": replace(full, step=0.0125),
        # Not a paper choice: bf16 gradient passes (fp32 accumulators) are ~1.6x faster on this CPU (avx512_bf16).
        "gradients in bf16": replace(full, grad_dtype="bf16"),
        # Reconstructed choices (docs/method.md, "Choices") beyond the reading above (issue 4: "try to beat it").
        "detach ranking positive": replace(full, detach_ranking="positive"),
        "Alg. 1 objective PQI": replace(full, alg1_objective="pqi"),
        "Alg. 1 criterion PQI (pre)": replace(full, alg1_criterion="pqi_pre"),
        "Alg. 1 per block": replace(full, alg1_granularity="block"),
        "detach per module": replace(full, detach_scope="module"),
        "PQI 6 Gauss nodes": replace(full, pqi_nodes=6),
        # The detach ranks what restoring an entry gains from the current point: the gradient at w̃ alone
        # (the right rule with one node; half the passes of Gauss-2).
        "PQI right rule, 1 node (gradient at w̃)": replace(full, pqi_nodes=1, pqi_rule="right"),
        "right rule, 1 node, β = 0.0125 (4 steps)": replace(full, pqi_nodes=1, pqi_rule="right", step=0.0125),
        "right rule, 1 node, calibration seed 1": replace(full, pqi_nodes=1, pqi_rule="right", seed=1),
        # Our own grid bound, not the paper's: at 4x many v_proj layers sit at the cap.
        "Alg. 1 max factor 8": replace(full, alg1_max_factor=8.0),
        # Beyond the paper: the same 0.5% sparse budget, more of it detached by PQI (β doubled to keep 4 steps).
        "r_o 0.30% + r_s 0.20% (β=0.05)": replace(full, outliers=0.30, significant=0.20, step=0.05),
        # How much P1 moves with the calibration draw alone (another 32 windows of wiki:train).
        "full ReQuant, calibration seed 1": replace(full, seed=1),
        "SqueezeLLM D&S, calibration seed 1": replace(
            full, outlier_select="iqr", significant_select="fisher", step=None, seed=1
        ),
    }


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--pqi-nodes", type=int, default=2)
    p.add_argument("--pqi-rule", default="gauss")
    p.set_defaults(texts="wiki:train,wiki:test")
    args = p.parse_args()
    run_variants(
        variants(args.bits, args.pqi_nodes, args.pqi_rule),
        args,
        f"ablation-{args.bits}bit",
        f"SqueezeLLM {args.bits}-bit per-row LUT; "
        f"PQI {args.pqi_rule} with {args.pqi_nodes} nodes unless a row says otherwise.",
    )
