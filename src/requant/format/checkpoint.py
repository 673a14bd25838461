"""Checkpoints, format v2: a standard transformers directory that `from_pretrained` loads (after `import requant`).

Layout of a checkpoint directory:
  config.json                   the model's transformers config; `quantization_config` holds quant_method
                                "requant", format_version 2, the per-layer table (kind, bits, shape, nnz and
                                the kind's params — everything a loader needs before reading a tensor), the
                                QuantConfig that made it and the bit accounting
  model.safetensors             every tensor: the quantized layers' (format.layout) and every other parameter
                                (embeddings, norms, an untied lm_head, biases) in 16 bits by default;
  or model-0000k-of-0000n.safetensors + model.safetensors.index.json above `max_shard_bytes`
  requant_report.json           the run's report, stored bytes and free-form metadata (not needed to load)
  tokenizer files, generation_config.json

Each safetensors file records the sha256 of every tensor and of the layer table (format.files); loading
verifies them unless told not to. Format v1/v0 checkpoints are read by format.v1 and load as before.
Only safetensors and JSON are ever read: no pickle, no remote code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..io import atomic_dir, read_json, write_json_atomic
from ..loading import is_requant_checkpoint, requant_quantization_config
from ..model import LayerInfo, unit_ref
from ..results import QuantizationResult, QuantizedLayer
from . import v1
from .files import Header, integrity_metadata, read_header, verify_files
from .layout import (
    FORMAT_VERSION,
    LayerLayout,
    check_specs,
    check_table_summary,
    check_values,
    decode_layer,
    encode_layer,
)
from .names import QWEIGHT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "requant_report.json"
QUANT_METHOD = "requant"
DEFAULT_SHARD_BYTES = 4 * 2**30
DENSE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP16_MAX = 65504.0

Stored = dict[str, tuple[LayerLayout, dict[str, torch.Tensor]]]


def requant_entry(path: str | os.PathLike) -> dict[str, Any]:
    """config.json's requant quantization_config; CheckpointError when there is none."""
    qc = requant_quantization_config(path)
    if qc is None:
        raise CheckpointError(f"{str(Path(path) / CONFIG_FILE)!r} has no requant quantization_config")
    return qc


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a requant checkpoint directory (any format version)."""
    return is_requant_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------
# Writing


def dense_dtype(
    model: nn.Module, choice: str, skip_prefixes: set[str], skip_keys: frozenset[str] = frozenset()
) -> torch.dtype:
    """The dtype unquantized floating tensors are stored in.

    "auto": the source's own 16-bit dtype (config.dtype) when it has one; for a wider source fp16 when every
    such tensor fits its range, else bf16 — a quantized checkpoint is never larger than a 16-bit original.
    """
    if choice != "auto":
        if choice not in DENSE_DTYPES:
            raise ConfigError(f"dense dtype {choice!r} is not allowed; use one of auto, {', '.join(DENSE_DTYPES)}")
        return DENSE_DTYPES[choice]
    src = getattr(model.config, "dtype", None)
    if isinstance(src, str):
        src = getattr(torch, src, None)
    if src in (torch.float16, torch.bfloat16):
        return src  # type: ignore[return-value]
    for t in _dense_state(model, skip_prefixes, skip_keys).values():
        if t.is_floating_point() and t.numel() and float(t.abs().max()) >= FP16_MAX:
            return torch.bfloat16
    return torch.float16


def _dense_state(
    model: nn.Module, skip_prefixes: set[str], skip_keys: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """Parameters and buffers to store besides the quantized weights (the units' own tensors, `skip_keys`: the
    fused expert parameters), without tied duplicates."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if (prefix in skip_prefixes and leaf != "bias") or name in skip_keys:
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach()
    return out


def layer_table_entry(q: QuantizedLayer, layout: LayerLayout) -> dict[str, Any]:
    return {**layout.to_meta(), "block": q.info.block, "kind_in_block": q.info.kind}


def fused_parameters(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """3-D expert parameter of the (dense, in-memory) model → its quantized units in expert order. A model that
    already holds packed modules (a loaded checkpoint) has none: its units are modules of their own."""
    out: dict[str, dict[int, str]] = {}
    for n in names:
        try:
            ref = unit_ref(model, n)
        except ConfigError:
            continue
        if ref.index is not None:
            out.setdefault(n.rpartition(".")[0], {})[ref.index] = n
    return {p: [units[e] for e in sorted(units)] for p, units in out.items()}


def checkpoint_tensors(
    model: nn.Module, result: QuantizationResult, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(every tensor to store, in model order; the layer table; stored bytes of the quantized layers)."""
    layers = set(result.layers)
    fused = fused_parameters(model, layers)
    dense = _dense_state(model, layers, frozenset(fused))
    table: dict[str, Any] = {}
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    stored = 0
    for name, q in result.layers.items():
        layout, tensors = encode_layer(q)
        table[name] = layer_table_entry(q, layout)
        encoded[name] = tensors
        stored += layout.stored_bytes()
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in encoded and leaf == QWEIGHT:
            out.update({f"{prefix}.{s}": v.contiguous() for s, v in encoded.pop(prefix).items()})
        elif key in fused:  # a fused expert parameter: each expert's packed tensors, in expert order
            for unit in fused[key]:
                out.update({f"{unit}.{s}": v.contiguous() for s, v in encoded.pop(unit).items()})
        elif key in dense:
            t = dense[key].cpu()
            out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    if encoded:  # a quantized layer the model has no weight for: a bug upstream, never a silent drop
        raise CheckpointError(f"quantized layer {next(iter(encoded))} is not a module of the model")
    return out, table, stored


def quantization_config(result: QuantizationResult, table: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The `quantization_config` entry of config.json: what a loader needs, and what made the checkpoint."""
    bits = result.bit_count()
    c = result.config
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "base": c.base,
        "bits": c.bits,
        "group_size": c.group_size,
        "sym": c.sym,
        "outliers_percent": c.outliers,
        "significant_percent": c.significant,
        "sparse_entries": bits.sparse_entries,
        "sparse_format": "csr",
        "code_packing": "row-wise little-endian bit stream: 8 codes per `bits` bytes, weight (out, ceil(in/8), bits)",
        "quantized_layers": len(table),
        "bits_per_weight": bits.bits_per_weight,
        "dense_dtype": str(dtype).removeprefix("torch."),
        "layers": dict(table),
        "config": c.to_dict(),
    }


def shard(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors, in order, into files of at most `max_bytes` each (a larger tensor gets a file alone)."""
    if max_bytes < 1:
        raise ConfigError(f"max shard size {max_bytes} must be a positive number of bytes")
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if files[-1] and size + n > max_bytes:
            files.append({})
            size = 0
        files[-1][name] = t
        size += n
    return files


def write_tensors(
    directory: Path, tensors: Mapping[str, torch.Tensor], table: Mapping[str, Any], max_bytes: int
) -> None:
    """model.safetensors, or shards + index, each file carrying the hashes of its tensors and of the table."""
    shards = shard(tensors, max_bytes)
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, part in zip(names, shards, strict=True):
        meta = {"format": "pt", "requant_format": str(FORMAT_VERSION), **integrity_metadata(part, table)}
        save_file(dict(part), str(directory / name), metadata=meta)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: name for name, part in zip(names, shards, strict=True) for k in part}
        write_json_atomic(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_checkpoint(
    out: str | os.PathLike,
    model: nn.Module,
    tokenizer: object,
    result: QuantizationResult,
    *,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
    dense: str = "auto",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the quantized model to `out` (format v2) atomically; never replace a different checkpoint unless
    `force`. `dense`: dtype of the unquantized tensors, "auto" (16-bit, see dense_dtype), bf16, fp16 or fp32."""
    out = Path(out)
    if out.exists():
        check_replace(out, result.config, force)
    dtype = dense_dtype(model, dense, set(result.layers), frozenset(fused_parameters(model, result.layers)))
    tensors, table, stored = checkpoint_tensors(model, result, dtype)
    # atomic_dir: the output lock, stale temporaries removed, one OutputError line for an I/O failure
    # (no space left ...), nothing left behind on failure.
    with atomic_dir(out, replace=True) as tmp:
        write_tensors(tmp, tensors, table, max_shard_bytes)
        _write_config(tmp, model, quantization_config(result, table, dtype))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        write_json_atomic(
            tmp / REPORT_FILE,
            {
                "format_version": FORMAT_VERSION,
                "bits": result.bit_count().to_dict(),
                "stored_bytes": stored,
                "report": result.report,
                "metadata": metadata or {},
            },
        )
    return out


def _write_config(directory: Path, model: nn.Module, qc: dict[str, Any]) -> None:
    config = model.config
    had = "quantization_config" in config.__dict__
    old = config.__dict__.pop("quantization_config", None)
    try:
        config.save_pretrained(directory)
    finally:
        if had:
            config.quantization_config = old
    cfg = read_json(directory / CONFIG_FILE)
    # The compute dtype the model was quantized in: from_pretrained's default ("auto") would otherwise take the
    # first stored float tensor's (16-bit) dtype and run the whole model in it.
    cfg["dtype"] = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
    cfg["quantization_config"] = qc
    write_json_atomic(directory / CONFIG_FILE, cfg)


def check_replace(out: Path, config: QuantConfig, force: bool) -> None:
    """Refuse to overwrite anything but an empty directory or a checkpoint of the same configuration."""
    if force or (out.is_dir() and not any(out.iterdir())):
        return
    if not is_checkpoint(out):
        raise InputError(f"output {str(out)!r} exists and is not a requant checkpoint; use --force to replace it")
    try:
        old = QuantConfig.from_dict(read_meta(out)["config"])
    except Exception:
        raise InputError(f"output {str(out)!r} holds an unreadable checkpoint; use --force to replace it") from None
    diff = old.differences(config)
    if diff:
        raise InputError(
            f"output {str(out)!r} holds a different checkpoint (differs in: {', '.join(diff)}); "
            "use --force to replace it"
        )


_check_replace = check_replace  # the name the CLI used


# ----------------------------------------------------------------------------------------------------------
# Reading and validation


def tensor_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a v2 checkpoint: model.safetensors, or the shards its index names."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{str(index)!r} is unreadable: {e}") from None
        if any("/" in n or n.startswith(".") for n in names):
            raise CheckpointError(f"{str(index)!r} names a file outside the checkpoint")
        return [path / n for n in names]
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    return [path / WEIGHTS_FILE]


def parse_layers(where: str, qc: Mapping[str, Any]) -> dict[str, LayerLayout]:
    """Each quantized layer's layout from a quantization_config's layer table."""
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{where}: quantization_config has no 'layers' table")
    return {name: LayerLayout.from_meta(lm, f"{where}: layer {name}") for name, lm in layers.items()}


def check_quantization_config(where: str, qc: Mapping[str, Any]) -> dict[str, LayerLayout]:
    """Version and internal consistency of a v2 quantization_config; returns the layouts."""
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: requant format version {qc.get('format_version')!r} is not loadable here; this requant "
            f"loads version {FORMAT_VERSION} through transformers and versions 0-1 through requant.load "
            "(`requant convert` upgrades them)"
        )
    layouts = parse_layers(where, qc)
    check_table_summary(where, qc, layouts)
    return layouts


def check_files(
    path: str | os.PathLike, layouts: Mapping[str, LayerLayout], files: list[Path] | None = None
) -> tuple[Header, dict[str, Path]]:
    """Every quantized layer's tensors present in the files with the layout's dtypes and shapes, none extra.

    Returns the files' merged header and tensor name → file. Raises CheckpointError naming the first missing or
    mismatched tensor."""
    files = tensor_files(path) if files is None else files
    where: dict[str, Path] = {}
    header: Header = {}
    for f in files:
        h = read_header(f)
        header.update(h)
        where.update(dict.fromkeys(h, f))
    for name, layout in layouts.items():
        prefix = name + "."
        found = {
            k[len(prefix) :]: (dt, shape)
            for k, (dt, shape, _) in header.items()
            if k.startswith(prefix) and "." not in k[len(prefix) :] and k[len(prefix) :] != "bias"
        }
        check_specs(str(Path(path)), name, layout, found)
    return header, where


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's metadata in one shape for every version: format_version, config (the QuantConfig dict),
    layers (the layer table), bits, report, metadata."""
    path = Path(path)
    if v1.is_v1_checkpoint(path):
        return v1.read_meta(path)
    qc = requant_entry(path)
    report = {}
    if (path / REPORT_FILE).is_file():
        try:
            report = read_json(path / REPORT_FILE)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{str(path / REPORT_FILE)!r} is unreadable: {e}") from None
    return {
        "format_version": qc.get("format_version"),
        "config": qc.get("config", {}),
        "layers": qc.get("layers", {}),
        "bits": report.get("bits"),
        "stored_bytes": report.get("stored_bytes"),
        "report": report.get("report", {}),
        "metadata": report.get("metadata", {}),
    }


def read_quantized(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], Stored]:
    """The metadata and each quantized layer's stored tensors (suffix → tensor, v2 names), fully validated."""
    path = Path(path)
    if v1.is_v1_checkpoint(path):
        return v1.read_quantized(path)
    qc = requant_entry(path)
    layouts = check_quantization_config(str(path / CONFIG_FILE), qc)
    files = tensor_files(path)
    _, where = check_files(path, layouts, files)
    if verify:
        verify_files(files, qc["layers"])
    out: Stored = {}
    handles: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack:
        for name, layout in layouts.items():
            own = {}
            for suffix in layout.tensors():
                key = f"{name}.{suffix}"
                f = where[key]
                if f not in handles:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                own[suffix] = handles[f].get_tensor(key)
            check_values(str(path), name, layout, own)
            out[name] = (layout, own)
    return read_meta(path), out


def stored_headers(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, LayerLayout], Header, Header]:
    """(metadata, layouts, headers of the quantized layers' tensors, headers of every other tensor), any version:
    the validated description of what a checkpoint stores, without reading a tensor."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory")
    meta = read_meta(path)
    if v1.is_v1_checkpoint(path):
        quant = read_header(path / v1.QUANT_FILE)
        layouts = v1.check_header(path, meta, quant) if meta["format_version"] >= 1 else v1.layouts_of(path, meta)
        return meta, layouts, quant, read_header(path / v1.DENSE_FILE)
    layouts = check_quantization_config(str(path / CONFIG_FILE), requant_entry(path))
    header, _ = check_files(path, layouts)
    owned = {f"{n}.{s}" for n, lo in layouts.items() for s in lo.tensors()}
    quant = {k: v for k, v in header.items() if k in owned}
    other = {k: v for k, v in header.items() if k not in owned}
    return meta, layouts, quant, other


def _layer_info(name: str, lm: Mapping[str, Any], layout: LayerLayout) -> LayerInfo:
    kind = lm.get("kind_in_block", name.rsplit(".", 1)[-1])
    return LayerInfo(name, lm.get("block"), kind, layout.out_features, layout.in_features)


def read_layers(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, QuantizedLayer]]:
    """The metadata and every quantized layer of a checkpoint (unpacked), validated."""
    meta, stored = read_quantized(path, verify=verify)
    layers = {
        name: decode_layer(layout, tensors, _layer_info(name, meta["layers"][name], layout))
        for name, (layout, tensors) in stored.items()
    }
    return meta, layers


def convert(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, dense: str = "auto") -> Path:
    """Rewrite a v0/v1 checkpoint as format v2 (same codes, tables and residuals; dense tensors per `dense`)."""
    src = Path(src)
    if not v1.is_v1_checkpoint(src):
        raise InputError(f"{str(src)!r} is not a format v0/v1 checkpoint (nothing to convert)")
    meta, stored = v1.read_quantized(src)
    model, tokenizer = v1.load_v1(src)
    layers = {
        name: decode_layer(layout, tensors, _layer_info(name, meta["layers"][name], layout))
        for name, (layout, tensors) in stored.items()
    }
    result = QuantizationResult(QuantConfig.from_dict(meta["config"]), layers, meta.get("report", {}))
    return save_checkpoint(out, model, tokenizer, result, metadata=meta.get("metadata", {}), force=force, dense=dense)
