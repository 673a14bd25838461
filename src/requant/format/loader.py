"""Loading a checkpoint as a working model: format v2 through transformers' from_pretrained (requant's
quantizer, format.hf), v0/v1 through format.v1; and the unpacked layers of a loaded model for analysis."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError
from ..results import QuantizationResult, QuantizedLayer
from . import v1
from .checkpoint import (
    CONFIG_FILE,
    _layer_info,
    check_quantization_config,
    read_meta,
    requant_entry,
    tensor_files,
)
from .hf import dense_dtype, register, verification
from .qlinear import QuantLinear
from .serving import SIXTEEN_BIT, serve_dense


def load_quantized(
    path: str | os.PathLike,
    *,
    device: str = "cpu",
    verify: bool = True,
    dtype: torch.dtype = torch.float32,
    lm_head: str = "auto",
) -> tuple[nn.Module, object]:
    """A working transformers model whose quantized layers are QuantLinear modules, and its tokenizer.

    v2 loads through transformers' own `from_pretrained` (requant's quantizer, format.hf); v1/v0 are converted.
    `verify` checks every tensor's recorded sha256 (v2). `lm_head` (format.serving): "auto" serves the
    embeddings and output projection from the 16 bits the checkpoint stores, "int8" the output projection in
    int8, "fp32" keeps the upcast copies."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory")
    if v1.is_v1_checkpoint(path):
        model, tokenizer = v1.load_v1(path, device=device)
        serve_dense(model, lm_head)
        return model, tokenizer
    from transformers import AutoModelForCausalLM

    from ..progress import quiet_transformers

    register()
    qc = requant_entry(path)
    check_quantization_config(str(path / CONFIG_FILE), qc)
    tensor_files(path)  # safetensors only: a directory with just pytorch_model.bin is refused here
    stored = getattr(torch, str(qc.get("dense_dtype", "")), None)
    stored = stored if isinstance(stored, torch.dtype) and stored in SIXTEEN_BIT and dtype == torch.float32 else None
    serve = stored if lm_head != "fp32" else None  # loaded straight into 16-bit parameters: no fp32 copy
    with quiet_transformers(), verification(verify), dense_dtype(serve):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, device_map={"": device}, local_files_only=True
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"cannot load checkpoint {str(path)!r}: {str(e).splitlines()[0]}") from None
        tokenizer = _tokenizer(path)
    model.eval()
    serve_dense(model, lm_head, stored_dtype=stored, compute_dtype=dtype)
    return model, tokenizer


def _tokenizer(path: Path) -> object:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer files in {str(path)!r} are unreadable: {e}") from None


def quantized_layers(model: nn.Module, table: Mapping[str, Any]) -> Iterator[tuple[str, QuantizedLayer]]:
    """The unpacked QuantizedLayer of every QuantLinear of a loaded model."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod.quantized_layer(_layer_info(name, table.get(name, {}), mod.layout))


def load_checkpoint(
    path: str | os.PathLike, *, device: str = "cpu", verify: bool = True
) -> tuple[nn.Module, object, QuantizationResult]:
    """load_quantized plus the unpacked QuantizationResult (for analysis; the model holds packed layers)."""
    path = Path(path)
    model, tokenizer = load_quantized(path, device=device, verify=verify)
    meta = read_meta(path)
    layers = dict(quantized_layers(model, meta["layers"]))
    result = QuantizationResult(QuantConfig.from_dict(meta["config"]), layers, meta.get("report", {}))
    return model, tokenizer, result
