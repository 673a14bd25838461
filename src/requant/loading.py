"""Loading causal LMs: paths, the embedded model, GGUF conversion, offloaded loading, dtypes.

Which layers of a loaded model get quantized is model.py's business (model walking); this module only turns
a user's model argument into a working transformers model and its tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import struct
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, InputError
from .io import atomic_dir

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a user's dtype name (fp32, bf16, fp16, float32, ...) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"dtype {name!r} is not supported; use one of fp32, bf16, fp16") from None


def _offline_env() -> None:
    # requant never downloads: a hub id must already be in the local cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF model once into a plain safetensors checkpoint at `target` (atomically)."""
    _offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    _check_gguf_magic(gguf)
    try:
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, struct.error, KeyError, IndexError, EOFError, TypeError) as e:
        # The GGUF readers fail on a damaged file in many ways (short reads, impossible shapes, missing keys).
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"model file {str(gguf)!r} is not a readable GGUF model (truncated or damaged?): {first[:300]}"
        ) from None
    # A GGUF-loaded model carries a gguf quantization_config that save_pretrained refuses:
    # rebuild a plain model from the config without it and move the weights over.
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    # Another process converting the same file waits here and then replaces it with an equal copy.
    with atomic_dir(target, replace=True, wait=True) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _check_gguf_magic(gguf: Path) -> None:
    """Refuse a file that does not start with the GGUF magic bytes before any parser sees it."""
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputError(f"model file {str(gguf)!r} cannot be read: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise InputError(f"model file {str(gguf)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _gguf_cache_dir(gguf: Path) -> Path:
    from .assets import cache_dir

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def default_model_dir() -> Path:
    """The embedded model as a plain safetensors checkpoint, converted from GGUF on first use."""
    from .assets import cache_dir, default_gguf

    gguf = default_gguf()
    target = cache_dir() / "models" / gguf.stem
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return target


def resolve_model_path(spec: str | os.PathLike | None) -> str:
    """Turn a user's model argument into a loadable directory or a cached hub id.

    None means the embedded SmolLM2 model; a `.gguf` file is converted once into the cache.
    """
    from .assets import default_gguf

    if spec is None or str(spec) in ("", "default"):
        return str(default_model_dir())
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"model file {str(spec)!r} does not exist")
        if path.resolve() == default_gguf().resolve():
            return str(default_model_dir())
        target = _gguf_cache_dir(path)
        if not (target / "config.json").is_file():
            convert_gguf(path, target)
        return str(target)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {str(spec)!r} has no config.json")
        _refuse_requant_checkpoint(path, spec)
        return str(path)
    if path.exists():
        raise InputError(f"model {str(spec)!r} is a file but not a .gguf file; give a model directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", str(spec)) and not str(spec).startswith("."):
        return str(spec)  # a hub id; from_pretrained checks the local cache only
    raise InputError(f"model {str(spec)!r} does not exist (not a directory, .gguf file or cached hub id)")


def _refuse_requant_checkpoint(path: Path, spec: str | os.PathLike) -> None:
    """A requant checkpoint is not a full-precision model: transformers alone would load its quantized layers as
    random weights, so quantizing or evaluating it that way gives garbage. Refuse it, naming what to do."""
    if not is_requant_checkpoint(path):
        return
    source = None
    for sidecar in ("requant_report.json", "requant.json"):  # format v2, v1: the run's metadata names its source
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            source = source or json.loads((path / sidecar).read_text())["metadata"]["model"]
    what = f"its source model {source!r}" if isinstance(source, str) and source else "its source model"
    raise InputError(
        f"model {str(spec)!r} is a requant checkpoint (already quantized), not a full-precision model: quantize "
        f"{what} instead, or dequantize it first with `requant export --dequantize`"
    )


def requant_quantization_config(path: str | os.PathLike) -> dict | None:
    """config.json's quantization_config when it is requant's (quant_method "requant"), else None."""
    qc = _read_config(Path(path)).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "requant" else None


def is_requant_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the directory `path` is a requant checkpoint: format v2 (config.json names requant) or v0/v1
    (requant.json beside it). The one test of it: format.is_checkpoint asks this too."""
    path = Path(path)
    return path.is_dir() and ((path / "requant.json").is_file() or requant_quantization_config(path) is not None)


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def max_context(spec: str | os.PathLike | None) -> int | None:
    """The longest input, in tokens, the model (or requant checkpoint) at `spec` was built for, from its config
    (max_position_embeddings or a synonym); None when the config does not say."""
    if spec is not None and Path(spec).is_dir():
        cfg = _read_config(Path(spec))
    else:
        path = Path(resolve_model_path(spec))
        if path.is_dir():
            cfg = _read_config(path)
        else:  # a cached hub id
            _offline_env()
            from transformers import AutoConfig

            try:
                cfg = AutoConfig.from_pretrained(str(path), local_files_only=True).to_dict()
            except (OSError, ValueError):
                return None
    return context_of(cfg)


def context_of(cfg: dict) -> int | None:
    """The context length, in tokens, that a transformers config (as a dict) states; None when it states none."""
    for c in (cfg, cfg.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(c.get(key), int) and c[key] > 0:
                return int(c[key])
    return None


def check_seqlen(
    spec: str | os.PathLike | None, seqlen: int, flag: str = "--seqlen", *, model: nn.Module | None = None
) -> None:
    """Refuse, before any work, windows longer than the model's context (its max_position_embeddings); the
    model is named by `spec` (its config is read, nothing loaded) or given loaded as `model`."""
    n = context_of(model.config.to_dict()) if model is not None else max_context(spec)
    if n is not None and seqlen > n:
        raise ConfigError(
            f"{flag} {seqlen} is longer than the model's context of {n} tokens (max_position_embeddings); "
            f"use at most {n}"
        )


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offload: str | os.PathLike | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer from a directory, a .gguf file or the local HF cache.

    With `offload` (a folder), the weights are memory-mapped from files there instead (requant.offload)."""
    _offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    try:
        if offload is not None:
            from .offload import load_offloaded

            model = load_offloaded(path, offload, dtype=parse_dtype(dtype), device=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model {str(spec)!r}: {str(e).splitlines()[0]}") from None
    except pickle.UnpicklingError as e:
        # torch's weights-only loader refused a pickled checkpoint (the payload did not run); say why in one line.
        m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        detail = m.group(1).split(" was not an allowed")[0].split(". Please")[0].strip() if m else "not plain tensors"
        raise InputError(
            f"cannot load model {str(spec)!r}: torch's safe weights-only loader refuses its pickled weights "
            f"(pytorch_model.bin: {detail}); requant never runs pickled code: convert the model to safetensors "
            "where you trust it"
        ) from None
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):
            raise
        raise InputError(
            f"cannot load model {str(spec)!r}: its pickled weights are not a readable PyTorch file (corrupt or "
            "truncated?)"
        ) from None
    model.to(device)
    model.eval()
    return model, tok
