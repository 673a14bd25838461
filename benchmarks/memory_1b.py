"""ReQuant of a 1B-class model on this machine: peak memory, wall time and passes, next to the --dry-run estimate.

The model is Llama-3.2-1B's architecture (hidden 2048, 16 blocks, ffn 8192, 32 heads / 8 KV heads, vocab 128256,
tied embeddings), randomly initialised offline from its config (no download); the tokenizer is the embedded
SmolLM2's (its ids are < 128256). Random weights make the quality meaningless; the memory and time are real.

    python benchmarks/memory_1b.py                      # the whole model (estimate first: --dry-run-only)
    python benchmarks/memory_1b.py --blocks 2 --offload  # fewer blocks of the same widths

Writes benchmarks/results/memory-1b[-<blocks>b][-offload].json and .md. Every quantization runs in a child
process (`requant quantize --json`, OMP_NUM_THREADS=1 unless set), whose own peak figures are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

LLAMA_32_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
}


def build(folder: Path, blocks: int, seed: int) -> None:
    """Save a random-init Llama-3.2-1B-shaped model (fp32 safetensors) with the embedded tokenizer to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from requant.loading import default_model_dir

    if (folder / "config.json").is_file():
        return
    config = AutoConfig.for_model("llama", **{**LLAMA_32_1B, "num_hidden_layers": blocks})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tmp)
    tmp.rename(folder)


def quantize(model: Path, out: Path, args: argparse.Namespace, *, dry_run: bool) -> dict:
    cmd = [sys.executable, "-m", "requant", "quantize", str(model), "-o", str(out), "--force", "--json"]
    cmd += ["--base", "squeezellm", "--bits", "3", "--recipe", "requant", "--nsamples", str(args.nsamples)]
    if args.alg1_steps is not None:
        cmd += ["--alg1-steps", str(args.alg1_steps)]
    if args.offload:
        cmd += ["--offload", str(out.with_suffix(".offload"))]
    if dry_run:
        cmd.append("--dry-run")
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = out.with_suffix(".log")  # the child's progress, to follow a long run with `tail -f`
    t = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"requant quantize failed ({proc.returncode}): {log.read_text()[-2000:]}")
    res = json.loads(proc.stdout)
    res["child_wall_s"] = time.perf_counter() - t
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=16, help="decoder blocks (16: the whole 1B config)")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--offload", action="store_true", help="run with --offload (memory-mapped weights)")
    ap.add_argument(
        "--alg1-steps",
        type=int,
        default=None,
        help="Algorithm 1's candidate grid (default: the recipe's 8, i.e. 33 fits per layer; 2 gives 9, ~4x less "
        "time in that stage and the same memory)",
    )
    ap.add_argument("--dry-run-only", action="store_true", help="print and store the estimate only")
    ap.add_argument("--work", type=Path, default=Path("/tmp/requant-memory-1b"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = args.work / f"llama-1b-{args.blocks}blocks"
    args.work.mkdir(parents=True, exist_ok=True)
    build(model, args.blocks, args.seed)
    out = args.work / f"out-{args.blocks}blocks{'-offload' if args.offload else ''}"
    est = quantize(model, out, args, dry_run=True)
    row: dict = {
        "model": f"Llama-3.2-1B config, {args.blocks} of 16 blocks, random init (seed {args.seed})",
        "command": f"requant quantize MODEL -o OUT --base squeezellm --bits 3 --recipe requant "
        f"--nsamples {args.nsamples}"
        + (f" --alg1-steps {args.alg1_steps}" if args.alg1_steps is not None else "")
        + (" --offload DIR" if args.offload else ""),
        "omp_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "estimate": est,
    }
    if not args.dry_run_only:
        res = quantize(model, out, args, dry_run=False)
        row.update(
            {
                "peak_memory": res["peak_memory"],
                "wall_s": res["wall_s"],
                "timings": res["report"]["timings"],
                "pqi_passes": res["report"].get("pqi_passes"),
                "bits_per_weight": res["bits_per_weight"],
            }
        )
        shutil.rmtree(out, ignore_errors=True)
    tag = f"memory-1b{'' if args.blocks == 16 else f'-{args.blocks}b'}{'-offload' if args.offload else ''}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(row, indent=1) + "\n")
    mem = est["memory_bytes_per_rank"]
    lines = [
        f"# {row['model']}",
        "",
        f"`{row['command']}`, OMP_NUM_THREADS={row['omp_threads']}",
        "",
        "| | peak RSS | peak anonymous | wall | fwd+bwd passes |",
        "|---|---|---|---|---|",
        f"| --dry-run estimate | | {mem['peak'] / 1e9:.2f} GB | | {est['passes']['fwd_bwd']} |",
    ]
    if "peak_memory" in row:
        pm = row["peak_memory"]
        lines.append(
            f"| measured | {pm['rss_gb']:.2f} GB | {pm['anon_gb']:.2f} GB | {row['wall_s']:.0f} s | "
            f"{est['passes']['fwd_bwd']} |"
        )
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
