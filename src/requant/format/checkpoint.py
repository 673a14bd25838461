"""Checkpoint v0: unpacked codes, code tables and sparse residuals in safetensors, metadata in JSON.

Layout of a checkpoint directory:
  config.json          the model's transformers config plus `quantization_config` (method, bits, version)
  model.safetensors    every parameter that is not a quantized weight (embeddings, norms, lm_head, ...)
  quantized.safetensors  per layer `<name>.codes`, its tables (`<name>.lut` | `.scale`, `.zero`),
                       `<name>.sparse_index` (int32 flat) and `<name>.sparse_value` (fp16)
  requant.json         format version, per-layer metadata, the QuantConfig and the run's report
  tokenizer files
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError, InputError
from ..io import atomic_dir, read_json, write_json_atomic
from ..model import LayerInfo
from ..pipeline import QuantizationResult, QuantizedLayer, apply_to_model
from ..quantizers import QuantizedTensor
from ..sparse import SparseResidual

FORMAT_VERSION = 0
META_FILE = "requant.json"
DENSE_FILE = "model.safetensors"
QUANT_FILE = "quantized.safetensors"


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def _unique_state(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Parameters and buffers to store, without the quantized weights and without tied duplicates."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if name in skip or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().cpu().contiguous().clone()
    return out


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
    for name, q in result.layers.items():
        meta, tensors = q.dense.to_state()
        for k, t in tensors.items():
            quant[f"{name}.{k}"] = t.contiguous()
        quant[f"{name}.sparse_index"] = q.sparse.index.to(torch.int32)
        quant[f"{name}.sparse_value"] = q.sparse.value.contiguous()
        layers_meta[name] = {
            **meta,
            "shape": list(q.dense.shape),
            "nnz": q.sparse.nnz,
            "block": q.info.block,
            "kind_in_block": q.info.kind,
        }
    weight_names = {f"{n}.weight" for n in result.layers}
    bits = result.bit_count()
    with atomic_dir(out, replace=True) as tmp:
        save_file(_unique_state(model, weight_names), str(tmp / DENSE_FILE))
        save_file(quant, str(tmp / QUANT_FILE))
        model.config.save_pretrained(tmp)
        cfg = read_json(tmp / "config.json")
        cfg["quantization_config"] = {
            "quant_method": "requant",
            "format_version": FORMAT_VERSION,
            "base": result.config.base,
            "bits": result.config.bits,
            "group_size": result.config.group_size,
            "sparse_entries": bits.sparse_entries,
            "bits_per_weight": bits.bits_per_weight,
        }
        write_json_atomic(tmp / "config.json", cfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        write_json_atomic(
            tmp / META_FILE,
            {
                "format_version": FORMAT_VERSION,
                "config": result.config.to_dict(),
                "layers": layers_meta,
                "bits": bits.to_dict(),
                "report": result.report,
                "metadata": metadata or {},
            },
        )
    return out


def _check_replace(out: Path, config: QuantConfig, force: bool) -> None:
    if force or (out.is_dir() and not any(out.iterdir())):
        return
    if not is_checkpoint(out):
        raise InputError(
            f"output {str(out)!r} exists and is not a requant checkpoint; use --force to replace it"
        )
    try:
        old = QuantConfig.from_dict(read_json(out / META_FILE)["config"])
    except Exception:
        raise InputError(
            f"output {str(out)!r} holds an unreadable checkpoint; use --force to replace it"
        ) from None
    diff = old.differences(config)
    if diff:
        raise InputError(
            f"output {str(out)!r} holds a different checkpoint (differs in: {', '.join(diff)}); "
            "use --force to replace it"
        )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is unreadable or truncated: {e}") from None


def read_layers(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, QuantizedLayer]]:
    """The metadata and every quantized layer of a checkpoint, validated against each other."""
    path = Path(path)
    try:
        meta = read_json(path / META_FILE)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path / META_FILE)!r} is unreadable: {e}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format version {version!r}; this requant reads {FORMAT_VERSION}"
        )
    tensors = _load_tensors(path / QUANT_FILE)
    layers = {}
    for name, lm in meta["layers"].items():
        shape = tuple(lm["shape"])
        try:
            own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            index, value = own.pop("sparse_index"), own.pop("sparse_value")
            dense = QuantizedTensor.from_state(lm, own)
        except KeyError as e:
            raise CheckpointError(
                f"{str(path / QUANT_FILE)!r}: tensor {name}.{e.args[0]} is missing"
            ) from None
        _validate_layer(path / QUANT_FILE, name, shape, lm, dense, index, value)
        sparse = SparseResidual(index.long(), value, shape)  # type: ignore[arg-type]
        info = LayerInfo(name, lm.get("block"), lm.get("kind_in_block", name.rsplit(".", 1)[-1]), *shape)
        layers[name] = QuantizedLayer(info, dense, sparse)
    return meta, layers


def _validate_layer(
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

    if tuple(dense.codes.shape) != shape or dense.codes.dtype != torch.uint8:
        raise bad(
            f"tensor {name}.codes has shape {tuple(dense.codes.shape)} {dense.codes.dtype}, "
            f"expected {shape} uint8"
        )
    if int(dense.codes.max()) >= 2**dense.bits:
        raise bad(f"tensor {name}.codes holds values ≥ 2^{dense.bits}; the metadata's bits are wrong")
    for tname, t in dense.tables().items():
        if t.dtype != torch.float16 or t.shape[0] != shape[0]:
            raise bad(
                f"tensor {name}.{tname} has shape {tuple(t.shape)} {t.dtype}, expected ({shape[0]}, ...) fp16"
            )
    if getattr(dense, "lut", None) is not None and dense.lut.shape[1] != 2**dense.bits:  # type: ignore[attr-defined]
        raise bad(
            f"tensor {name}.lut has {dense.lut.shape[1]} entries per row, bits={dense.bits} "  # type: ignore[attr-defined]
            f"needs {2**dense.bits}"
        )
    gs = lm.get("group_size")
    if gs is not None and (shape[1] % gs or dense.scale.shape[1] != shape[1] // gs):
        raise bad(f"tensor {name}.scale does not match group size {gs} and width {shape[1]}")
    if index.dtype != torch.int32 or value.dtype != torch.float16 or index.shape != value.shape:
        raise bad(f"sparse tensors of {name} must be int32 index and fp16 value of equal length")
    if index.numel() != lm["nnz"] or (
        index.numel() and (int(index.min()) < 0 or int(index.max()) >= shape[0] * shape[1])
    ):
        raise bad(f"sparse index of {name} is out of range or does not match nnz {lm['nnz']}")


def load_checkpoint(
    path: str | os.PathLike, *, device: str = "cpu"
) -> tuple[nn.Module, object, QuantizationResult]:
    """Rebuild a working transformers model from a checkpoint; quantized weights equal the saved ŵ exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..progress import quiet_transformers

    path = Path(path)
    meta, layers = read_layers(path)
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{str(path / 'config.json')!r} is unreadable: {e}") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    state = _load_tensors(path / DENSE_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {f"{n}.weight" for n in layers}
    tied = {k for k in missing if k not in expected_missing and _is_tied(model, k)}
    really_missing = set(missing) - expected_missing - tied
    if really_missing or unexpected:
        raise CheckpointError(
            f"{str(path / DENSE_FILE)!r} does not match the model config: "
            f"missing {sorted(really_missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    if tied:
        model.tie_weights()
    apply_to_model(model, layers)
    model.to(device).eval()
    result = QuantizationResult(QuantConfig.from_dict(meta["config"]), layers, meta.get("report", {}))
    return model, tokenizer, result


def _is_tied(model: nn.Module, key: str) -> bool:
    out = model.get_output_embeddings()
    return (
        out is not None and key.startswith("lm_head") and getattr(model.config, "tie_word_embeddings", False)
    )
