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
`FusedDecoder` replaces the step by one C call per token (requant.fused) for models with the Llama block layout.
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
# auto: the fused C step (requant.fused) where the model's structure allows it, else the static decoder
DECODER_CHOICES = ("auto", "fused", "static")


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

    kind = "static"  # what decodes (reports)

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

    def _check_prompt(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ConfigError(f"the decoder takes one sequence (1, P), got shape {tuple(ids.shape)}")
        if ids.shape[1] < 1 or ids.shape[1] >= self.max_len:
            raise ConfigError(f"a {ids.shape[1]}-token prompt does not fit a {self.max_len}-position cache")

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache, run the prompt (1, P); the greedy next token (1, 1), also the next step's input."""
        self._check_prompt(ids)
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


class FusedDecoder(StaticDecoder):
    """Greedy batch-1 decoding with the fused C step of requant.fused (prefill through the model's blocks into the
    StaticCache the step then extends, its first token from the fused head). Construction raises
    fused.Unsupported for models outside its structure.
    The first decode step after construction also runs through the model's blocks: unless the final hidden states
    agree (fused.SELF_CHECK_RTOL), a warning says so and the static decoder's step takes over."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        from .fused import LlamaStep

        self.fused_step = LlamaStep(model, max_len)  # raises Unsupported first, before the cache is allocated
        super().__init__(model, max_len)
        self.fused, self.checked = True, False

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "fused" if self.fused else "static"

    @property
    def logits(self) -> torch.Tensor:
        """The last fused step's next-token logits (vocab,), overwritten by the next step: the int8 screen's where
        the head has one (its argmax is the head's own; fused.LlamaStep.run), else the head's."""
        return self.fused_step.logits

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """As StaticDecoder.prefill, but the first token comes from the fused head (its int8 screen) on the blocks'
        last hidden state: the same argmax, without a full pass over a 16-bit vocabulary-sized head."""
        from .fused import Unsupported

        if not self.fused:
            return super().prefill(ids)
        self._check_prompt(ids)
        self.cache.reset()
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        hidden = self._hidden(ids, positions)
        try:
            self.fused_step.bind(self.cache)
        except Unsupported as e:
            self._give_up(str(e))
            return super().prefill(ids)
        self.token.fill_(self.fused_step.head(hidden[0, -1]))
        self.position.fill_(ids.shape[1])
        return self.token

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder blocks + final norm (no head) over ids at positions, extending the cache; (1, P, hidden)."""
        out = self.model.get_decoder()(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True)
        return out.last_hidden_state

    def _sync_cache(self, pos: int) -> None:
        """Set the StaticCache's own fill counters to `pos`: the fused step writes keys and values without them,
        and a model forward writes where its counter points."""
        for layer in self.cache.layers:
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor):
                n.fill_(pos)
            elif n is not None:
                layer.cumulative_length = pos

    def _give_up(self, why: str) -> None:
        warnings.warn(
            f"requant: fused decode step off ({why}); decoding with the static decoder", RuntimeWarning, stacklevel=3
        )
        self.fused = False

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        from .fused import SELF_CHECK_RTOL

        pos = int(self.position)
        if not self.fused or pos >= self.max_len:  # the static step (it refuses a full cache)
            return super().step()
        nxt = self.fused_step.run(int(self.token), pos)
        if not self.checked:  # the blocks' output must match the model's own, else the static step goes on
            self.checked = True
            self._sync_cache(pos)
            ref = self._hidden(self.token, self.position)[0, -1].float()  # rewrites this position's keys
            err = (self.fused_step.hidden - ref).abs().max().item()
            if not err <= SELF_CHECK_RTOL * (1.0 + ref.abs().max().item()):
                self._give_up(f"its hidden state differs from the model's forward by {err:.3g}")
                self._sync_cache(pos)
                return super().step()  # this position once more, through the whole model
        self.token.fill_(nxt)
        self.position += 1
        return self.token


def make_decoder(model: nn.Module, max_len: int, decoder: str = "auto", *, compile: str = "off") -> StaticDecoder:
    """The greedy decoder of `max_len` positions for `model`: "fused" (requant.fused; ConfigError naming why when the
    model is outside its structure), "static", or "auto" = fused when possible, else static. Asking to compile
    (`compile="on"`) means the static decoder's step: the fused step is C already."""
    if decoder not in DECODER_CHOICES:
        raise ConfigError(f"decoder {decoder!r} is not one of {', '.join(DECODER_CHOICES)}")
    if decoder == "static" or (decoder == "auto" and compile == "on"):
        return StaticDecoder(model, max_len, compile=compile)
    from .fused import Unsupported

    try:
        return FusedDecoder(model, max_len)
    except Unsupported as e:
        if decoder == "fused":
            raise ConfigError(f"--decoder fused: {e}") from None
        return StaticDecoder(model, max_len, compile=compile)


def static_timer(
    model: nn.Module, max_len: int, *, compile: str = "off", decoder: str = "static"
) -> Callable[[torch.Tensor, int], tuple[float, float]]:
    """A (prompt, new_tokens) -> (prefill s, decode s) timer over one decoder (`make_decoder`) of `max_len`
    positions."""
    dec = make_decoder(model, max_len, decoder, compile=compile)

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
    decoder: str = "auto",
) -> torch.Tensor:
    """Greedy continuation of one prompt (1, P) through a decoder sized for it (`make_decoder`); (1, P + n) ids."""
    dec = make_decoder(model, ids.shape[1] + max_new_tokens, decoder, compile=compile)
    return dec.generate(ids, max_new_tokens, eos_token_id)


__all__ = [
    "COMPILE_CHOICES",
    "DECODER_CHOICES",
    "FusedDecoder",
    "StaticDecoder",
    "compiler_available",
    "greedy_generate",
    "make_decoder",
    "static_timer",
]
