"""Format v1 and v0 checkpoints, read and converted to the current layout on load.

v1 (requant 0.1): `requant.json` (format version, per-layer table, QuantConfig, report), `quantized.safetensors`
(packed codes as `<layer>.qweight`, 2-D, plus tables and CSR residuals) and `model.safetensors` (every other
parameter, usually fp32). v0: unpacked uint8 codes and a flat int32 sparse index. Both read into the same
(layout, tensors) pairs as format v2, tensors under v2 names; `requant convert` writes them out as v2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError
from ..io import read_json
from ..model import LayerInfo
from ..quantizers import QuantizedTensor
from ..results import QuantizedLayer
from ..sparse import SparseResidual
from .files import Header, read_header
from .layout import LayerLayout, check_specs, check_table_summary, check_values, encode_layer, tensor_name
from .names import QWEIGHT, V1_QWEIGHT
from .qlinear import swap_in

META_FILE = "requant.json"
DENSE_FILE = "model.safetensors"
QUANT_FILE = "quantized.safetensors"
CONFIG_FILE = "config.json"
VERSIONS = (0, 1)


def is_v1_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def _v2_suffix(suffix: str) -> str:
    return QWEIGHT if suffix == V1_QWEIGHT else suffix


def _v1_suffix(suffix: str) -> str:
    return V1_QWEIGHT if suffix == QWEIGHT else suffix


def _v2_shape(suffix: str, shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """v1 stored the packed codes 2-D (out, chunks·bits); v2 names the chunk axis: (out, chunks, bits)."""
    if suffix != V1_QWEIGHT or len(shape) != 2 or shape[1] % bits:
        return shape
    return (shape[0], shape[1] // bits, bits)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    read_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is unreadable or truncated: {e}") from None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """requant.json of a checkpoint, with its format version checked."""
    path = Path(path)
    try:
        meta = read_json(path / META_FILE)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path / META_FILE)!r} is unreadable: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise CheckpointError(f"{str(path / META_FILE)!r} has no 'layers' table")
    version = meta.get("format_version")
    if version not in VERSIONS:
        raise CheckpointError(
            f"{str(path / META_FILE)!r}: format version {version!r} is unknown; this requant reads "
            f"versions {', '.join(map(str, VERSIONS))} (a newer requant wrote it?)"
        )
    return meta


def layouts_of(path: str | os.PathLike, meta: dict[str, Any]) -> dict[str, LayerLayout]:
    """Each quantized layer's layout, from requant.json (v0 entries are described in v1 terms)."""
    where = str(Path(path) / META_FILE)
    return {name: LayerLayout.from_meta(lm, f"{where}: layer {name}") for name, lm in meta["layers"].items()}


def check_header(path: str | os.PathLike, meta: dict[str, Any], header: Header) -> dict[str, LayerLayout]:
    """Every v1 layer's tensors in the header with the layout's dtypes and shapes; config.json agrees."""
    path = Path(path)
    file = str(path / QUANT_FILE)
    layouts = layouts_of(path, meta)
    owned: set[str] = set()
    for name, layout in layouts.items():
        found = {
            _v2_suffix(k[len(name) + 1 :]): (dt, _v2_shape(k[len(name) + 1 :], shape, layout.bits))
            for k, (dt, shape, _) in header.items()
            if k.startswith(name + ".") and "." not in k[len(name) + 1 :]
        }
        check_specs(file, name, layout, found)
        owned.update(tensor_name(name, _v1_suffix(s)) for s in found)
    stray = sorted(set(header) - owned)
    if stray:
        raise CheckpointError(f"{file!r}: tensor {stray[0]} belongs to no quantized layer in {META_FILE}")
    _check_config(path, meta, layouts)
    return layouts


def _check_config(path: Path, meta: dict[str, Any], layouts: dict[str, LayerLayout]) -> None:
    """config.json's quantization_config must agree with requant.json and the stored tensors."""
    file = str(path / CONFIG_FILE)
    try:
        qc = read_json(path / CONFIG_FILE).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{file!r} is unreadable: {e}") from None
    if not isinstance(qc, dict) or qc.get("quant_method") != "requant":
        raise CheckpointError(f"{file!r} has no requant quantization_config")
    if qc.get("format_version") != meta["format_version"]:
        raise CheckpointError(
            f"{file!r}: quantization_config.format_version {qc.get('format_version')!r} differs from "
            f"{META_FILE}'s {meta['format_version']!r}"
        )
    check_table_summary(repr(file), qc, layouts)


def read_quantized(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, tuple[LayerLayout, dict[str, torch.Tensor]]]]:
    """requant.json and each quantized layer's stored v1 tensors (suffix → tensor), fully validated."""
    path = Path(path)
    meta = read_meta(path)
    if meta["format_version"] == 0:
        return meta, _read_v0(path, meta)
    layouts = check_header(path, meta, read_header(path / QUANT_FILE))
    tensors = _load_tensors(path / QUANT_FILE)
    out = {}
    for name, layout in layouts.items():
        specs = layout.tensors()
        own = {s: tensors[tensor_name(name, _v1_suffix(s))].view(spec.shape) for s, spec in specs.items()}
        check_values(str(path / QUANT_FILE), name, layout, own)
        out[name] = (layout, own)
    return meta, out


def _layer_info(name: str, lm: dict[str, Any], layout: LayerLayout) -> LayerInfo:
    kind = lm.get("kind_in_block", name.rsplit(".", 1)[-1])
    return LayerInfo(name, lm.get("block"), kind, layout.out_features, layout.in_features)


# ----------------------------------------------------------------------------------------------------------
# Version 0 (unpacked codes, flat sparse index): converted to v1 tensors on load


def _read_v0(path: Path, meta: dict[str, Any]) -> dict[str, tuple[LayerLayout, dict[str, torch.Tensor]]]:
    file = path / QUANT_FILE
    tensors = _load_tensors(file)
    out = {}
    layouts = {}
    for name, lm in meta["layers"].items():
        shape = tuple(lm.get("shape", ()))
        try:
            own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            index, value = own.pop("sparse_index"), own.pop("sparse_value")
            dense = QuantizedTensor.from_state(lm, own)
        except KeyError as e:
            raise CheckpointError(f"{str(file)!r}: tensor {name}.{e.args[0]} is missing") from None
        _validate_v0_layer(file, name, shape, lm, dense, index, value)
        sparse = SparseResidual(index.long(), value, shape)  # type: ignore[arg-type]
        layout = LayerLayout.from_meta({**lm, "sym": lm.get("sym", False)}, f"{file}: layer {name}")
        layout, v1 = encode_layer(QuantizedLayer(_layer_info(name, lm, layout), dense, sparse))
        out[name] = (layout, v1)
        layouts[name] = layout
    _check_config(path, meta, layouts)
    return out


def _validate_v0_layer(
    file: Path,
    name: str,
    shape: tuple[int, ...],
    lm: dict[str, Any],
    dense: QuantizedTensor,
    index: torch.Tensor,
    value: torch.Tensor,
) -> None:
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{str(file)!r}: {msg}")

    if len(shape) != 2 or tuple(dense.codes.shape) != shape or dense.codes.dtype != torch.uint8:
        raise bad(
            f"tensor {name}.codes has shape {tuple(dense.codes.shape)} {dense.codes.dtype}, expected {shape} uint8"
        )
    if dense.bits not in (2, 3, 4, 8) or int(dense.codes.max()) >= 2**dense.bits:
        raise bad(f"tensor {name}.codes holds values ≥ 2^{dense.bits}; the metadata's bits are wrong")
    for tname, t in dense.tables().items():
        if t.dtype != torch.float16 or t.dim() != 2 or t.shape[0] != shape[0]:
            raise bad(f"tensor {name}.{tname} has shape {tuple(t.shape)} {t.dtype}, expected ({shape[0]}, ...) fp16")
        if not torch.isfinite(t).all():
            raise bad(f"tensor {name}.{tname} holds NaN or Inf")
    lut = getattr(dense, "lut", None)
    if lut is not None and lut.shape[1] != 2**dense.bits:
        raise bad(f"tensor {name}.lut has {lut.shape[1]} entries per row, bits={dense.bits} needs {2**dense.bits}")
    gs = lm.get("group_size")
    if gs is not None and (shape[1] % gs or dense.scale.shape[1] != shape[1] // gs):  # type: ignore[attr-defined]
        raise bad(f"tensor {name}.scale does not match group size {gs} and width {shape[1]}")
    if index.dtype != torch.int32 or value.dtype != torch.float16 or index.shape != value.shape:
        raise bad(f"sparse tensors of {name} must be int32 index and fp16 value of equal length")
    if index.numel() != lm["nnz"] or (
        index.numel() and (int(index.min()) < 0 or int(index.max()) >= shape[0] * shape[1])
    ):
        raise bad(f"sparse index of {name} is out of range or does not match nnz {lm['nnz']}")
    if index.numel() > 1 and bool((index[1:] <= index[:-1]).any()):
        raise bad(f"sparse index of {name} is not strictly increasing")


def load_v1(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, object]:
    """A working transformers model whose quantized layers are QuantLinear modules, and its tokenizer.

    The model skeleton is built without allocating weights; only the stored tensors take memory.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..progress import quiet_transformers

    path = Path(path)
    _, stored = read_quantized(path)
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{str(path / CONFIG_FILE)!r} is unreadable: {e}") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tokenizer = None
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"tokenizer files in {str(path)!r} are unreadable: {e}") from None
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
    for name, (layout, tensors) in stored.items():
        ql = swap_in(model, name, layout, repr(str(path / META_FILE)))
        for suffix, t in tensors.items():
            setattr(ql, suffix, t)
    dense_file = path / DENSE_FILE
    state = _load_tensors(dense_file)
    expected = {k for k, _ in model.state_dict(keep_vars=True).items()}
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise CheckpointError(f"{str(dense_file)!r}: tensor {unexpected[0]} is not in the model of {CONFIG_FILE}")
    own = dict(model.state_dict(keep_vars=True))
    for k, t in state.items():
        want = own[k]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{str(dense_file)!r}: tensor {k} has shape {tuple(t.shape)}, the model expects {tuple(want.shape)}"
            )
        if t.dtype != want.dtype:
            if not (t.is_floating_point() and want.is_floating_point()):
                raise CheckpointError(f"{str(dense_file)!r}: tensor {k} is {t.dtype}, the model expects {want.dtype}")
            state[k] = t.to(want.dtype)  # e.g. 16-bit embeddings into the fp32 model
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for k, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{str(dense_file)!r}: tensor {k} is missing")
    model.to(device).eval()
    return model, tokenizer
