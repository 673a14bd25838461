"""Batch-1 inference speed of several models measured side by side: prefill and greedy decode tokens/s.

Models are measured in rotating order within each repeat, so a slow phase of a shared machine hits all of
them alike; figures are medians over repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class SpeedResult:
    """Per-repeat tokens/s of one model; medians as properties."""

    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)

    @property
    def prefill(self) -> float:
        return statistics.median(self.prefill_tok_s)

    @property
    def decode(self) -> float:
        return statistics.median(self.decode_tok_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefill_tok_s": self.prefill,
            "decode_tok_s": self.decode,
            "prefill_tok_s_runs": self.prefill_tok_s,
            "decode_tok_s_runs": self.decode_tok_s,
        }


Timer = Callable[[torch.Tensor, int], tuple[float, float]]  # (prompt, new tokens) -> (prefill s, decode s)


@torch.inference_mode()
def time_generation(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds for the prompt (1, P), decode seconds for `new_tokens` greedy tokens) through the model's
    own forward and DynamicCache, as transformers' generate runs it (logits of the last position only)."""
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    cache = out.cache
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(nxt, cache=cache, use_cache=True)
        cache = out.cache
        nxt = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure(
    models: dict[str, nn.Module | Timer],
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, SpeedResult]:
    """Prefill and decode tokens/s of every model (or timer: a decode loop of its own), alternating models within
    each repeat."""
    names = list(models)
    timers: dict[str, Timer] = {
        n: (lambda p, k, m=m: time_generation(m, p, k)) if isinstance(m, nn.Module) else m for n, m in models.items()
    }
    for name in names:  # warm-up: kernel build, allocator, first-call overheads (and a compiled step's compile)
        timers[name](prompt, 2)
    results = {n: SpeedResult() for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            pre, dec = timers[name](prompt, new_tokens)
            results[name].prefill_tok_s.append(prompt.shape[1] / pre)
            results[name].decode_tok_s.append(new_tokens / dec)
        if progress is not None:
            progress(r)
    return results


def random_prompt(vocab_size: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """A (1, tokens) prompt of random token ids (speed does not depend on the text)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, tokens), generator=g)
