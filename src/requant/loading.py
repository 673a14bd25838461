"""Loading causal LMs: paths, the embedded model, GGUF conversion, offloaded loading, dtypes.

Which layers of a loaded model get quantized is model.py's business (model walking); this module only turns
a user's model argument into a working transformers model and its tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import re
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
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model carries a gguf quantization_config that save_pretrained refuses:
    # rebuild a plain model from the config without it and move the weights over.
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    with atomic_dir(target, replace=True) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


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
        return str(path)
    if path.exists():
        raise InputError(f"model {str(spec)!r} is a file but not a .gguf file; give a model directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", str(spec)) and not str(spec).startswith("."):
        return str(spec)  # a hub id; from_pretrained checks the local cache only
    raise InputError(f"model {str(spec)!r} does not exist (not a directory, .gguf file or cached hub id)")


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
    model.to(device)
    model.eval()
    return model, tok
