"""Table 9 analog on the reference setting R: batch-1 prefill and decode speed of packed checkpoints vs fp32.

Variants: fp32, RTN (per row), SqueezeLLM dense-only and SqueezeLLM D&S (0.45% IQR outliers + 0.05% Fisher
values), at 3 and 4 bits. Checkpoints are made with the CLI (`requant quantize ...`), cached, and then all
models are loaded into one process and measured side by side: each repeat runs every model once in rotating
order; figures are medians. Peak memory (max RSS) of loading + generating is measured in a fresh process
per variant.

Usage: python benchmarks/speed.py [--nsamples 2] [--prompt-tokens 128] [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS: dict[str, list[str] | None] = {
    "fp32": None,
    "rtn-3bit": ["--base", "rtn", "--bits", "3"],
    "squeezellm-3bit-dense": ["--base", "squeezellm", "--bits", "3"],
    "squeezellm-3bit-D&S": ["--base", "squeezellm", "--bits", "3", "--outliers", "0.45", "--significant", "0.05"],
    "rtn-4bit": ["--base", "rtn", "--bits", "4"],
    "squeezellm-4bit-dense": ["--base", "squeezellm", "--bits", "4"],
    "squeezellm-4bit-D&S": ["--base", "squeezellm", "--bits", "4", "--outliers", "0.45", "--significant", "0.05"],
}
HEADLINE = "squeezellm-3bit-D&S"

# Peak RSS from VmHWM (requant.memory): getrusage's ru_maxrss survives exec on Linux and would report the parent's.
MEMORY_SCRIPT = """
import json, sys, torch
import requant
from requant.format.speed import random_prompt, time_generation
from requant.memory import peak_rss
def hwm():
    return peak_rss() / 2**20
spec = sys.argv[1]
before = hwm()
model, tok = requant.load(spec)
loaded = hwm()
prompt = random_prompt(model.get_input_embeddings().num_embeddings, int(sys.argv[2]))
time_generation(model, prompt, int(sys.argv[3]))
print(json.dumps({"import_mib": before, "loaded_mib": loaded, "peak_mib": hwm()}))
"""


def make_checkpoints(workdir: Path, nsamples: int, names: list[str]) -> dict[str, Path]:
    """Quantize every variant with the CLI (skipped when its checkpoint exists)."""
    out = {}
    for name in names:
        flags = VARIANTS[name]
        if flags is None:
            continue
        target = workdir / name.replace("&", "n")
        if not (target / "requant.json").is_file():
            cmd = ["requant", "quantize", *flags, "--nsamples", str(nsamples), "-o", str(target), "--json"]
            print("+", " ".join(cmd), flush=True)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "requant", *cmd[1:]], check=True, stdout=subprocess.DEVNULL)
            print(f"  {time.perf_counter() - t:.0f} s", flush=True)
        out[name] = target
    return out


def peak_memory(spec: str, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Max RSS (MiB) after importing, after loading `spec` and after prefill + decode, in a fresh process."""
    args = [sys.executable, "-c", MEMORY_SCRIPT, spec, str(prompt_tokens), str(new_tokens)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(args, check=True, capture_output=True, text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=2, help="calibration windows for Fisher (speed does not depend)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="*", default=None, help="variants to include (fp32 always is)")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoint cache (default: <requant cache>/speed)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Before torch loads libgomp: on a shared, oversubscribed machine OpenMP's default spin-waiting makes a
    # 2-thread fp32 forward up to 16× slower (measured: 128-token prefill 12.1 s active vs 0.85 s passive).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    import requant
    from requant.assets import cache_dir
    from requant.cli.inspect import describe
    from requant.format import kernels
    from requant.format.speed import measure, random_prompt
    from requant.loading import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in VARIANTS if n == "fp32" or args.only is None or n in args.only]
    workdir = args.workdir or cache_dir() / "speed"
    ckpts = make_checkpoints(workdir, args.nsamples, names)
    source = resolve_model_path(None)
    models = {"fp32": requant.load(source)[0]}
    for name, path in ckpts.items():
        models[name] = requant.load(path)[0]
    prompt = random_prompt(models["fp32"].get_input_embeddings().num_embeddings, args.prompt_tokens)
    print(f"measuring {len(models)} models × {args.repeats} repeats ({kernels.status()})", flush=True)
    res = measure(
        models, prompt, args.new_tokens, args.repeats, progress=lambda r: print(f"  repeat {r + 1}", flush=True)
    )
    del models

    rows = {}
    base = res["fp32"]
    for name in names:
        r = res[name]
        row = {
            **r.to_dict(),
            "prefill_ms": 1000 * args.prompt_tokens / r.prefill,
            "decode_ms": 1000 * args.new_tokens / r.decode,
            "prefill_speedup": r.prefill / base.prefill,
            "decode_speedup": r.decode / base.decode,
        }
        if name in ckpts:
            d = describe(ckpts[name])
            row.update(
                bits_per_weight=d["bits_per_weight"],
                stored_bits_per_weight=d["stored_bits_per_weight"],
                quantized_bytes=d["quantized_bytes"],
                accounting_bytes=d["accounting_bytes"],
                overhead_percent=d["overhead_percent"],
                sparse_percent=d["sparse_percent"],
            )
        if not args.no_memory:
            spec = str(ckpts[name]) if name in ckpts else source
            row["memory"] = peak_memory(spec, args.prompt_tokens, args.new_tokens)
        rows[name] = row
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if not k.endswith("runs")})

    setting = {
        "model": "SmolLM2-135M-Instruct (R), fp32 activations",
        "batch": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "kernels": kernels.status(),
        "helper_share": kernels.pool_share(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1min": os.getloadavg()[0],
        "calibration_windows": args.nsamples,
        "machine": "shared 2-core CPU; other jobs ran at the same time, so only side-by-side ratios are meaningful",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps({"setting": setting, "variants": rows}, indent=2) + "\n")
    lines = [
        "# Inference speed of packed Dense-and-Sparse checkpoints (Table 9 analog, R)",
        "",
        f"Batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, {setting['threads']} threads,"
        f" median of {args.repeats} side-by-side repeats; kernels: {setting['kernels']};"
        f" OMP_WAIT_POLICY={setting['omp_wait_policy']}; load average {setting['load_average_1min']:.1f}"
        " (shared machine: compare ratios only). Checkpoints from"
        f" `requant quantize` with {args.nsamples} calibration windows (speed does not depend on them).",
        "Prefill/decode columns are ms for the whole prompt / all new tokens, as in the paper's Table 9.",
        "",
        "| variant | bits/weight | prefill ms | decode ms | total ms | prefill × fp32 | decode × fp32 | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        bpw = f"{row['bits_per_weight']:.3f}" if "bits_per_weight" in row else "32"
        mem = f"{row['memory']['peak_mib']:.0f}" if "memory" in row else ""
        lines.append(
            f"| {name} | {bpw} | {row['prefill_ms']:.0f} | {row['decode_ms']:.0f} | "
            f"{row['prefill_ms'] + row['decode_ms']:.0f} | {row['prefill_speedup']:.2f} | "
            f"{row['decode_speedup']:.2f} | {mem} |"
        )
    if HEADLINE in rows:
        h = rows[HEADLINE]
        lines += [
            "",
            f"P5 ({HEADLINE} vs fp32): decode {h['decode_speedup']:.2f}× (goal ≥ 1.5×), prefill "
            f"{h['prefill_speedup']:.2f}× (goal ≥ 0.8×).",
            f"P6: quantized layers stored in {h['quantized_bytes'] / 2**20:.2f} MiB vs "
            f"{h['accounting_bytes'] / 2**20:.2f} MiB by the bit accounting ({h['overhead_percent']:+.2f}%, "
            "CSR row pointers).",
        ]
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
