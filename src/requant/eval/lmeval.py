"""lm-evaluation-harness tasks (multiple choice, generation, rolling loglikelihood) on a loaded model, offline.

The model is the one `requant.load` returns (an fp model or a checkpoint with QuantLinear layers), wrapped in
lm-eval's HFLM and run through `simple_evaluate`, so a source model and its checkpoints are scored the same
way. requant never downloads: a task runs when its data is in the local datasets cache or in local files
(a YAML task under `task_path` with `dataset_path: json` and `data_files`). lm_eval is an optional
dependency (`pip install 'requant[eval]'`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, InputError
from ..progress import is_quiet

INSTALL_HINT = "lm-eval is not installed: pip install 'requant[eval]'"
# lm-eval's results carry a filter name after the metric ("acc,none"); "none" is the unfiltered score.
_NO_FILTER = "none"
# lm-eval computes the standard error of mean-aggregated metrics (accuracies) in closed form; bootstrapping
# is only used for other aggregations, where 1000 resamples give two significant digits at a tenth of the cost.
BOOTSTRAP_ITERS = 1000


_CHOICE_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_choice_task(directory: str | os.PathLike, task: str, items: Sequence[Mapping[str, Any]]) -> Path:
    """Write a local multiple-choice lm-eval task for `--task-path directory`: `<task>.jsonl` (one item per line,
    keys `context`, `choices`, `answer` = index of the right choice) and `<task>.yaml`; returns the YAML path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    data = (d / f"{task}.jsonl").resolve()
    data.write_text("".join(json.dumps(dict(it)) + "\n" for it in items), encoding="utf-8")
    yaml = d / f"{task}.yaml"
    yaml.write_text(_CHOICE_TASK_YAML.format(task=task, data=data), encoding="utf-8")
    return yaml


def _offline_env() -> None:
    # Must precede the first `import datasets` (it reads these at import): requant never downloads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def require_lm_eval() -> Any:
    """The lm_eval module (imported offline), or one InputError telling how to install it."""
    _offline_env()
    try:  # the HF model wrapper and the task index too, so a partly installed extra fails here, not mid-run
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return lm_eval


def check_task_path(task_path: str | os.PathLike | None) -> Path | None:
    """`task_path` as a Path, or an InputError when it is not a directory."""
    if task_path is None:
        return None
    path = Path(task_path)
    if not path.is_dir():
        raise InputError(f"--task-path {str(path)!r} is not a directory (a folder of lm-eval YAML tasks)")
    return path


def task_names(spec: str) -> list[str]:
    """The task names of a comma-separated --tasks value, in order, without duplicates."""
    names = list(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
    if not names:
        raise ConfigError(f"--tasks {spec!r} names no task (a comma-separated list, e.g. arc_easy,hellaswag)")
    return names


def _task_manager(lm_eval: Any, names: Sequence[str], task_path: Path | None) -> Any:
    """A TaskManager that knows `names`: the local YAML tasks alone when they cover all of them (indexing the
    thousands of built-in task files takes tens of seconds), else the built-in tasks plus the local ones."""
    from lm_eval.tasks import TaskManager

    if task_path is not None:
        local = TaskManager(include_path=str(task_path), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return TaskManager(include_path=None if task_path is None else str(task_path))


def _build_tasks(manager: Any, names: Sequence[str], task_path: Path | None) -> list[Any]:
    """Each named task (or group) built with its data, or one clear error naming the task."""
    built = []
    for name in names:
        if name not in manager.all_tasks:
            where = f" nor a YAML task under {str(task_path)!r}" if task_path is not None else ""
            raise ConfigError(
                f"task {name!r} is not an lm-eval task{where} (run `lm-eval ls tasks` for the built-in "
                "names; local tasks go in a folder given with --task-path)"
            )
        try:
            obj = manager.load([name])
        except Exception as e:  # datasets raises many types when offline and uncached, or on bad local files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(
                f"task {name!r}: its data could not be loaded ({first}); offline, a task runs when its data "
                "is in the local datasets cache or in local files (dataset_path: json + data_files)"
            ) from None
        built.extend(obj["groups"].values() if obj["groups"] else obj["tasks"].values())
    return built


def _hflm(lm_eval: Any, model: nn.Module, tokenizer: object, batch_size: int, quiet: bool) -> Any:
    """lm-eval's HFLM around an already-loaded model; with `quiet`, its per-request progress bars are off."""
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        # HFLM takes disable_tqdm per call and the evaluator never passes it; honour requant's quiet mode here.
        def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@contextmanager
def _quiet_harness(quiet: bool) -> Iterator[None]:
    """With `quiet`: lm-eval's notices (it warns at WARNING about what a requant user does on purpose, such as
    passing a model object) down to its errors, and datasets' split-building bars off."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    log = logging.getLogger("lm_eval")
    level, bars_were_off = log.level, are_progress_bars_disabled()
    if quiet:
        log.setLevel(logging.ERROR)
        disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)
        if not bars_were_off:
            enable_progress_bars()


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """{metric: value} of one lm-eval result row: finite numbers only, "acc,none" → "acc", other filters kept
    as "exact_match,strict-match"; standard errors that lm-eval could not compute ("N/A") are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if "," not in key or isinstance(value, (str, bool)) or value is None:
            continue
        metric, filt = key.split(",", 1)
        value = float(value)
        if math.isfinite(value):
            out[metric if filt == _NO_FILTER else key] = value
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer: object,
    tasks: Sequence[str],
    *,
    task_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
) -> dict[str, dict[str, float]]:
    """Score `model` on lm-eval tasks: {task: {metric: value, ..., "samples": items scored}} (accuracies in
    [0, 1]); `limit` takes the first N items of each task, `num_fewshot` overrides the tasks' shot counts."""
    if not tasks:
        raise ConfigError("no lm-eval task given")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot} must be ≥ 0")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    if tokenizer is None:
        raise InputError("lm-eval needs the model's tokenizer, and this model or checkpoint has none")
    path = check_task_path(task_path)
    lm_eval = require_lm_eval()
    # lm-eval's own bars and notices go to stderr; silence them when requant's are (under --json) or when
    # nobody watches (stderr not a terminal), as requant's own bars do.
    quiet = is_quiet() or not sys.stderr.isatty()
    with _quiet_harness(quiet):
        manager = _task_manager(lm_eval, tasks, path)
        built = _build_tasks(manager, tasks, path)
        was_training = model.training
        model.eval()
        try:
            out = lm_eval.simple_evaluate(
                model=_hflm(lm_eval, model, tokenizer, batch_size, quiet),
                tasks=built,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=BOOTSTRAP_ITERS,
            )
        finally:
            model.train(was_training)
    samples = out.get("n-samples", {})
    results: dict[str, dict[str, float]] = {}
    for name, row in out["results"].items():
        results[name] = _metrics(row)
        if name in samples:
            results[name]["samples"] = int(samples[name]["effective"])
    return results
