"""requant: post-training 2-4 bit quantization of causal LMs with PQI sensitivity and ReQuant.

Public API:
    quantize(model, tokenizer, config) -> QuantizationResult   (quantizes in place)
    load(path_or_model) -> (model, tokenizer)                    (fp model or requant checkpoint)
    evaluate(model, windows, ...) -> EvalResult                  (perplexity, KL)

Importing requant registers its quantization method with transformers, so a requant checkpoint also loads
with plain `AutoModelForCausalLM.from_pretrained(dir)`.
"""

from __future__ import annotations

import os

from .config import QuantConfig
from .errors import CheckpointError, ConfigError, InputError, NumericalError, RequantError
from .eval import EvalResult, evaluate
from .format.hf import register as _register_with_transformers
from .pipeline import quantize
from .results import QuantizationResult

_register_with_transformers()

__version__ = "0.1.0"


def load(
    spec: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    verify: bool = True,
    lm_head: str = "auto",
) -> tuple:
    """Load a requant checkpoint or a plain model (dir, .gguf, cached hub id; None = embedded).

    A checkpoint's files are checked against their recorded sha256s unless `verify=False`. `lm_head`: "auto"
    serves a checkpoint's embeddings and output projection from their stored 16 bits (computing in fp32; a plain
    model as loaded), "16bit" the same for any model whose values fit, "int8" the output projection in int8 with
    per-row scales (lossy, opt-in), "fp32" as loaded."""
    from .format import is_checkpoint, load_quantized
    from .format.serving import serve_dense
    from .loading import load_model, parse_dtype

    if spec is not None and is_checkpoint(spec):
        # quantized layers are packed QuantLinear modules
        return load_quantized(spec, device=device, verify=verify, dtype=parse_dtype(dtype), lm_head=lm_head)
    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    serve_dense(model, lm_head, compute_dtype=parse_dtype(dtype))
    return model, tokenizer


__all__ = [
    "CheckpointError",
    "ConfigError",
    "EvalResult",
    "InputError",
    "NumericalError",
    "QuantConfig",
    "QuantizationResult",
    "RequantError",
    "__version__",
    "evaluate",
    "load",
    "quantize",
]
