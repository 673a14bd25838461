"""`requant bench`: prefill and decode tokens/s of a checkpoint against the fp32 model it came from.

Both models are loaded in one process and measured alternately at batch 1; figures are medians.
The measurement runs with OpenMP's passive wait policy (a fresh process when the environment does not
already say so): on a shared, oversubscribed machine OpenMP's default spin-waiting stalls multi-threaded
torch ops of both models by up to an order of magnitude (measured on R: 128-token fp32 prefill 12.1 s
with the default policy, 0.85 s passive), which would make any ratio meaningless.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import add_decoder_flags, add_lm_head_flag, add_verify_flag, emit


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="prefill/decode speed of a checkpoint vs its fp32 source model")
    p.add_argument("checkpoint", help="requant checkpoint directory")
    p.add_argument("--baseline", default=None, help="fp32 model to compare with (default: the source model)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default: 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run (default: 32)")
    p.add_argument("--repeats", type=int, default=5, help="runs per model, alternating (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--omp-wait-policy",
        choices=("passive", "inherit"),
        default="passive",
        help="passive (default): measure in a process with OMP_WAIT_POLICY=PASSIVE; inherit: as is",
    )
    add_decoder_flags(
        p,
        "the checkpoint's decode loop: auto (default: fused where the model has the Llama block layout, else "
        "static), fused (one C call per token, requant.fused), static (static KV cache, requant.decode) or the "
        "model's forward with transformers' DynamicCache; the fp32 baseline always runs the latter",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    add_lm_head_flag(p)
    add_verify_flag(p)
    return p


def _rerun_passive(args: argparse.Namespace) -> int:
    """Run this same bench in a child process whose OpenMP runtime starts with the passive wait policy."""
    argv = [sys.executable, "-m", "requant", "bench", str(args.checkpoint), "--omp-wait-policy", "inherit"]
    for flag, value in (
        ("--baseline", args.baseline),
        ("--prompt-tokens", args.prompt_tokens),
        ("--new-tokens", args.new_tokens),
        ("--repeats", args.repeats),
        ("--threads", args.threads),
        ("--decoder", args.decoder),
        ("--compile", args.compile),
        ("--lm-head", args.lm_head),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.json:
        argv.append("--json")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
    sys.stdout.write(proc.stdout)
    return proc.returncode


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import load
    from ..format import is_checkpoint, kernels
    from ..format.checkpoint import read_meta
    from ..format.speed import measure, random_prompt
    from ..progress import bar

    for what, v in (("--prompt-tokens", args.prompt_tokens), ("--new-tokens", args.new_tokens)):
        if v < 1:
            raise ConfigError(f"{what} {v} must be at least 1")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats} must be at least 1")
    if not is_checkpoint(args.checkpoint):
        raise ConfigError(f"{args.checkpoint!r} is not a requant checkpoint (no requant.json)")
    if args.omp_wait_policy == "passive" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        return _rerun_passive(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    baseline = args.baseline or read_meta(args.checkpoint).get("metadata", {}).get("model")
    if baseline is None:
        raise ConfigError("the checkpoint does not record its source model; pass --baseline MODEL")
    quant, _ = load(args.checkpoint, verify=args.verify, lm_head=args.lm_head)
    fp32, _ = load(baseline, dtype="fp32")
    vocab = quant.get_input_embeddings().num_embeddings
    prompt = random_prompt(vocab, args.prompt_tokens)
    runner = quant
    if args.decoder != "transformers":
        from ..decode import static_timer

        runner = static_timer(quant, args.prompt_tokens + args.new_tokens, compile=args.compile, decoder=args.decoder)
    with bar(total=args.repeats, desc="bench", unit="round") as pbar:
        res = measure(
            {"fp32": fp32, "quantized": runner}, prompt, args.new_tokens, args.repeats, progress=lambda _: pbar.update()
        )
    q, f = res["quantized"], res["fp32"]
    obj = {
        "checkpoint": str(Path(args.checkpoint)),
        "baseline": str(baseline),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "kernels": kernels.status(),
        "decoder": args.decoder,
        "decoder_used": getattr(getattr(runner, "decoder", None), "kind", "transformers"),
        "compiled": bool(getattr(getattr(runner, "decoder", None), "compiled", False)),
        "lm_head": args.lm_head,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1min": os.getloadavg()[0],
        "prefill_speedup": q.prefill / f.prefill,
        "decode_speedup": q.decode / f.decode,
        "quantized": q.to_dict(),
        "fp32": f.to_dict(),
    }
    text = "\n".join(
        [
            f"batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
            f"{torch.get_num_threads()} threads, median of {args.repeats} alternating runs; kernels: {obj['kernels']}; "
            f"checkpoint: {obj['decoder_used']} decoder{' (compiled)' if obj['compiled'] else ''}"
            f"{' (--decoder auto)' if args.decoder == 'auto' else ''}, lm_head {args.lm_head}; "
            "fp32: the model's forward + DynamicCache",
            "| model | prefill tok/s | decode tok/s |",
            "|---|---|---|",
            f"| fp32 | {f.prefill:.1f} | {f.decode:.2f} |",
            f"| checkpoint | {q.prefill:.1f} | {q.decode:.2f} |",
            f"| speedup | {obj['prefill_speedup']:.2f}× | {obj['decode_speedup']:.2f}× |",
        ]
    )
    emit(args, obj, text)
    return 0
