"""A lean batch-1 decode loop: static KV cache, preallocated step inputs, optional torch.compile of the step.

`transformers`' `generate` rebuilds its bookkeeping for every token (a growing DynamicCache concatenated per layer,
logits processors, stopping criteria, output objects). For one sequence on a CPU that costs as much as the
matmuls of a small quantized model. `StaticDecoder` keeps, for one model:
- a `StaticCache` of `max_len` positions, allocated once and reset between prompts (no per-token cache growth);
- the step's inputs (token id, position) as preallocated tensors updated in place, logits of the last position
  only (`logits_to_keep=1`), the argmax written into the next step's input tensor;
- optionally the step compiled with `torch.compile` (inductor's C++ backend, so it needs a C++ compiler; the
  quantized layers enter the graph as the custom ops of format.ops). Without a compiler, or when compilation
  fails, it runs eagerly with a warning: the result is the same, only slower.
Greedy only; its tokens equal `model.generate(do_sample=False)` on the same model (tested), up to the rare
near-tie that a different attention reduction length (max_len keys, masked) can flip.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError
from .format import ops

COMPILE_CHOICES = ("off", "on", "auto")


# generation-config settings that make transformers' greedy decoding differ from a plain argmax, with the value
# that switches each off
_PROCESSORS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


def plain_greedy(generation_config: object | None) -> bool:
    """True when the model's generation config asks for nothing but argmax decoding (min_length aside, which
    is checked too): then StaticDecoder produces what `generate(do_sample=False)` does."""
    if generation_config is None:
        return True
    if any(getattr(generation_config, k, off) not in (off, None) for k, off in _PROCESSORS.items()):
        return False
    return not getattr(generation_config, "min_length", 0)


def compiler_available() -> bool:
    """True when a C++ compiler for torch.compile's CPU backend (inductor) is on PATH."""
    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


class StaticDecoder:
    """Greedy batch-1 decoding of one model with a static KV cache of `max_len` positions."""

    def __init__(self, model: nn.Module, max_len: int, *, compile: str = "off") -> None:
        from transformers import StaticCache

        if compile not in COMPILE_CHOICES:
            raise ConfigError(f"compile {compile!r} is not one of {', '.join(COMPILE_CHOICES)}")
        if max_len < 2:
            raise ConfigError(f"max_len {max_len} must be at least 2")
        self.model, self.max_len = model, max_len
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.compiled = False
        self._step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._forward_step
        if compile == "on" or (compile == "auto" and compiler_available()):  # auto: eager without a compiler
            self._compile()

    def _forward_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, position_ids=position, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _compile(self) -> None:
        if not compiler_available():
            raise ConfigError("--compile on: torch.compile needs a C++ compiler (c++, g++ or clang++) on PATH")
        ops.prepare(self.model)
        self._step = torch.compile(self._forward_step, dynamic=False, fullgraph=False)
        self.compiled = True

    def _run_step(self) -> torch.Tensor:
        try:
            return self._step(self.token, self.position)
        except Exception as e:  # any compiler failure: decode eagerly instead, same result
            if not self.compiled:
                raise
            warnings.warn(
                f"requant: torch.compile of the decode step failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "decoding eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            self._step, self.compiled = self._forward_step, False
            return self._step(self.token, self.position)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache, run the prompt (1, P); the greedy next token (1, 1), also the next step's input."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ConfigError(f"the decoder takes one sequence (1, P), got shape {tuple(ids.shape)}")
        if ids.shape[1] < 1 or ids.shape[1] >= self.max_len:
            raise ConfigError(f"a {ids.shape[1]}-token prompt does not fit a {self.max_len}-position cache")
        self.cache.reset()
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        torch.argmax(out.logits[:, -1], dim=-1, keepdim=True, out=self.token)
        self.position.fill_(ids.shape[1])
        return self.token

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feed the current token at the current position; the greedy next token (1, 1), in place."""
        if int(self.position) >= self.max_len:
            raise ConfigError(f"the {self.max_len}-position cache is full")
        logits = self._run_step()
        torch.argmax(logits, dim=-1, keepdim=True, out=self.token)
        self.position += 1
        return self.token

    def generate(
        self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None
    ) -> torch.Tensor:
        """The prompt (1, P) followed by up to `max_new_tokens` greedy tokens (stopping after an EOS), (1, P + n)."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens {max_new_tokens} must be at least 1")
        if ids.shape[-1] + max_new_tokens > self.max_len:
            raise ConfigError(
                f"{ids.shape[-1]} prompt + {max_new_tokens} new tokens exceed the {self.max_len}-position cache"
            )
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        out = torch.empty(1, ids.shape[1] + max_new_tokens, dtype=torch.long, device=self.device)
        out[:, : ids.shape[1]] = ids
        n = ids.shape[1]
        tok = self.prefill(ids)
        for i in range(max_new_tokens):
            out[0, n] = tok[0, 0]
            n += 1
            if int(tok) in eos or i == max_new_tokens - 1:
                break
            tok = self.step()
        return out[:, :n]


def static_timer(
    model: nn.Module, max_len: int, *, compile: str = "off"
) -> Callable[[torch.Tensor, int], tuple[float, float]]:
    """A (prompt, new_tokens) -> (prefill s, decode s) timer over one StaticDecoder of `max_len` positions."""
    dec = StaticDecoder(model, max_len, compile=compile)

    def timer(prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        dec.prefill(prompt)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            dec.step()
        return t1 - t0, time.perf_counter() - t1

    timer.decoder = dec  # type: ignore[attr-defined]
    return timer


def greedy_generate(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | list[int] | None = None,
    compile: str = "off",
) -> torch.Tensor:
    """Greedy continuation of one prompt (1, P) through a StaticDecoder sized for it; (1, P + n) token ids."""
    dec = StaticDecoder(model, ids.shape[1] + max_new_tokens, compile=compile)
    return dec.generate(ids, max_new_tokens, eos_token_id)


__all__ = ["COMPILE_CHOICES", "StaticDecoder", "compiler_available", "greedy_generate", "static_timer"]
