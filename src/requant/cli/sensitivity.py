"""`requant sensitivity`: the paper's sensitivity analyses (Tables 1–5) for a base quantizer on a model."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ConfigError
from .common import add_calib, add_config_options, add_offload, build_config, emit, offload_folder

T = TypeVar("T")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "sensitivity",
        help="Taylor terms, actual ΔF and PQI of a base quantizer (paper Tables 1-5)",
        description="Quantize densely (no sparse part) with a base method, then measure "
        "how the calibration loss F responds: per-block Taylor terms vs actual ΔF (blocks), the λ path "
        "(lambda), PQI quadrature accuracy (nodes), mean |ΔF_PQI| per sub-layer (sublayers), coverage.",
    )
    s.add_argument("model", nargs="?", default=None, help="model dir, .gguf or cached hub id (default: SmolLM2)")
    s.add_argument("--report", required=True, help="blocks, lambda, nodes, sublayers or coverage")
    add_config_options(
        s,
        ("base", "bits", "group_size", "grad_dtype"),
        defaults={"bits": 4},
        flags={"grad_dtype": "--dtype"},
        notes={"bits": "default: 4, the paper's tables", "grad_dtype": "also for losses; default: fp32"},
    )
    s.add_argument("--rules", default="midpoint,trapezoid,left,gauss", help="nodes report: quadrature rules")
    s.add_argument("--nodes", default="1,2,4,8,16,32", help="nodes report: node counts N (default: 1,...,32)")
    s.add_argument("--lambdas", default="1e-1,5e-2,1e-2,5e-3,1e-3", help="lambda report: fractions λ in (0, 1]")
    s.add_argument(
        "--percents", default="0.05,0.15,0.5,0.71,1,2,5,5.25,10,25,50", help="coverage report: top p%% of weights"
    )
    add_config_options(s, ("pqi_nodes", "pqi_rule"), notes={"pqi_nodes": "blocks/sublayers/coverage; default: 32"})
    s.add_argument("--pqi-scope", default="joint", help="blocks report: joint (one pass) or block (per block)")
    s.add_argument("--batch-size", type=int, default=1, help="windows per forward/backward pass (default: 1)")
    add_config_options(s, ("include", "exclude"))
    s.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    s.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots into DIR (needs matplotlib)")
    s.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    add_offload(s)
    add_calib(
        s,
        defaults={"nsamples": 8},
        notes={"nsamples": "for the quantizer and for F; default: 8; cost grows linearly"},
    )
    return s


def _list(text: str, cast: Callable[[str], T], what: str) -> list[T]:
    try:
        items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of numbers") from None
    if not items:
        raise ConfigError(f"{what} {text!r} names nothing")
    return items


def run(args: argparse.Namespace) -> int:
    from ..analysis.plots import pyplot, write_plots
    from ..analysis.reports import check_report, prepare_problem, run_report
    from ..config import DTYPES
    from ..loading import check_seqlen, load_model, resolve_model_path
    from ..memory import tune_allocator

    tune_allocator()  # before the model loads: freed layer-sized tensors go back to the system (requant.memory)

    if args.grad_dtype not in DTYPES:  # also the dtype the model is loaded in
        raise ConfigError(f"--dtype {args.grad_dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    check_report(args.report)
    options: dict[str, Any] = {}
    if args.report == "nodes":
        options = {"rules": _list(args.rules, str, "--rules"), "nodes": _list(args.nodes, int, "--nodes")}
    elif args.report == "lambda":
        options = {"lambdas": _list(args.lambdas, float, "--lambdas")}
    else:
        options = {"pqi_nodes": args.pqi_nodes, "pqi_rule": args.pqi_rule}
        if args.report == "coverage":
            options["percents"] = _list(args.percents, float, "--percents")
        if args.report == "blocks":
            options["pqi_scope"] = args.pqi_scope
    check_report(args.report, **options)
    config = build_config(args)
    check_seqlen(args.model, config.seqlen)
    if args.plot:
        pyplot()  # a missing matplotlib should stop us before the long work, not after
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.grad_dtype, device=args.device, offload=offload_folder(args))
    problem = prepare_problem(model, tok, config, batch_size=args.batch_size)
    prep_s = time.perf_counter() - t0
    report = run_report(args.report, problem, **options)
    plots = [str(p) for p in write_plots(report, args.plot)] if args.plot else []
    setting = {
        "model": resolve_model_path(args.model),
        "base": args.base,
        "bits": args.bits,
        "group_size": args.group_size,
        "calib": args.calib,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "bos": config.bos,
        "dtype": args.grad_dtype,
        "layers": len(problem.layers),
        "weights": sum(i.numel for i in problem.layers),
    }
    obj = {**report.to_dict(), "setting": setting, "quantize_s": prep_s, "plots": plots}
    head = (
        f"{args.report} report: {args.base} {args.bits}-bit, {len(problem.layers)} layers, "
        f"{args.nsamples} x {args.seqlen} tokens of {args.calib}, {args.grad_dtype}"
    )
    lines = [head, "", report.to_markdown(), ""]
    lines += [f"{k}: {v}" for k, v in report.summary.items() if k not in ("path", "curve")]
    lines += [f"wrote {p}" for p in plots]
    emit(args, obj, "\n".join(lines))
    return 0
