"""What a quantization run will cost, before it starts (`requant quantize --dry-run`): an estimate.

Counts are exact for the pipeline as written (windows per stage, PQI nodes, detach steps); FLOPs and memory
are first-order models:
  * forward ≈ 2·P_lin FLOPs per token plus causal attention 2·blocks·L·hidden (P_lin: parameters of all
    nn.Linear layers, lm_head included);
  * forward+backward ≈ forward + activation gradients (≈ forward ×2 on attention) + weight gradients of the
    quantized layers only (2·P_q): 4·P_lin + 2·P_q + 3·attention per token, ≈ 6·params when all are quantized;
  * memory per rank = runtime + weights + the pipeline's fp32 copies of the quantized weights and gradient
    sums + one window's activations (or input statistics for AWQ/GPTQ/QTIP, whichever is larger); every
    rank holds the whole model. On R (SmolLM2-135M, CPU) it came within 8% of the measured peak anonymous
    memory, resident and with --offload (docs/scaling.md).
  * with --offload (requant.offload) the weights are memory-mapped files: listed apart as file-backed (the
    kernel can evict them), not in the peak; a backward pass keeps only the hidden states between blocks plus
    one block's activations, and recomputes each block's forward (+ one forward per forward+backward).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .model import all_units, find_blocks, quantizable_layers
from .quantizers import make_quantizer
from .sparse.detach import detach_step, step_counts
from .sparse.outliers import budget

# Python + torch + transformers after import (0.28 GB RSS measured on CPU, torch 2.13) plus allocator slack.
RUNTIME_BYTES = 400_000_000


def model_info(model: nn.Module, config: QuantConfig, *, dtype_bytes: int = 4) -> dict[str, Any]:
    """Sizes the estimate needs, from a model whose weights may be on the meta device (nothing loaded)."""
    layers = quantizable_layers(model, config.include, config.exclude)
    _, blocks = find_blocks(model)
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    # Every weight that could be a unit (linear layers, transposed linears, fused experts), selected or not.
    linear = sum(i.numel for i in all_units(model))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    widths = [w for i in layers for w in (i.in_features, i.out_features)]
    per_block: dict[int | None, int] = {}
    for i in layers:
        per_block[i.block] = per_block.get(i.block, 0) + i.in_features**2
    return {
        "params": params,
        "linear_params": linear,
        "quantized_params": sum(i.numel for i in layers),
        "layers": len(layers),
        "blocks": len(blocks),
        "hidden": emb.embedding_dim if emb is not None else min(widths),
        "intermediate": max(widths),
        "vocab": emb.num_embeddings if emb is not None else 0,
        # Σ in² over the layers: an upper bound on the Σxxᵀ floats (layers reading one tensor share one).
        "input_stat_floats": sum(per_block.values()),
        "input_stat_floats_block": max(per_block.values()),
        "dtype_bytes": dtype_bytes,
    }


def _pqi_passes(config: QuantConfig, quantized: int) -> int:
    passes = 1 if config.needs_pqi_pre else 0
    if config.significant > 0 and config.significant_select == "pqi":
        count = budget(config.significant, quantized)
        step = detach_step(count, config.significant, config.step, quantized)
        passes += len(step_counts(count, step))
    return passes


def estimate_cost(
    config: QuantConfig,
    info: dict[str, Any],
    *,
    world_size: int = 1,
    offload: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Passes, FLOPs and peak memory of `quantize(config)` on a model described by `model_info`, in total and
    per rank when the windows are split over `world_size` processes (and with `offload`, memory-mapped weights
    and checkpointed blocks). On an accelerator `device`, `peak` is the host's and `device_peak` the device's
    memory. An estimate: see the module docstring."""
    k = max(int(world_size), 1)
    # An instance: options can change what a method reads (SqueezeLLM with feedback reads the inputs).
    quant = make_quantizer(config.base, config.bits, None, **config.quantizer_options())
    seqlen, n = config.seqlen, config.nsamples
    m = config.pqi_nsamples or n
    fisher_windows = n if config.needs_fisher else 0
    pqi_passes = _pqi_passes(config, info["quantized_params"])
    pqi_evals = pqi_passes * config.pqi_nodes * m
    calib_fwd = 0
    alg1 = config.outliers > 0 and config.outlier_select == "adaptive"
    # The fp model's one-pass statistics: read by a base that fits on them, by Algorithm 1 and the width plan
    # of a sequential base, and by fitted sparse values.
    one_pass = (quant.uses_inputs and (not quant.sequential or alg1 or config.widen_bits > 0)) or (
        config.sparse_values == "fit"
    )
    if quant.uses_inputs and quant.sequential:
        calib_fwd += n  # the block-by-block sequential pass (≈ one forward)
    if one_pass:
        calib_fwd += n
    fwd_bwd = fisher_windows + pqi_evals
    # Each sum is split separately, so a rank's share is rounded up per sum (per PQI node).
    fwd_bwd_rank = math.ceil(fisher_windows / k) + pqi_passes * config.pqi_nodes * math.ceil(m / k)
    fwd_rank = math.ceil(calib_fwd / k) if calib_fwd else 0

    attn = 2 * info["blocks"] * seqlen * info["hidden"]
    fwd_token = 2 * info["linear_params"] + attn
    fwd_bwd_token = 4 * info["linear_params"] + 2 * info["quantized_params"] + 3 * attn
    if offload:  # each block's forward runs again during backward
        fwd_bwd_token += fwd_token
    tokens = seqlen  # per window
    flops_total = (fwd_bwd * fwd_bwd_token + calib_fwd * fwd_token) * tokens
    flops_rank = (fwd_bwd_rank * fwd_bwd_token + fwd_rank * fwd_token) * tokens

    b = info["dtype_bytes"]
    weights = info["params"] * b
    q = info["quantized_params"]
    accel = torch.device(device).type != "cpu"
    detach = config.significant > 0 and config.significant_select == "pqi"
    # Whole-model fp32 copies of the quantized weights (4 bytes each) held at once besides the model. The gradient
    # passes stream (each parameter's gradient is folded into the sums as backward produces it and freed), so a
    # pass holds its sums and nothing else of the model's size. Resident: the masters w and the Fisher sums
    # (Fisher, Algorithm 1, dense fit: 2); a PQI pass to w̃_pre: w, w̃_pre, ḡ and its scores (4); the detach: w,
    # the current reconstruction and the node's sums, which become the scores in place (3). With --offload the
    # masters, Fisher, sums and reconstruction are memory-mapped files (file-backed): only a PQI pass to w̃_pre
    # keeps w̃_pre and the scores (2).
    pre = config.needs_pqi_pre
    # (A detach refit of a Fisher-weighted base keeps the Fisher through the detach: one more.)
    keep = config.detach_refit and quant.uses_importance
    resident_copies = max(2 if fisher_windows else 1, 4 if pre else 0, (4 if keep else 3) if detach else 0)
    host_copies = (2 if pre else 0) if offload else resident_copies
    device_copies = 0
    if accel:  # the sums live on the device; the masters, reconstruction and scores on the host
        device_copies = 1 if (fisher_windows or pqi_passes) else 0
        host_copies = max(host_copies - device_copies, 1)
    # One-byte boolean masks: the pipeline's skip, outliers and their union, and in the detach the chosen entries
    # (a step's exclusions are built per layer and its picks are index lists).
    sparse_masks = (4 if detach else 3) * q if config.outliers > 0 or config.significant > 0 else 0
    codes = q  # the dense codes (one byte per weight for ≤ 8 bits)
    grad_work = 4 * q * (host_copies + device_copies) + sparse_masks + codes
    block_floats = 10 * info["hidden"] + 4 * info["intermediate"]
    # The logits in backward: the output, the saved log-softmax, the loss's gradient and the logits' gradient (4).
    logits = 4 * info["vocab"]
    if offload:  # hidden states between blocks + one block's internals + the logits
        act_floats = seqlen * (info["blocks"] * info["hidden"] + block_floats + logits)
    else:
        act_floats = seqlen * (info["blocks"] * block_floats + logits)
    activations = 4 * act_floats if fwd_bwd else 4 * seqlen * (2 * info["hidden"] + 3 * info["vocab"])
    stats = 0
    if quant.uses_inputs and quant.sequential:
        hidden_states = 2 * math.ceil(n / k) * seqlen * info["hidden"] * 4
        stats = 4 * info["input_stat_floats_block"] + hidden_states
    if one_pass:
        stats = max(stats, 4 * info["input_stat_floats"])
    resident_weights = 0 if offload else weights
    if accel:
        device_peak = weights + 4 * q * device_copies + max(activations, stats)
        host_peak = RUNTIME_BYTES + 4 * q * host_copies + sparse_masks + codes
        peak = host_peak
    else:
        device_peak = 0
        peak = RUNTIME_BYTES + resident_weights + sparse_masks + codes + max(4 * q * host_copies + activations, stats)
    return {
        "estimate": True,
        "world_size": k,
        "tokens_per_window": seqlen,
        "windows": {"fisher": fisher_windows, "pqi": m if pqi_passes else 0, "calibration": n if calib_fwd else 0},
        "pqi_passes": pqi_passes,
        "pqi_nodes": config.pqi_nodes,
        "passes": {
            "fisher_fwd_bwd": fisher_windows,
            "pqi_fwd_bwd": pqi_evals,
            "calibration_fwd": calib_fwd,
            "fwd_bwd": fwd_bwd,
            "fwd": calib_fwd,
        },
        "per_rank_passes": {"fwd_bwd": fwd_bwd_rank, "fwd": fwd_rank},
        "flops": {"total": flops_total, "per_rank": flops_rank, "fwd_bwd_per_token": fwd_bwd_token},
        "offload": offload,
        "memory_bytes_per_rank": {
            "weights": resident_weights,
            "file_backed_weights": weights - resident_weights,
            "gradient_work": grad_work,
            "activations": activations,
            "input_statistics": stats,
            "runtime": RUNTIME_BYTES,
            "peak": peak,
            "device_peak": device_peak,
        },
        "device": str(device),
        "model": dict(info),
    }


def format_cost(cost: dict[str, Any]) -> str:
    """The human-readable table `--dry-run` prints."""

    def gb(x: float) -> str:
        return f"{x / 1e9:.2f} GB"

    info, p, mem = cost["model"], cost["passes"], cost["memory_bytes_per_rank"]
    k = cost["world_size"]
    lines = [
        "requant quantize --dry-run: ESTIMATED cost (first-order model, not a measurement)",
        f"  model          {info['params'] / 1e6:.1f} M parameters; {info['layers']} layers to quantize "
        f"({info['quantized_params'] / 1e6:.1f} M weights) in {info['blocks']} blocks",
        f"  processes      {k} (windows split across them; each holds the whole model)",
        f"  window         {cost['tokens_per_window']} tokens",
        f"  Fisher         {p['fisher_fwd_bwd']} forward+backward passes",
        f"  PQI            {cost['pqi_passes']} integral(s) x {cost['pqi_nodes']} nodes x {cost['windows']['pqi']} "
        f"windows = {p['pqi_fwd_bwd']} forward+backward passes",
        f"  calibration    {p['calibration_fwd']} forward passes (layer input statistics Σxxᵀ: AWQ, GPTQ, QTIP, "
        "fitted sparse values)",
        f"  total          {p['fwd_bwd']} forward+backward + {p['fwd']} forward passes; "
        f"{cost['flops']['total'] / 1e12:.2f} TFLOP",
    ]
    if k > 1:
        r = cost["per_rank_passes"]
        lines.append(
            f"  per rank       {r['fwd_bwd']} forward+backward + {r['fwd']} forward passes; "
            f"{cost['flops']['per_rank'] / 1e12:.2f} TFLOP"
        )
    lines.append(
        f"  peak memory    ~{gb(mem['peak'])} per process, anonymous (weights {gb(mem['weights'])}, gradient work "
        f"{gb(mem['gradient_work'])}, activations {gb(mem['activations'])}, input statistics "
        f"{gb(mem['input_statistics'])}, runtime {gb(mem['runtime'])})"
    )
    if mem.get("device_peak"):
        lines.append(
            f"  device memory  ~{gb(mem['device_peak'])} on {cost['device']} (weights, gradient sums, activations); "
            "the peak above is the host's"
        )
    if cost.get("offload"):
        lines.append(
            f"  offload        weights {gb(mem['file_backed_weights'])} memory-mapped from disk (not in the peak; "
            "the page cache holds what fits)"
        )
    return "\n".join(lines)
