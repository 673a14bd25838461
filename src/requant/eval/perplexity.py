"""Perplexity = exp(mean token NLL) over non-overlapping windows, optionally with KL to a reference model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..errors import NumericalError
from ..loss import token_nll
from ..progress import bar


@dataclass(frozen=True)
class EvalResult:
    """Perplexity of one text; `kl` is the mean per-token KL(p_ref || p_model) in nats, if requested; `bos`:
    whether every window starts with a BOS token (requant.data.window_bos), whose position is never scored."""

    data: str
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    kl: float | None = None
    bos: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def kl_sum(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(softmax(ref) || softmax(logits)) in nats, computed in fp32."""
    lp_ref = F.log_softmax(logits_ref.float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    data: str = "text",
    reference: nn.Module | None = None,
    batch_size: int = 1,
    bos: bool = False,
) -> EvalResult:
    """Perplexity of `model` over `windows` (k, L); with `reference`, also the mean per-token KL to it.

    Every position but the last predicts the next token, so the first token of a window is never a target:
    with a BOS first (`bos`, recorded in the result) all L-1 text tokens are scored, else the last L-1.
    """
    nll_total, count, kl_total = 0.0, 0, 0.0
    k, seqlen = windows.shape
    # Under torchrun each rank takes a share of the batches; the sums are all-reduced below.
    starts = [range(0, k, batch_size)[i] for i in distributed.shard(len(range(0, k, batch_size)))]
    pbar = bar(total=sum(len(windows[s : s + batch_size]) for s in starts), desc=f"eval {data}", unit="win")
    for start in starts:
        batch = windows[start : start + batch_size]
        if reference is None:
            nll, n = token_nll(model, batch)
        else:
            dev = next(model.parameters()).device
            logits = model(input_ids=batch.to(dev), use_cache=False).logits[:, :-1]
            ref_dev = next(reference.parameters()).device
            ref = reference(input_ids=batch.to(ref_dev), use_cache=False).logits[:, :-1].to(dev)
            targets = batch[:, 1:].to(dev)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            n = targets.numel()
            kl_total += float(kl_sum(ref, logits))
        if not math.isfinite(float(nll)):
            raise NumericalError(f"non-finite loss on {data} window {start} (the model produces NaN/Inf)")
        nll_total += float(nll)
        count += n
        pbar.update(len(batch))
    pbar.close()
    nll_total, count, kl_total = distributed.all_reduce_scalars(nll_total, count, kl_total)
    count = int(count)
    mean = nll_total / count
    return EvalResult(
        data=data,
        perplexity=math.exp(mean),
        nll=mean,
        tokens=count,
        windows=k,
        seqlen=seqlen,
        kl=None if reference is None else kl_total / count,
        bos=bos,
    )
