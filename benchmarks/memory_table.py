"""The `--dry-run` estimate of `--recipe requant` (SqueezeLLM 3-bit) for Llama 1B / 8B / 70B configs, on the CPU
(with and without --offload) and on one 80 GB GPU: peak memory per process and forward+backward passes.

Models are built on the meta device from their published config values (nothing is downloaded or loaded).
Writes benchmarks/results/memory-table.json and .md (the README's table).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from requant.config import QuantConfig
from requant.cost import estimate_cost, model_info
from requant.recipes import recipe_settings

RESULTS = Path(__file__).resolve().parent / "results"
GPU_BYTES = 80e9

_LLAMA3 = {"num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0}
CONFIGS = {
    "Llama-3.2-1B": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "head_dim": 64, "tie_word_embeddings": True},
    "Llama-3.1-8B": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "tie_word_embeddings": False},
    "Llama-3.1-70B": {**_LLAMA3, "num_attention_heads": 64, "hidden_size": 8192, "intermediate_size": 28672,
                      "num_hidden_layers": 80, "tie_word_embeddings": False},
}  # fmt: skip


def main() -> None:
    rows = []
    for name, values in CONFIGS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **values))
        for seqlen, nsamples in ((512, 128), (2048, 128)):
            config = QuantConfig(
                base="squeezellm",
                bits=3,
                seqlen=seqlen,
                nsamples=nsamples,
                **recipe_settings("requant", "squeezellm", 3),
            )
            info = model_info(model, config)
            for where, kw in (
                ("CPU", {}),
                ("CPU --offload", {"offload": True}),
                ("1 GPU 80 GB", {"device": "cuda"}),
            ):
                c = estimate_cost(config, info, **kw)
                m = c["memory_bytes_per_rank"]
                rows.append(
                    {
                        "model": name,
                        "params": info["params"],
                        "quantized": info["quantized_params"],
                        "seqlen": seqlen,
                        "nsamples": nsamples,
                        "where": where,
                        "peak_gb": m["peak"] / 1e9,
                        "device_gb": m["device_peak"] / 1e9,
                        "file_backed_gb": m["file_backed_weights"] / 1e9,
                        "fits_gpu": m["device_peak"] <= GPU_BYTES if kw.get("device") else None,
                        "fwd_bwd": c["passes"]["fwd_bwd"],
                        "tflop": c["flops"]["total"] / 1e12,
                    }
                )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory-table.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| model (quantized weights) | seqlen | where | host peak (anonymous) | GPU memory | memory-mapped | "
        "fwd+bwd passes | TFLOP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gpu = ""
        if r["fits_gpu"] is not None:
            gpu = f"{r['device_gb']:.0f} GB" + ("" if r["fits_gpu"] else " (does not fit)")
        mapped = f"{r['file_backed_gb']:.0f} GB" if r["file_backed_gb"] else ""
        lines.append(
            f"| {r['model']} ({r['quantized'] / 1e9:.2f} B) | {r['seqlen']} | {r['where']} | {r['peak_gb']:.1f} GB | "
            f"{gpu} | {mapped} | {r['fwd_bwd']} | {r['tflop']:.0f} |"
        )
    (RESULTS / "memory-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
