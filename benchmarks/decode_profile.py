"""Where the milliseconds of one batch-1 decode step go, on the reference setting R: fp32 model vs a 3-bit checkpoint.

For each variant (the fp32 SmolLM2, the 3-bit SqueezeLLM D&S checkpoint with its output projection upcast to fp32 as
before, and the same checkpoint as served now: 16-bit embeddings/lm_head), after a 128-token prompt:
- the step time without instrumentation (median of the steps, transformers' forward + DynamicCache, the static
  decoder of requant.decode, and the fused decoder: one C call per token), the fused step split into its linear
  layers, its output projection (the int8 screen where it has one) and the rest;
- an attribution: forward hooks on every module measure exclusive wall time per category (lm_head, quantized or
  fp32 linear layers, attention core = rotary application + KV-cache update + SDPA, norms, rotary tables, MLP
  activation, block glue); what no module covers is "outside the modules" (the cache object, output objects,
  argmax, Python). Hooks cost a little themselves: the instrumented step is reported beside the plain one;
- the aten ops of the attention core from torch.profiler (KV-cache concatenation vs SDPA);
- bytes of weights read per token and the bandwidth they imply.

Usage: python benchmarks/decode_profile.py [--checkpoint DIR] [--threads 1] [--steps 24]
Writes benchmarks/results/decode_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
DEFAULT_CHECKPOINT = Path(os.environ.get("REQUANT_DNS_CHECKPOINT", Path.home() / ".cache/requant/bench/sq3-dns"))
CATEGORIES = [
    "lm_head",
    "quantized linear layers",
    "fp32 linear layers",
    "attention core (rotary apply, KV cache, SDPA)",
    "norms",
    "rotary tables",
    "MLP activation",
    "embedding",
    "block glue (residuals, masks)",
    "outside the modules (cache, outputs, argmax, Python)",
]


def ensure_checkpoint(path: Path) -> Path:
    """The 3-bit SqueezeLLM D&S checkpoint at demo settings (made once with the CLI when missing)."""
    if (path / "config.json").is_file():
        return path
    import subprocess

    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "requant", "quantize", "-o", str(path), "--base", "squeezellm", "--bits", "3"]
    subprocess.run([*cmd, "--recipe", "dns", "--nsamples", "16", "--json"], check=True, stdout=subprocess.DEVNULL)
    return path


def category(name: str, mod: nn.Module, head: nn.Module, emb: nn.Module) -> str | None:
    from requant.format.qlinear import QuantLinear

    cls = type(mod).__name__
    if mod is head:
        return "lm_head"
    if mod is emb:
        return "embedding"
    if isinstance(mod, QuantLinear):
        return "quantized linear layers"
    if isinstance(mod, nn.Linear):
        return "fp32 linear layers"
    if "Norm" in cls:
        return "norms"
    if "Rotary" in cls:
        return "rotary tables"
    if "Attention" in cls:
        return "attention core (rotary apply, KV cache, SDPA)"
    if "MLP" in cls or "Act" in cls or isinstance(mod, (nn.SiLU, nn.GELU)):
        return "MLP activation"
    if "DecoderLayer" in cls or "Model" in cls:
        return "block glue (residuals, masks)"
    return None


class Attribution:
    """Exclusive wall time per category from pre/post forward hooks (a stack of open modules)."""

    def __init__(self, model: nn.Module) -> None:
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        self.times: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [category, start, time spent in children]
        self.handles = []
        for name, mod in model.named_modules():
            if mod is model:
                continue
            cat = category(name, mod, head, emb)
            if cat is None:
                continue
            self.handles.append(mod.register_forward_pre_hook(self._pre(cat)))
            self.handles.append(mod.register_forward_hook(self._post))

    def _pre(self, cat: str):
        def hook(mod, args):
            self.stack.append([cat, time.perf_counter(), 0.0])

        return hook

    def _post(self, mod, args, out):
        cat, t0, children = self.stack.pop()
        dt = time.perf_counter() - t0
        self.times[cat] += dt - children
        if self.stack:
            self.stack[-1][2] += dt

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def reference_steps(model: nn.Module, prompt: torch.Tensor, steps: int, attribution: Attribution | None = None):
    """Per-step seconds of transformers' forward + DynamicCache after the prompt (and the attribution, if given)."""
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    if attribution is not None:
        attribution.times.clear()  # the prompt's pass is not a decode step
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return times


def static_steps(model: nn.Module, prompt: torch.Tensor, steps: int) -> list[float]:
    from requant.decode import StaticDecoder

    dec = StaticDecoder(model, prompt.shape[1] + steps + 1)
    dec.prefill(prompt)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        dec.step()
        times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def attention_ops(model: nn.Module, prompt: torch.Tensor, steps: int) -> dict[str, float]:
    """ms per step of the main aten ops (torch.profiler, self CPU time), for the attention-core breakdown."""
    from torch.profiler import ProfilerActivity, profile

    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = model(nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    keep = {
        "aten::cat": "cat (KV cache growth, rotate_half)",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "SDPA",
        "aten::mm": "mm (BLAS: fp32 layers, lm_head)",
        "aten::mul": "mul",
        "aten::add": "add",
    }
    res = {}
    for ev in prof.key_averages():
        if ev.key in keep:
            res[keep[ev.key]] = ev.self_cpu_time_total / 1e3 / steps
    return res


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights a decode step reads: output projection and the linear layers of the blocks."""
    from requant.format.qlinear import QuantLinear

    head = model.get_output_embeddings()
    head_b = sum(t.numel() * t.element_size() for t in head.parameters()) + sum(
        t.numel() * t.element_size() for t in head.buffers()
    )
    layers = 0
    for mod in model.modules():
        if mod is head:
            continue
        if isinstance(mod, QuantLinear):
            layers += sum(t.numel() * t.element_size() for t in mod.stored_tensors().values())
        elif isinstance(mod, nn.Linear):
            layers += mod.weight.numel() * mod.weight.element_size()
    return {"lm_head": head_b, "linear layers": layers}


@torch.inference_mode()
def fused_steps(model: nn.Module, prompt: torch.Tensor, steps: int) -> dict[str, float]:
    """The fused decoder's step (median ms) and where it goes: its linear layers and output projection timed
    through the very descriptors the step uses (one C call each, so a few µs of ctypes per call are included),
    the rest (norms, rotary, attention over the cache, glue) by difference."""
    import ctypes

    from requant.decode import FusedDecoder
    from requant.format import kernels

    dec = FusedDecoder(model, prompt.shape[1] + steps + 2)
    dec.prefill(prompt)
    dec.step()  # the checked first step
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        dec.step()
        times.append(time.perf_counter() - t0)
    st, lib = dec.fused_step, kernels.library()

    def timed(descs: list) -> float:
        xs = {d.inp: torch.randn(1, d.inp) for d in descs}
        ys = {d.out: torch.empty(1, d.out) for d in descs}
        runs = []
        for _ in range(max(3, steps // 2)):
            t0 = time.perf_counter()
            for d in descs:
                lib.rq_gemm(ctypes.addressof(d), xs[d.inp].data_ptr(), 1, d.inp, ys[d.out].data_ptr())
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs) * 1e3

    step_ms = statistics.median(times) * 1e3
    linears = timed(st.layer_descs)
    head = timed([st.screen_desc if st.screen_desc is not None else st.head_desc])
    return {
        "step": step_ms,
        "linear layers": linears,
        "output projection (int8 screen where present)": head,
        "rest (norms, rotary, attention, glue, rescoring)": step_ms - linears - head,
    }


def profile_variant(model: nn.Module, prompt: torch.Tensor, steps: int) -> dict:
    plain = reference_steps(model, prompt, steps)
    lean = static_steps(model, prompt, steps)
    att = Attribution(model)
    try:
        instrumented = reference_steps(model, prompt, steps, att)
    finally:
        att.remove()
    n = steps
    per_cat = {c: att.times.get(c, 0.0) / n * 1e3 for c in CATEGORIES[:-1]}
    instr_ms = statistics.mean(instrumented) * 1e3
    per_cat[CATEGORIES[-1]] = instr_ms - sum(per_cat.values())
    return {
        "step_ms_median": statistics.median(plain) * 1e3,
        "static_step_ms_median": statistics.median(lean) * 1e3,
        "fused_ms": fused_steps(model, prompt, steps),
        "instrumented_step_ms_mean": instr_ms,
        "categories_ms": per_cat,
        "aten_ms": attention_ops(model, prompt, max(4, steps // 4)),
        "weight_bytes": weight_bytes(model),
    }


def median_of(runs: list[dict]) -> dict:
    """The per-figure median of several profile_variant results (nested dicts of numbers)."""
    first = runs[0]
    out = {}
    for k, v in first.items():
        if isinstance(v, dict):
            out[k] = median_of([r.get(k, {}) for r in runs])
        else:
            out[k] = statistics.median(r.get(k, 0.0) for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the variants in rotating order (medians)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import requant
    from requant.format import kernels
    from requant.format.checkpoint import read_meta
    from requant.format.speed import random_prompt

    ckpt = ensure_checkpoint(args.checkpoint)
    source = read_meta(ckpt)["metadata"]["model"]
    variants = {
        "fp32 model": lambda: requant.load(source)[0],
        "3-bit D&S, lm_head upcast to fp32 (before)": lambda: requant.load(ckpt, lm_head="fp32")[0],
        "3-bit D&S, 16-bit lm_head (default now)": lambda: requant.load(ckpt)[0],
        "3-bit D&S, int8 lm_head (opt-in)": lambda: requant.load(ckpt, lm_head="int8")[0],
    }
    models = {name: make() for name, make in variants.items()}
    prompt = random_prompt(next(iter(models.values())).get_input_embeddings().num_embeddings, args.prompt_tokens)
    for model in models.values():
        reference_steps(model, prompt[:, :8], 3)  # warm-up: kernel build, first calls
    # rounds in rotating order, medians per figure: a slow phase of a shared machine hits every variant alike
    names = list(models)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(profile_variant(models[name], prompt, args.steps))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    results = {n: median_of(runs[n]) for n in names}
    meta = {
        "checkpoint": str(ckpt),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "prompt_tokens": args.prompt_tokens,
        "rounds": args.rounds,
        "kernels": kernels.status(),
        "load_average_1min": os.getloadavg()[0],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_profile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    names = list(results)
    lines = [
        "# Where one batch-1 decode step goes (R: SmolLM2-135M, 3-bit SqueezeLLM D&S)",
        "",
        f"{args.prompt_tokens}-token prompt, then {args.steps} greedy steps; {meta['threads']} thread(s); kernels: "
        f"{meta['kernels']}; medians of {args.rounds} rounds over the variants in rotating order; load average "
        f"{meta['load_average_1min']:.1f} (a shared machine: fractions within a column are the robust part). "
        "Command: `python benchmarks/decode_profile.py`.",
        "",
        "| ms per decode step | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| **step, transformers forward + DynamicCache (median)** | "
        + " | ".join(f"**{results[n]['step_ms_median']:.1f}**" for n in names)
        + " |",
        "| step, requant static decoder (median) | "
        + " | ".join(f"{results[n]['static_step_ms_median']:.1f}" for n in names)
        + " |",
        "| step, requant fused decoder (median; one C call per token) | "
        + " | ".join(f"{results[n]['fused_ms']['step']:.1f}" for n in names)
        + " |",
    ]
    for k in list(results[names[0]]["fused_ms"])[1:]:
        lines.append(f"| · fused: {k} | " + " | ".join(f"{results[n]['fused_ms'][k]:.2f}" for n in names) + " |")
    lines += [
        "| step with hooks (mean; the attribution below: transformers forward) | "
        + " | ".join(f"{results[n]['instrumented_step_ms_mean']:.1f}" for n in names)
        + " |",
    ]
    for c in CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(f"{results[n]['categories_ms'][c]:.2f}" for n in names) + " |")
    ops = sorted({k for n in names for k in results[n]["aten_ms"]})
    for k in ops:
        lines.append(
            f"| aten {k} (profiler) | " + " | ".join(f"{results[n]['aten_ms'].get(k, 0):.2f}" for n in names) + " |"
        )
    for k in ("lm_head", "linear layers"):
        lines.append(
            f"| MB of {k} weights read per token | "
            + " | ".join(f"{results[n]['weight_bytes'][k] / 1e6:.1f}" for n in names)
            + " |"
        )
    for k, cat in (("lm_head", "lm_head"),):
        lines.append(
            f"| {k} GB/s | "
            + " | ".join(
                f"{results[n]['weight_bytes'][k] / max(results[n]['categories_ms'][cat], 1e-9) / 1e6:.1f}"
                for n in names
            )
            + " |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "decode_profile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
