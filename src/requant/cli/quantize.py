"""`requant quantize`: quantize a model (ReQuant or a baseline) and write a checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .common import add_calib, add_config_options, add_offload, build_config, emit, offload_folder

# QuantConfig settings with a flag, by argument group (the flags, types, defaults and help come from the fields).
GENERAL = ("base", "bits", "group_size", "sym", "widen_bits")
DENSE_AND_SPARSE = (
    "outliers",
    "outlier_select",
    "significant",
    "significant_select",
    "step",
    "pqi_nodes",
    "pqi_rule",
    "pqi_nsamples",
)
VARIANTS = (
    "alg1_objective",
    "alg1_criterion",
    "alg1_granularity",
    "alg1_allocator",
    "alg1_steps",
    "alg1_max_factor",
    "detach_scope",
    "detach_ranking",
    "detach_refit",
    "sparse_values",
)
LAYERS = ("include", "exclude", "expert_min_tokens", "grad_dtype")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..recipes import BEST, RECIPE_SETTINGS, RECIPES

    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint")
    q.add_argument("model", nargs="?", default=None, help="model dir, .gguf or cached hub id (default: SmolLM2)")
    q.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    q.add_argument(
        "--recipe",
        default=None,
        metavar="{" + ",".join((*RECIPES, BEST)) + "}",
        help="preset: requant (the paper's settings per base), dns (SqueezeLLM's IQR outliers + Fisher values) or "
        "best (with --bits-budget: the best configuration measured on the reference model within the budget; "
        "--base/--bits restrict the choice); explicit flags override it",
    )
    q.add_argument(
        "--bits-budget",
        type=float,
        default=None,
        metavar="B",
        help="with --recipe best: bits per quantized weight allowed, dense + tables + sparse (e.g. 3.5)",
    )
    q.add_argument(
        "--base-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword option of the base quantizer, e.g. grid=lut (gptq: GPTQ over a per-row LUT), act_order=true "
        "(gptq), L=12 (qtip); VALUE is read as JSON where it parses (repeat)",
    )
    notes = {
        "group_size": "default: per row; with --recipe requant, awq and gptq get the group size at which the "
        "outliers cost no more bits than g128"
    }
    add_config_options(q, GENERAL, unset=RECIPE_SETTINGS, notes=notes)
    add_config_options(q.add_argument_group("dense-and-sparse"), DENSE_AND_SPARSE, unset=RECIPE_SETTINGS)
    variants = q.add_argument_group("algorithm 1 / 2 variants (docs/method.md)")
    add_config_options(variants, VARIANTS, unset=RECIPE_SETTINGS)
    add_config_options(q, LAYERS)
    q.add_argument(
        "--dense-dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="dtype the checkpoint stores unquantized tensors in (embeddings, norms, lm_head); default auto: "
        "the source's 16-bit dtype, or fp16 (bf16 if a value exceeds its range) for a wider source",
    )
    q.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.work")
    q.add_argument("--keep-work", action="store_true", help="keep OUTPUT.work (stage results) after success")
    add_offload(q)
    q.add_argument("--force", action="store_true", help="replace an existing different checkpoint")
    q.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    q.add_argument(
        "--dry-run",
        action="store_true",
        help="print the estimated cost (passes, FLOPs, peak memory) and exit without quantizing",
    )
    q.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes to estimate for with --dry-run (default: $WORLD_SIZE under torchrun, else 1)",
    )
    add_calib(q)
    return q


def config_from_args(args: argparse.Namespace) -> Any:
    """QuantConfig from the flags: built-in defaults, then the recipe, then every flag given explicitly."""
    return build_config(args, recipe_of(args)[0])


def recipe_of(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The settings of --recipe (and --base-option) before explicit flags; with --recipe best also the measured
    point it picked."""
    from ..config import QuantConfig
    from ..errors import ConfigError
    from ..recipes import BEST, best_settings, recipe_settings

    if args.bits_budget is not None and args.recipe != BEST:
        raise ConfigError(f"--bits-budget {args.bits_budget:g} needs --recipe best (it picks a configuration)")
    settings: dict[str, Any] = {}
    point = None
    if args.recipe == BEST:
        settings, point = best_settings(args.bits_budget, base=args.base, bits=args.bits)
    elif args.recipe:
        base = args.base or QuantConfig.field_info("base").default
        settings = recipe_settings(args.recipe, base, args.bits or QuantConfig.field_info("bits").default)
    if args.base_option:
        settings["base_options"] = {**settings.get("base_options", {}), **_base_options(args.base_option)}
    return settings, point


def _base_options(items: list[str]) -> dict[str, Any]:
    """--base-option KEY=VALUE pairs; VALUE as JSON where it parses (numbers, true/false), else a string."""
    import json

    from ..errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--base-option {item!r} is not KEY=VALUE (e.g. grid=lut)")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def best_line(point: dict[str, Any]) -> str:
    """What --recipe best picked, and what it measured on the reference model (not a guarantee for others)."""
    ppl = ", ".join(f"{t} {point[t]:.2f}" for t in ("wiki:test", "c4") if t in point)
    return (
        f"--recipe best picked {point['name']} ({point['bits_per_weight']:.3f} bits/weight; measured on "
        f"SmolLM2-135M: {ppl} perplexity; a measured table, not a guarantee for other models)"
    )


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..loading import check_seqlen
    from ..memory import tune_allocator

    tune_allocator()  # before the model loads: freed layer-sized tensors go back to the system (requant.memory)

    settings, point = recipe_of(args)
    config = build_config(args, settings)
    if point is not None and not args.json:
        print(best_line(point), file=sys.stderr)
    check_seqlen(args.model, config.seqlen)  # before minutes of work on windows the model cannot take
    if args.dry_run:
        return dry_run(args, config)
    # Under torchrun (WORLD_SIZE > 1) every rank runs this command; the windows are split between them.
    distributed.init_from_env(args.device)
    try:
        code = _quantize(args, config)
        # Leave together: a rank that tore down its gloo group while rank 0 was still writing sometimes aborted
        # (SIGABRT, "terminate called without an active exception"), and torchrun then killed rank 0.
        distributed.barrier()
    except BaseException:
        distributed.destroy()
        raise
    return distributed.finish(code)  # a torchrun worker ends here, skipping gloo's teardown (see finish)


def dry_run(args: argparse.Namespace, config: Any) -> int:
    """Print the estimated cost from the model's config alone (weights on the meta device, nothing loaded)."""
    import json
    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..cost import estimate_cost, format_cost, model_info
    from ..errors import ConfigError, InputError
    from ..loading import resolve_model_path

    nproc = args.nproc if args.nproc is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be at least 1")
    path = resolve_model_path(args.model)
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the config of model {args.model!r}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    cost = estimate_cost(
        config, model_info(model, config), world_size=nproc, offload=args.offload is not None, device=args.device
    )
    if int(os.environ.get("RANK", "0")) == 0:  # launched under torchrun by mistake: print once
        print(json.dumps(cost, indent=2) if args.json else format_cost(cost))
    return 0


def _quantize(args: argparse.Namespace, config: Any) -> int:
    from ..workdir import claim_output

    out = Path(args.output)
    # Refuse a bad or busy output before hours of work; hold its lock (it covers OUTPUT.work) until the end.
    with claim_output(out, source=args.model, resume=args.resume) as work:
        return _quantize_claimed(args, config, out, work)


def _quantize_claimed(args: argparse.Namespace, config: Any, out: Path, work: Path) -> int:
    from .. import distributed
    from ..format import save_checkpoint
    from ..format.checkpoint import _check_replace
    from ..io import writing
    from ..loading import load_model, resolve_model_path
    from ..memory import PeakAnon
    from ..pipeline import quantize
    from ..workdir import remove_work_dir

    if out.exists():
        _check_replace(out, config, args.force)  # refuse before hours of work, not after
    t0 = time.perf_counter()
    with PeakAnon() as anon:
        model, tok = load_model(args.model, device=distributed.local_device(args.device), offload=offload_folder(args))
        result = quantize(model, tok, config, workdir=work, resume=args.resume)
    meta = {"model": resolve_model_path(args.model), "argv": sys.argv[1:], "wall_s": time.perf_counter() - t0}
    if distributed.is_main():  # every rank holds the same result; one writes it
        with writing(out, f"the finished stages in {str(work)!r} are kept: make room and run again with --resume"):
            save_checkpoint(out, model, tok, result, metadata=meta, force=args.force, dense=args.dense_dtype)
        if not args.keep_work:
            remove_work_dir(work)
    if args.offload is not None and not args.keep_work:
        _remove_offload(offload_folder(args))
    # Every rank joins (the largest process counts); this also keeps the others until the checkpoint is complete.
    peak = dict(
        zip(("rss_gb", "anon_gb", "cuda_gb"), distributed.all_reduce_max(*_peak_memory_gb(anon.peak)), strict=True)
    )
    if not distributed.is_main():
        return 0
    bits = result.bit_count()
    obj = {
        "output": str(out),
        "bits_per_weight": bits.bits_per_weight,
        "sparse_percent": bits.sparse_percent,
        "layers": len(result.layers),
        "wall_s": meta["wall_s"],
        "peak_memory": peak,
        "config": config.to_dict(),
        "report": result.report,
    }
    emit(
        args,
        obj,
        f"wrote {out}: {len(result.layers)} layers, {bits.bits_per_weight:.3f} bits/weight, "
        f"{bits.sparse_percent:.3f}% sparse, {meta['wall_s']:.1f} s, peak RSS {peak['rss_gb']:.2f} GB "
        f"({peak['anon_gb']:.2f} GB anonymous) per process"
        + "".join(f"\n{line}" for line in _unit_lines(result.report)),
    )
    return 0


def _unit_lines(report: dict[str, Any]) -> list[str]:
    """The share of block weights quantized and, for MoE models, the experts' calibration tokens."""
    from .inspect import expert_summary

    lines = [report["coverage"]["summary"]] if report.get("coverage") else []
    if report.get("experts"):
        lines.append(expert_summary(report["experts"]))
    return lines


def _remove_offload(folder: str | None) -> None:
    """Drop this process's memory-mapped weight files once the checkpoint is written: they are as large as the
    model (on Linux, open mappings keep the data until the process ends)."""
    from ..offload import remove_offload_folder

    if folder is not None:
        remove_offload_folder(folder)


def _peak_memory_gb(anon: int) -> tuple[float, float, float]:
    """Peak resident set size of this process, its sampled peak anonymous part (`anon`, bytes; the part that
    memory-mapped weights do not explain, requant.memory) and peak CUDA memory allocated (0 without CUDA), in GB."""
    import torch

    from ..memory import peak_rss

    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    return peak_rss() / 1e9, anon / 1e9, cuda / 1e9
