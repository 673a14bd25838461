"""requant inside transformers: a quantization config and an HfQuantizer under quant_method "requant".

After `import requant`, `AutoModelForCausalLM.from_pretrained(dir)` on a format-v2 checkpoint
- parses config.json's `quantization_config` into RequantConfig (the layer table with every layout),
- before any tensor is read: checks the version and the table, checks that every quantized tensor is in the
  safetensors files with the layout's dtype and shape (transformers' loader would leave a missing buffer at
  its initial value without a word), and verifies the files' sha256s (format.files),
- swaps each listed nn.Linear for a QuantLinear whose buffers carry the stored names, so transformers' own
  loader fills them (any dtype=, device_map=),
- after loading, refuses non-finite tables and malformed CSR residuals.
`model.save_pretrained(dir2)` writes the same layout back, with fresh hashes in each file's metadata.
Without requant imported, transformers skips the unknown method and then fails on `<layer>.weight`, whose
packed (out, ceil(in/8), bits) shape no nn.Linear has: never a model with random layers.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointError
from .checkpoint import QUANT_METHOD, check_files, check_quantization_config
from .files import DIGESTS_KEY, TABLE_KEY, table_digest, tensor_digest, verify_files
from .layout import FORMAT_VERSION, LayerLayout, check_values
from .qlinear import QuantLinear, install
from .serving import keep_stored_dtype

_VERIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("requant_verify", default=True)
# the 16-bit dtype the embeddings / output projection are loaded in (format.serving), None: the model's dtype
_DENSE_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("requant_dense", default=None)


@contextlib.contextmanager
def dense_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Load the embeddings and output projection in `dtype` (their stored 16 bits) for loads inside the block."""
    token = _DENSE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _DENSE_DTYPE.reset(token)


@contextlib.contextmanager
def verification(enabled: bool) -> Iterator[None]:
    """Turn sha256 verification of checkpoint files on or off for loads inside the block."""
    token = _VERIFY.set(enabled)
    try:
        yield
    finally:
        _VERIFY.reset(token)


class RequantConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a requant checkpoint; every field round-trips unchanged."""

    def __init__(self, layers: dict[str, Any] | None = None, format_version: int = FORMAT_VERSION, **kwargs: Any):
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.format_version = format_version
        self.layers = dict(layers or {})
        kwargs.pop("quant_method", None)
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__))  # a deep, JSON-clean copy


class RequantHfQuantizer(HfQuantizer):
    """Loads (and re-saves) pre-quantized requant checkpoints; it never quantizes on the fly."""

    requires_calibration = True
    quantization_config: RequantConfig

    def __init__(self, quantization_config: RequantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.layouts: dict[str, LayerLayout] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise CheckpointError(
                "requant quantizes with `requant quantize` / requant.quantize(), not through from_pretrained"
            )
        self.layouts = check_quantization_config("quantization_config", self.quantization_config.to_dict())

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        files = [Path(f) for f in kwargs.get("checkpoint_files") or ()]
        pickled = [f for f in files if f.suffix != ".safetensors"]
        if pickled:
            raise CheckpointError(
                f"{str(pickled[0])!r}: requant checkpoints are safetensors only; pickle files are refused"
            )
        stored: Mapping[str, Any] = {}
        if files:
            stored, _ = check_files(files[0].parent, self.layouts, files)
            if _VERIFY.get():
                verify_files(files, self.quantization_config.layers)
        # Units first: a fused expert parameter becomes a module whose packed tensors are the stored ones.
        install(model, self.layouts, "config.json quantization_config")
        if files:
            _check_dense_present(model, stored, set(self.layouts), files[0].parent)
        if _DENSE_DTYPE.get() is not None:
            keep_stored_dtype(model, _DENSE_DTYPE.get())

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, layout in self.layouts.items():
            mod = model.get_submodule(name)
            assert isinstance(mod, QuantLinear)
            stored = mod.stored_tensors()
            for suffix, t in stored.items():
                if t.is_meta:
                    raise CheckpointError(f"tensor {name}.{suffix} was not loaded from the checkpoint")
            check_values("checkpoint", name, layout, {k: t.cpu() for k, t in stored.items()})
        return model

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, str]]:
        """Hashes for `save_pretrained`: every tensor of the state dict, and the layer table."""
        digests = {k: tensor_digest(v) for k, v in model.state_dict().items()}
        return None, {
            "requant_format": str(FORMAT_VERSION),
            DIGESTS_KEY: json.dumps(digests, sort_keys=True),
            TABLE_KEY: table_digest(self.quantization_config.layers),
        }

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _check_dense_present(model: nn.Module, stored: Mapping[str, Any], quantized: set[str], where: Path) -> None:
    """Every parameter and persistent buffer of the model is in the files (tied copies aside): transformers'
    loader would leave a missing one at its random initial value with only a warning."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for key in model.state_dict(keep_vars=True):
        prefix, _, leaf = key.rpartition(".")
        if key in tied or (prefix in quantized and leaf != "bias"):
            continue
        if key not in stored:
            raise CheckpointError(f"checkpoint {str(where)!r}: tensor {key} is missing from its safetensors files")


def register() -> None:
    """Register RequantConfig and RequantHfQuantizer with transformers (again is a no-op)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not RequantConfig:
        if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:  # another copy of requant registered first
            del AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
        register_quantization_config(QUANT_METHOD)(RequantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not RequantHfQuantizer:
        if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
            del AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
        register_quantizer(QUANT_METHOD)(RequantHfQuantizer)
