"""Models larger than memory: parameters backed by memory-mapped files, decoder blocks recomputed in backward.

`load_offloaded` builds the model skeleton on the meta device (accelerate's `init_empty_weights`), copies the
checkpoint tensor by tensor into accelerate's disk-offload format (one `.dat` file per tensor + index.json,
`accelerate.utils.offload_weight`), and binds every parameter to a writable memory map of its file. The
parameters are ordinary CPU tensors, so every code path (gradients, the PQI path's in-place writes, forward
hooks, evaluation) runs unchanged, while the kernel pages weights in on use and can drop them under memory
pressure: the weights count as file-backed, evictable memory, not as the process's own (anonymous) memory.

Backward passes would still keep every block's activations alive; `checkpoint_blocks` wraps each decoder
block in non-reentrant activation checkpointing (torch.utils.checkpoint), so a backward pass holds the hidden
states between blocks plus one block's internals, at the price of recomputing each block's forward once.

The folder is rebuilt on every load: the path writes interpolated weights into the files, and a killed run
must not leave a later run starting from them. Only a folder requant made (it holds a marker) is ever replaced
or deleted; a folder of the user's files is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError, InputError, OutputError
from .io import atomic_dir
from .model import find_blocks

INDEX = "index.json"
MARKER = ".requant-offload"  # written into every offload folder: only marked folders are replaced or deleted


def offload_checkpoint(model_dir: str | os.PathLike, folder: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Copy the safetensors checkpoint in `model_dir` to `folder` in accelerate's offload format, one tensor at a
    time (floating tensors cast to `dtype`); the folder appears complete or not at all."""
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputError(
            f"--offload needs a safetensors checkpoint; {str(model_dir)!r} has no *.safetensors file "
            "(save the model with save_pretrained, or give a .gguf file, which is converted once)"
        )
    folder = Path(folder)
    check_offload_folder(folder)
    with atomic_dir(folder, replace=True) as tmp:
        (tmp / MARKER).write_text("requant offload folder\n")
        index: dict[str, dict] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    t = h.get_tensor(key)
                    if t.is_floating_point():
                        t = t.to(dtype)
                    offload_weight(t, key, str(tmp), index)
                    del t
        save_offload_index(index, str(tmp))
    return folder


def check_offload_folder(folder: str | os.PathLike) -> None:
    """Refuse an offload folder that requant would replace but did not make: a file, or a non-empty directory
    without the marker (a user's files)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"offload folder {str(folder)!r} exists and is not a directory; choose another --offload")
    if folder.is_dir() and not (folder / MARKER).is_file() and any(folder.iterdir()):
        raise OutputError(
            f"offload folder {str(folder)!r} holds files that requant did not create (no {MARKER} marker); "
            "choose an empty or new folder for --offload"
        )


def remove_offload_folder(folder: str | os.PathLike) -> None:
    """Delete an offload folder requant made (it holds the marker); anything else is left alone."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)


def _memmap(folder: Path, name: str, info: dict) -> torch.Tensor:
    """A writable memory map of one offloaded tensor (accelerate's own loader copies into RAM)."""
    stored = {"bfloat16": "int16"}.get(info["dtype"], info["dtype"])
    shape = tuple(info["shape"]) or (1,)
    arr = np.memmap(folder / f"{name}.dat", dtype=stored, mode="r+", shape=shape)
    t = torch.from_numpy(arr)
    if info["dtype"] == "bfloat16":
        t = t.view(torch.bfloat16)
    return t if info["shape"] else t.reshape(())


def bind_offloaded(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Point every parameter and persistent buffer of `model` (e.g. a meta-device skeleton) at its memory-mapped
    file in `folder`; tied weights are tied again. Refuses a model whose parameters the folder does not cover."""
    from accelerate.utils import set_module_tensor_to_device

    folder = Path(folder)
    index = json.loads((folder / INDEX).read_text())
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name in index:
            # value on the target device and dtype: set_module_tensor_to_device wraps it without a copy.
            set_module_tensor_to_device(model, name, "cpu", value=_memmap(folder, name, index[name]))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InputError(
            f"the checkpoint has no tensor for parameter {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return model


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Recompute each decoder block's forward during backward instead of keeping its activations.

    Only while gradients are being recorded; no-grad passes (evaluation, calibration) run the block as is.
    Idempotent. Non-reentrant checkpointing: keyword arguments and weight gradients pass through.
    """
    _, blocks = find_blocks(model)
    for block in blocks:
        if getattr(block, "_requant_checkpointed", False):
            continue
        forward = block.forward

        def run(*args: object, _forward=forward, **kwargs: object) -> object:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = run
        block._requant_checkpointed = True
    return model


def is_offloaded(model: nn.Module) -> bool:
    return getattr(model, "_requant_offload", None) is not None


def spill(model: nn.Module, tag: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Long-lived working tensors of an offloaded model's run (e.g. the pipeline's fp32 master copy of the
    weights) moved into memory-mapped files under its offload folder, one at a time; a resident model's are
    returned as they are. Each call writes a fresh subfolder, so earlier results stay valid."""
    from accelerate.utils import offload_weight

    folder = getattr(model, "_requant_offload", None)
    if folder is None:
        return dict(tensors)
    base = Path(folder) / "spill"
    base.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=base))
    out = {}
    for name, t in tensors:
        index = offload_weight(t.detach(), name, str(d), {})
        out[name] = _memmap(d, name, index[name])
    return out


def spill_zeros(model: nn.Module, tag: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor] | None:
    """Zeroed fp32 tensors backed by fresh memory-mapped files under an offloaded model's folder (sparse files:
    nothing is written until used), e.g. gradient sums that backward folds into; None for a resident model."""
    folder = getattr(model, "_requant_offload", None)
    if folder is None:
        return None
    base = Path(folder) / "spill"
    base.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=base))
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        arr = np.memmap(d / f"{i}.dat", dtype="float32", mode="w+", shape=tuple(shape))
        out[name] = torch.from_numpy(arr)
    return out


def load_offloaded(
    path: str, folder: str | os.PathLike, *, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> nn.Module:
    """The model at `path` (a local directory with config.json and safetensors), its weights memory-mapped from
    `folder` (rebuilt from the checkpoint), its blocks checkpointed. CPU only: on an accelerator, the model's
    weights would be copied into device memory anyway."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if torch.device(device).type != "cpu":
        raise ConfigError(f"--offload runs the model on the CPU; device {str(device)!r} is not supported with it")
    if not Path(path, "config.json").is_file():
        raise InputError(f"--offload needs a local model directory; {path!r} is not one")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    offload_checkpoint(path, folder, dtype)
    bind_offloaded(model, folder)
    checkpoint_blocks(model)
    model._requant_offload = Path(folder)
    model.eval()
    return model
