"""Work done in each process of the 2-process gloo tests (importable by spawned children: no pytest here).

`compute` is run once in the test process (no process group: the single-process reference) and once in each
of two spawned ranks; both save every figure as tensors so the test compares them exactly or within fp32.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from helpers import byte_tokenizer, tiny_llama

GPTQ = {"base": "gptq", "bits": 3, "group_size": 32}
# Algorithm 1 outliers: each rank fits half the layers' candidates and the tables are gathered.
SQUEEZE = {
    "base": "squeezellm",
    "bits": 3,
    "outliers": 0.5,
    "outlier_select": "adaptive",
    "significant": 0.2,
    "significant_select": "pqi",
}


def windows(n: int = 5, length: int = 24) -> torch.Tensor:
    # An odd count: the ranks get unequal shares (3 and 2), and the PQI batches of 2 split 2:1.
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))


def compute(text_file: str, workdir: str) -> dict[str, torch.Tensor]:
    """Every window sum the library has, and two quantize runs, on a tiny random Llama."""
    from requant.calibration import layer_inputs
    from requant.config import QuantConfig
    from requant.eval.perplexity import evaluate
    from requant.model import get_linear, quantizable_layers
    from requant.pipeline import quantize
    from requant.quantizers import make_quantizer
    from requant.sensitivity import fisher_information, loss, mean_loss_gradient, post_quantization_integral
    from requant.sensitivity.taylor import second_order_hvp

    model, win = tiny_llama(0), windows()
    names = [i.name for i in quantizable_layers(model)]
    w = {n: get_linear(model, n).weight.detach().clone() for n in names}
    rtn = make_quantizer("rtn", 3, 32)
    wq = {n: rtn.fit(w[n]).dequantize() for n in names}
    out: dict[str, torch.Tensor] = {}
    out.update({f"fisher.{n}": t for n, t in fisher_information(model, names, win).items()})
    # One window for two ranks: rank 1 has nothing to sum and must still join the reduction with zeros.
    out.update({f"fisher1.{n}": t for n, t in fisher_information(model, names[:2], win[:1]).items()})
    pqi = post_quantization_integral(model, names, w, wq, win, nodes=3, rule="gauss", batch_size=2)
    out.update({f"pqi.{n}": t for n, t in pqi.scores.items()})
    f, grad = mean_loss_gradient(model, names, win)
    out.update({f"grad.{n}": t for n, t in grad.items()})
    stats = layer_inputs(model, names, win)
    out.update({f"hessian.{n}": s.hessian for n, s in stats.items()})
    ev = evaluate(model, win, batch_size=2)
    hvp = second_order_hvp(model, names, w, wq, win, batch_size=2)
    out["scalars"] = torch.tensor([f, loss(model, win), ev.nll, ev.tokens, hvp, pqi.predicted], dtype=torch.float64)
    tok = byte_tokenizer()
    for tag, settings in (("squeeze", SQUEEZE), ("gptq", GPTQ)):
        config = QuantConfig(**settings, pqi_nodes=2, calib=text_file, nsamples=3, seqlen=32)  # type: ignore[arg-type]
        m = tiny_llama(0)
        res = quantize(m, tok, config, workdir=Path(workdir) / tag)
        for n, layer in res.layers.items():
            _, tensors = layer.dense.to_state()
            out.update({f"{tag}.{n}.{k}": t for k, t in tensors.items()})
            out[f"{tag}.{n}.sparse"] = layer.weight() - layer.dense.dequantize()
    return out


def _count_writes() -> list[str]:
    """Make every WorkDir write on this rank leave a note (non-main ranks must never write)."""
    import requant.workdir as wd

    calls: list[str] = []
    save, write = wd.save_file, wd.write_json_atomic

    def save_file_(tensors, path, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return save(tensors, path, *a, **k)

    def write_json_(path, obj):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return write(path, obj)

    wd.save_file, wd.write_json_atomic = save_file_, write_json_
    return calls


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def numbers_worker(rank: int, world: int, init_file: str, text_file: str, workdir: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    try:
        calls = _count_writes()
        res = compute(text_file, workdir)
        res["writes"] = torch.tensor([len(calls)])
        save_file({k: v.clone().contiguous() for k, v in res.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def failing_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank 1's loss is NaN on its first window; each rank records the error it ends with."""
    from requant import distributed
    from requant.sensitivity import fisher_information

    os.environ["REQUANT_DIST_TIMEOUT_S"] = "60"
    _init(rank, world, init_file)
    model, win = tiny_llama(0), windows()
    names = ["model.layers.0.mlp.down_proj"]

    def nan_loss(m, ids):  # type: ignore[no-untyped-def]
        return m(input_ids=ids).logits.sum() * float("nan"), ids.numel()

    message = "no error"
    try:
        if rank == 1:
            from requant.sensitivity.gradients import gradient_sums

            gradient_sums(model, names, win, loss_fn=nan_loss)
        else:
            fisher_information(model, names, win)
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
    finally:
        distributed.destroy()  # what the CLI does on its way out
    Path(out_dir, f"rank{rank}.txt").write_text(message)
