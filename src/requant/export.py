"""Export a requant checkpoint as a plain transformers checkpoint of its dequantized weights Ŵ.

Each QuantLinear becomes an nn.Linear holding Ŵ = dense codes through their tables + the sparse residual, exactly
the matrix QuantLinear's reference path multiplies by (QuantLinear.dequantize), cast once to the export dtype.
The result loads with plain `AutoModelForCausalLM.from_pretrained` (no requant needed), so vLLM, llama.cpp's
converter or another harness can evaluate requant's quality while no engine runs the packed layers. It is as
large as a 16-bit (or fp32) model: the export trades the packed size for portability.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, InputError
from .format import is_checkpoint, quant_linears
from .format.qlinear import QuantExperts
from .io import atomic_dir
from .loading import parse_dtype
from .model import is_transposed_linear

EXPORT_DTYPES = ("fp16", "bf16", "fp32")


def dequantized_state(model: nn.Module, dtype: torch.dtype, plain: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict as a plain model has it: each QuantLinear's packed tensors replaced by its
    `weight` Ŵ (and `bias`), floating-point tensors cast to `dtype`, integer buffers kept as they are.

    Units stored otherwise in the plain model `plain` (an empty one of the same architecture) take its layout:
    a transposed linear (Conv1D) gets Ŵᵀ, the experts of a QuantExperts are stacked back into the 3-D parameter."""
    quantized = dict(quant_linears(model))
    fused = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    state: dict[str, torch.Tensor] = {}
    for name, mod in quantized.items():
        if name.rpartition(".")[0] in fused:
            continue  # stacked below
        w = mod.dequantize()  # fp32 Ŵ, one rounding to the export dtype
        if plain is not None and is_transposed_linear(plain.get_submodule(name)):
            w = w.T
        state[f"{name}.weight"] = w.to(dtype).contiguous()
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach().to(dtype)
    for name, experts in fused.items():
        mats = [e.dequantize() for e in experts._modules.values()]  # type: ignore[union-attr]
        state[name] = torch.stack([m.T if experts.transposed else m for m in mats]).to(dtype)
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in quantized:
            continue  # a QuantLinear's qweight, tables, CSR arrays: replaced by Ŵ above
        state[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    return state


def plain_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A new transformers model of `model`'s architecture with plain nn.Linear layers holding Ŵ in `dtype`,
    its config free of any quantization_config (so nothing asks a loader for requant)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dequantized_state(model, dtype, plain)
    plain.load_state_dict(state, strict=True, assign=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    missing = [k for k, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if missing:  # load_state_dict(strict=True) already names missing keys; this guards non-persistent buffers
        raise InputError(f"the dequantized model lacks tensor {missing[0]}")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        plain.generation_config = copy.deepcopy(gen)
    return plain.eval()


def export_dequantized(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "fp16", force: bool = False
) -> tuple[Path, int]:
    """Write the plain checkpoint of `checkpoint`'s Ŵ (plus tokenizer and generation config) to `out`
    atomically; returns (out, number of dequantized layers). An existing `out` is replaced only with `force`."""
    from . import load

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use one of {', '.join(EXPORT_DTYPES)}")
    src, out = Path(checkpoint), Path(out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"-o {str(out)!r} is the checkpoint itself; export to another directory")
    if out.exists() and not force:
        raise InputError(f"{str(out)!r} already exists; pass --force to replace it")
    if not is_checkpoint(src):
        raise InputError(f"{str(src)!r} is not a requant checkpoint (nothing to dequantize)")
    model, tokenizer = load(src, lm_head="fp32")  # the upcast dense tensors, as a plain model holds them
    n = sum(1 for _ in quant_linears(model))
    if n == 0:
        raise InputError(f"{str(src)!r} is not a requant checkpoint (it has no quantized layer to dequantize)")
    plain = plain_model(model, parse_dtype(dtype))
    del model
    try:
        with atomic_dir(out, replace=force) as tmp:
            plain.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
    except OSError as e:  # e.g. out of disk: atomic_dir has removed the partial copy
        raise InputError(f"cannot write {str(out)!r}: {e.strerror or e}; nothing was written") from None
    return out, n
