"""Rewrite the Markdown tables of the perplexity benchmarks from their JSON (e.g. after a run was cut short).

Usage: python benchmarks/tables.py
"""

from __future__ import annotations

import argparse
import json

import ablation
import baselines
import methods
from harness import RESULTS, write_table

NOTES = {
    "baselines": "D&S = 0.45% IQR outliers + 0.05% Fisher-sensitive values.",
    "methods": "Uniform grids asymmetric, fp16 scale + zero per group; AWQ adds one fp16 scale per input channel. "
    "ReQuant rows: r_o = 0.25% by Algorithm 1 (9 candidates), r_s = 0; SqueezeLLM rows use its recipe.",
    "methods-qtip": "QTIP: L = 10, K = bits, V = 1, 1MAD code, no fine-tuning; ReQuant rows: r_o = 0, r_s = 0.5% by "
    "PQI (Gauss, 2 nodes) in 2 steps of β = 0.25%.",
}


def main() -> None:
    for tag, order, texts in [
        ("baselines", list(baselines.VARIANTS), ["wiki:test", "c4"]),
        ("methods", list(methods.variants([2, 3, 4])), ["wiki:test", "c4"]),
        ("methods-qtip", list(methods.qtip_variants([2, 3])), ["wiki:test", "c4"]),
        # bf16: the unquantized model evaluated in bf16 (a row added by hand, no quantization config)
        *[
            (f"ablation-{b}bit", ["bf16", *ablation.variants(b, 2, "gauss")], ["wiki:train", "wiki:test"])
            for b in (3, 4)
        ],
    ]:
        path = RESULTS / f"{tag}.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        args = argparse.Namespace(nsamples=32, tag=tag)
        bits = tag.removeprefix("ablation-").removesuffix("bit")
        note = NOTES.get(tag, f"SqueezeLLM {bits}-bit per-row LUT; PQI gauss with 2 nodes.")
        write_table(results, order, texts, args, tag, note)


if __name__ == "__main__":
    main()
