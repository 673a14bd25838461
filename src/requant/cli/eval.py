"""`requant eval`: perplexity (and KL to a reference) and lm-eval task scores of a model or checkpoint."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import add_lm_head_flag, add_verify_flag, emit


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="perplexity (and KL) and lm-eval task scores of a model or checkpoint")
    e.add_argument("model", nargs="?", default=None, help="checkpoint or model (default: SmolLM2 fp32)")
    e.add_argument(
        "--data", default=None, help="comma-separated texts for perplexity (default: wiki:test unless --tasks)"
    )
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    e.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N windows of each text / items of each task"
    )
    e.add_argument(
        "--bos",
        default="auto",
        metavar="{auto,always,never}",
        help="BOS token at the start of every window: auto (if the tokenizer adds one), always, never (default: auto)",
    )
    e.add_argument("--batch-size", type=int, default=1, help="windows (task requests) per forward pass (default: 1)")
    g = e.add_argument_group("lm-eval tasks (pip install 'requant[eval]')")
    g.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag")
    g.add_argument("--task-path", default=None, metavar="DIR", help="folder of local lm-eval YAML tasks")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per item (default: the task's)")
    e.add_argument("--kl-to", default=None, help="reference model for KL ('source' = the checkpoint's model)")
    e.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    e.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    add_lm_head_flag(e)
    add_verify_flag(e)
    return e


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..data import BOS_MODES, text_windows, window_bos
    from ..eval import evaluate
    from ..eval.lmeval import check_task_path, evaluate_tasks, require_lm_eval, task_names
    from ..format import is_checkpoint
    from ..format.checkpoint import read_meta
    from ..loading import check_seqlen

    data = args.data if args.data is not None or args.tasks is not None else "wiki:test"
    names = [] if data is None else [d.strip() for d in data.split(",") if d.strip()]
    if data is not None and not names:
        raise ConfigError(f"--data {data!r} names no text")
    tasks = None if args.tasks is None else task_names(args.tasks)
    if tasks is None and (args.task_path is not None or args.num_fewshot is not None):
        raise ConfigError("--task-path and --num-fewshot apply to lm-eval tasks: name them with --tasks")
    if args.bos not in BOS_MODES:
        raise ConfigError(f"--bos {args.bos!r} is not allowed; use one of {', '.join(BOS_MODES)}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit} must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {args.num_fewshot} must be ≥ 0")
    if args.kl_to is not None and not names:
        raise ConfigError("--kl-to applies to perplexity: name the texts with --data")
    if tasks is not None:  # a missing extra or task folder fails before the model is loaded
        require_lm_eval()
        check_task_path(args.task_path)
    if names:
        check_seqlen(args.model, args.seqlen)
    model, tok = load(args.model, device=args.device, verify=args.verify, lm_head=args.lm_head)
    reference = None
    if args.kl_to is not None:
        ref_spec = args.kl_to
        if ref_spec == "source":
            if args.model is None or not is_checkpoint(args.model):
                raise ConfigError("--kl-to source needs a requant checkpoint as MODEL")
            ref_spec = read_meta(args.model)["metadata"].get("model")
        reference, _ = load(ref_spec, device=args.device)
    bos = window_bos(tok, args.bos) is not None  # the rule text_windows follows; fails here for an impossible mode
    results = []
    for name in names:
        windows = text_windows(tok, name, args.seqlen, limit=args.limit, bos=args.bos)
        results.append(evaluate(model, windows, data=name, reference=reference, batch_size=args.batch_size, bos=bos))
    scores = None
    if tasks is not None:
        scores = evaluate_tasks(
            model,
            tok,
            tasks,
            task_path=args.task_path,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
        )
    obj: dict = {"model": str(args.model) if args.model else "default"}
    text = []
    if names:
        obj["results"] = [r.to_dict() for r in results]
        text += ["| data | perplexity | tokens | windows | BOS | KL (nats/token) |", "|---|---|---|---|---|---|"]
        for r in results:
            kl = "" if r.kl is None else f"{r.kl:.5f}"
            bos_cell = "yes" if r.bos else "no"
            text.append(f"| {r.data} | {r.perplexity:.4f} | {r.tokens} | {r.windows} | {bos_cell} | {kl} |")
    if scores is not None:
        obj["tasks"] = scores
        text += ([""] if text else []) + task_table(scores)
    emit(args, obj, "\n".join(text))
    return 0


def task_table(scores: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: one per task and metric, its standard error beside it (accuracies in [0, 1])."""
    rows = ["| task | metric | value | ± stderr | items |", "|---|---|---|---|---|"]
    for task, metrics in scores.items():
        items = metrics.get("samples")
        for name, value in metrics.items():
            if name == "samples" or "_stderr" in name:
                continue
            metric, _, filt = name.partition(",")
            err = metrics.get(f"{metric}_stderr" + (f",{filt}" if filt else ""))
            n = "" if items is None else str(int(items))
            rows.append(f"| {task} | {name} | {value:.4f} | {'' if err is None else f'{err:.4f}'} | {n} |")
    return rows
