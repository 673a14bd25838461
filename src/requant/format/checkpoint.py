"""Checkpoints (format v1): packed codes, tables and CSR sparse residuals in safetensors, metadata in JSON.

Layout of a checkpoint directory:
  config.json            the model's transformers config plus `quantization_config` (method, bits, group
                         size, sparse counts, format version)
  model.safetensors      every parameter that is not a quantized weight (embeddings, norms, lm_head, biases)
  quantized.safetensors  per quantized layer the tensors that format.layout lists
  requant.json           format version, per-layer layout metadata, the QuantConfig, bit accounting, report
  tokenizer files, generation_config.json

Version 0 checkpoints (unpacked uint8 codes, flat int32 sparse index) are read and converted on load.
Only safetensors and JSON are ever read: no pickle, no remote code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError, InputError
from ..io import atomic_dir, read_json, write_json_atomic
from ..model import LayerInfo, set_module
from ..quantizers import QuantizedTensor
from ..results import QuantizationResult, QuantizedLayer
from ..sparse import SparseResidual
from .layout import (
    FORMAT_VERSION,
    QWEIGHT,
    READABLE_VERSIONS,
    LayerLayout,
    check_specs,
    check_values,
    encode_layer,
    tensor_name,
)
from .qlinear import QuantLinear

META_FILE = "requant.json"
DENSE_FILE = "model.safetensors"
QUANT_FILE = "quantized.safetensors"
CONFIG_FILE = "config.json"

_ST_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
}

Header = dict[str, tuple[torch.dtype, tuple[int, ...], int]]  # name → (dtype, shape, stored bytes)


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


# ----------------------------------------------------------------------------------------------------------
# Writing


def _unique_state(model: nn.Module, skip_prefixes: set[str]) -> dict[str, torch.Tensor]:
    """Parameters and buffers to store, without the quantized weights and without tied duplicates."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in skip_prefixes and leaf != "bias":
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().cpu().contiguous().clone()
    return out


def quantization_config(result: QuantizationResult) -> dict[str, Any]:
    """The `quantization_config` entry of config.json."""
    bits = result.bit_count()
    c = result.config
    return {
        "quant_method": "requant",
        "format_version": FORMAT_VERSION,
        "base": c.base,
        "bits": c.bits,
        "group_size": c.group_size,
        "sym": c.sym,
        "outliers_percent": c.outliers,
        "significant_percent": c.significant,
        "sparse_entries": bits.sparse_entries,
        "sparse_format": "csr",
        "code_packing": "row-wise little-endian bit stream, 8 codes per `bits` bytes",
        "quantized_layers": len(result.layers),
        "bits_per_weight": bits.bits_per_weight,
    }


def save_checkpoint(
    out: str | os.PathLike,
    model: nn.Module,
    tokenizer: object,
    result: QuantizationResult,
    *,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write the quantized model to `out` atomically; never replace a different checkpoint unless `force`."""
    out = Path(out)
    if out.exists():
        _check_replace(out, result.config, force)
    quant: dict[str, torch.Tensor] = {}
    layers_meta = {}
    stored = 0
    for name, q in result.layers.items():
        layout, tensors = encode_layer(q)
        for suffix, t in tensors.items():
            quant[tensor_name(name, suffix)] = t
        stored += layout.stored_bytes()
        layers_meta[name] = {**layout.to_meta(), "block": q.info.block, "kind_in_block": q.info.kind}
    bits = result.bit_count()
    try:
        _write(out, model, tokenizer, result, quant, layers_meta, stored, bits, metadata)
    except OSError as e:  # e.g. out of disk: atomic_dir has removed the partial copy
        raise CheckpointError(
            f"cannot write checkpoint {str(out)!r}: {e.strerror or e}; nothing was written (a work directory, "
            "if any, is kept: make room and run again with --resume)"
        ) from None
    return out


def _write(
    out: Path,
    model: nn.Module,
    tokenizer: object,
    result: QuantizationResult,
    quant: dict[str, torch.Tensor],
    layers_meta: dict[str, Any],
    stored: int,
    bits: Any,
    metadata: dict[str, Any] | None,
) -> None:
    with atomic_dir(out, replace=True) as tmp:
        save_file(_unique_state(model, set(result.layers)), str(tmp / DENSE_FILE), metadata={"format": "pt"})
        save_file(quant, str(tmp / QUANT_FILE), metadata={"format": "pt", "requant_format": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        cfg = read_json(tmp / CONFIG_FILE)
        cfg["quantization_config"] = quantization_config(result)
        write_json_atomic(tmp / CONFIG_FILE, cfg)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        write_json_atomic(
            tmp / META_FILE,
            {
                "format_version": FORMAT_VERSION,
                "config": result.config.to_dict(),
                "layers": layers_meta,
                "bits": bits.to_dict(),
                "stored_bytes": stored,
                "report": result.report,
                "metadata": metadata or {},
            },
        )


def _check_replace(out: Path, config: QuantConfig, force: bool) -> None:
    if force or (out.is_dir() and not any(out.iterdir())):
        return
    if not is_checkpoint(out):
        raise InputError(f"output {str(out)!r} exists and is not a requant checkpoint; use --force to replace it")
    try:
        old = QuantConfig.from_dict(read_json(out / META_FILE)["config"])
    except Exception:
        raise InputError(f"output {str(out)!r} holds an unreadable checkpoint; use --force to replace it") from None
    diff = old.differences(config)
    if diff:
        raise InputError(
            f"output {str(out)!r} holds a different checkpoint (differs in: {', '.join(diff)}); "
            "use --force to replace it"
        )


# ----------------------------------------------------------------------------------------------------------
# Reading and validation


def read_header(file: Path) -> Header:
    """Tensor names, dtypes, shapes and byte sizes of a safetensors file, checked against the file size."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        out: Header = {}
        end = 0
        for name, h in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(h["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} has unsupported dtype {h['dtype']}")
            begin, stop = (int(v) for v in h["data_offsets"])
            out[name] = (dtype, tuple(int(s) for s in h["shape"]), stop - begin)
            end = max(end, stop)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(file)!r} has a corrupt header: {e}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is truncated: {size} bytes, its header needs {8 + n + end}"
        )
    return out


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
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{str(path / META_FILE)!r}: format version {version!r} is unknown; this requant reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))} (a newer requant wrote it?)"
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
            k[len(name) + 1 :]: (dt, shape)
            for k, (dt, shape, _) in header.items()
            if k.startswith(name + ".") and "." not in k[len(name) + 1 :]
        }
        check_specs(file, name, layout, found)
        owned.update(tensor_name(name, s) for s in found)
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
    for name, layout in layouts.items():
        if qc.get("bits") != layout.bits:
            raise CheckpointError(
                f"{file!r}: quantization_config.bits = {qc.get('bits')!r}, but tensor "
                f"{tensor_name(name, QWEIGHT)} is stored with {layout.bits} bits"
            )
    nnz = sum(lo.nnz for lo in layouts.values())
    if qc.get("sparse_entries") != nnz:
        raise CheckpointError(
            f"{file!r}: quantization_config.sparse_entries = {qc.get('sparse_entries')!r}, but the "
            f"stored sparse tensors hold {nnz} entries"
        )


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
        own = {s: tensors[tensor_name(name, s)] for s in layout.tensors()}
        check_values(str(path / QUANT_FILE), name, layout, own)
        out[name] = (layout, own)
    return meta, out


def _layer_info(name: str, lm: dict[str, Any], layout: LayerLayout) -> LayerInfo:
    kind = lm.get("kind_in_block", name.rsplit(".", 1)[-1])
    return LayerInfo(name, lm.get("block"), kind, layout.out_features, layout.in_features)


def read_layers(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, QuantizedLayer]]:
    """The metadata and every quantized layer of a checkpoint (unpacked), validated."""
    from .layout import decode_layer

    meta, stored = read_quantized(path)
    layers = {
        name: decode_layer(layout, tensors, _layer_info(name, meta["layers"][name], layout))
        for name, (layout, tensors) in stored.items()
    }
    return meta, layers


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


# ----------------------------------------------------------------------------------------------------------
# Loading a model


def load_quantized(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, object]:
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
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != (
            layout.out_features,
            layout.in_features,
        ):
            raise CheckpointError(
                f"{str(path / META_FILE)!r}: layer {name} ({layout.out_features}×{layout.in_features}) "
                f"is not a linear layer of that shape in the model of {CONFIG_FILE}"
            )
        ql = QuantLinear(layout, bias=lin.bias is not None, name=name)
        for suffix, t in tensors.items():
            setattr(ql, suffix, t)
        set_module(model, name, ql)
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


def load_checkpoint(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, object, QuantizationResult]:
    """load_quantized plus the unpacked QuantizationResult (for analysis; the model holds packed layers)."""
    path = Path(path)
    model, tokenizer = load_quantized(path, device=device)
    meta = read_meta(path)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            layers[name] = mod.quantized_layer(_layer_info(name, meta["layers"][name], mod.layout))
    result = QuantizationResult(QuantConfig.from_dict(meta["config"]), layers, meta.get("report", {}))
    return model, tokenizer, result  # type: ignore[return-value]
