"""lm-eval on a local multiple-choice task: scores equal the model's own loglikelihoods, for fp and checkpoints."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'requant[eval]'")

from helpers import byte_tokenizer, tiny_llama
from requant import load
from requant.cli import main
from requant.config import QuantConfig
from requant.eval.lmeval import evaluate_tasks, write_choice_task
from requant.format import save_checkpoint
from requant.pipeline import quantize

# (question, choices, index of the right one): three-way questions with choices of unequal length.
ITEMS = [
    ("alpha beta", ["gamma", "layer", "quant"], 0),
    ("quant weight", ["token", "loss", "delta"], 1),
    ("model token", ["beta", "alpha", "layer"], 2),
    ("delta gamma", ["beta", "weight", "model"], 0),
    ("loss layer", ["gamma", "model", "alpha"], 1),
    ("token alpha", ["quant", "delta", "weight"], 2),
]
TASK = "requant_toy_mc"


@pytest.fixture(autouse=True)
def _harness_setup(monkeypatch, tmp_path):
    import datasets.config
    import lm_eval.evaluator

    # simple_evaluate also collects an environment report (torch's collect_env, git): seconds of subprocesses
    # per call that the scores do not depend on.
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
    # datasets caches each task's prepared split; keep the tests' out of the user's cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def write_task(d, items=ITEMS) -> None:
    write_choice_task(d, TASK, [{"context": q, "choices": c, "answer": a} for q, c, a in items])


@pytest.fixture
def task_dir(tmp_path):
    write_task(tmp_path / "tasks")
    return tmp_path / "tasks"


@torch.no_grad()
def loglikelihoods(model, tok, items=ITEMS) -> list[torch.Tensor]:
    """Per item, Σ log p(" choice" | question) over each choice's tokens, straight from the model's logits."""
    out = []
    for question, choices, _ in items:
        ctx = tok(question)["input_ids"]
        lls = []
        for choice in choices:
            ids = torch.tensor([ctx + tok(" " + choice)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            lls.append(float(logp[len(ctx) - 1 :].gather(1, ids[0, len(ctx) :, None]).sum()))
        out.append(torch.tensor(lls, dtype=torch.float64))
    return out


def hand_scores(model, tok, items=ITEMS) -> dict[str, float]:
    """acc (the choice of largest loglikelihood is the right one) and acc_norm (largest per character)."""
    acc = norm = 0
    for ll, (_, choices, answer) in zip(loglikelihoods(model, tok, items), items, strict=True):
        acc += int(ll.argmax()) == answer
        norm += int((ll / torch.tensor([float(len(c)) for c in choices], dtype=torch.float64)).argmax()) == answer
    return {"acc": acc / len(items), "acc_norm": norm / len(items)}


def check(scores: dict, model, tok) -> dict:
    assert set(scores) == {TASK}
    s = scores[TASK]
    assert s["samples"] == len(ITEMS)
    assert 0.0 <= s["acc"] <= 1.0 and 0.0 <= s["acc_norm"] <= 1.0
    assert {"acc": s["acc"], "acc_norm": s["acc_norm"]} == hand_scores(model, tok)
    return s


def test_scores_equal_the_models_own_loglikelihoods(task_dir, tmp_path):
    tok, model = byte_tokenizer(), tiny_llama()
    check(evaluate_tasks(model, tok, [TASK], task_path=task_dir), model, tok)
    # Answer keys built from the model's own preferences: its favourite choices score 1, its least liked 0.
    lls = loglikelihoods(model, tok)
    for pick, expected in ((torch.argmax, 1.0), (torch.argmin, 0.0)):
        items = [(q, c, int(pick(ll))) for (q, c, _), ll in zip(ITEMS, lls, strict=True)]
        write_task(tmp_path / "keyed", items)
        s = evaluate_tasks(model, tok, [TASK], task_path=tmp_path / "keyed", batch_size=4)[TASK]
        assert s["acc"] == expected


def test_a_checkpoint_is_scored_the_same_way(task_dir, tmp_path):
    tok, model = byte_tokenizer(), tiny_llama()
    result = quantize(model, tok, QuantConfig(base="rtn", bits=3, outliers=1.0))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok, result)
    loaded, ltok = load(ckpt)
    check(evaluate_tasks(loaded, ltok, [TASK], task_path=task_dir), loaded, ltok)


def run(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reports_tasks_beside_perplexity(capsys, model, model_dir, task_dir, text_file):
    code, out, _ = run(capsys, "eval", str(model_dir), "--tasks", TASK, "--task-path", str(task_dir), "--json")
    assert code == 0
    d = json.loads(out)
    assert "results" not in d  # no --data: lm-eval tasks only
    assert {k: d["tasks"][TASK][k] for k in ("acc", "acc_norm")} == hand_scores(model, byte_tokenizer())
    argv = ["eval", str(model_dir), "--tasks", TASK, "--task-path", str(task_dir), "--data", str(text_file)]
    code, out, _ = run(capsys, *argv, "--seqlen", "32", "--limit", "2", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["tasks"][TASK]["samples"] == 2  # --limit: the first two items
    assert d["results"][0]["windows"] == 2 and d["results"][0]["perplexity"] > 1
    code, out, _ = run(capsys, *argv, "--seqlen", "32", "--limit", "2")
    assert code == 0 and f"| {TASK} | acc |" in out and "| data | perplexity |" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", " , "], "names no task"),
        (["--num-fewshot", "2"], "name them with --tasks"),
        (["--tasks", TASK, "--num-fewshot", "-1"], "--num-fewshot -1"),
    ],
)
def test_bad_task_arguments_give_one_line(capsys, model_dir, task_dir, extra, message):
    code, out, err = run(capsys, "eval", str(model_dir), "--task-path", str(task_dir), *extra)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_an_unknown_task_is_named(task_dir):
    from lm_eval.tasks import TaskManager

    from requant.errors import ConfigError
    from requant.eval.lmeval import _build_tasks

    # The CLI looks names up in the built-in index too (tens of seconds to build); the message is the same.
    local = TaskManager(include_path=str(task_dir), include_defaults=False)
    with pytest.raises(ConfigError, match=r"task 'no_such_task' is not an lm-eval task nor a YAML task under"):
        _build_tasks(local, [TASK, "no_such_task"], task_dir)


def test_missing_task_data_and_missing_lm_eval_give_one_line(capsys, model_dir, task_dir, monkeypatch):
    (task_dir / f"{TASK}.jsonl").unlink()
    code, out, err = run(capsys, "eval", str(model_dir), "--tasks", TASK, "--task-path", str(task_dir))
    assert code == 2 and out == "" and f"task '{TASK}': its data could not be loaded" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    code, out, err = run(capsys, "eval", str(model_dir), "--tasks", TASK)
    assert code == 2 and err.strip() == "requant: error: lm-eval is not installed: pip install 'requant[eval]'"
