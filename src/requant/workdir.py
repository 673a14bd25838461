"""A run's work directory: each finished pipeline stage is stored there so `--resume` can skip it.

Stages are safetensors (+ a JSON sidecar) written atomically; the run's config is stored first and a
resume with a different config is refused, naming the settings that differ.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import QuantConfig
from .errors import InputError
from .io import read_json, write_json_atomic

CONFIG = "config.json"


class WorkDir:
    """Stage store; `None` path means an in-memory run that saves nothing."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        config: QuantConfig,
        *,
        resume: bool = False,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.resumed: list[str] = []
        if self.path is None:
            return
        record = {"config": config.to_dict(), "fingerprint": fingerprint or {}}
        if resume and (self.path / CONFIG).is_file():
            old = read_json(self.path / CONFIG)
            diff = QuantConfig.from_dict(old["config"]).differences(config)
            diff += [
                k
                for k in sorted(set(old.get("fingerprint", {})) | set(record["fingerprint"]))
                if old.get("fingerprint", {}).get(k) != record["fingerprint"].get(k)
            ]
            if diff:
                raise InputError(
                    f"cannot resume from {str(self.path)!r}: it was made with different settings "
                    f"({', '.join(diff)}); run without --resume to start over"
                )
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        write_json_atomic(self.path / CONFIG, record)

    def has(self, stage: str) -> bool:
        return self.path is not None and (self.path / f"{stage}.json").is_file()

    def save(self, stage: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        """Store a stage; the JSON sidecar is written last, so a stage exists only once complete."""
        if self.path is None:
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{stage}.", suffix=".safetensors", dir=self.path)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.path / f"{stage}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_json_atomic(self.path / f"{stage}.json", meta or {})

    def load(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.path is not None
        self.resumed.append(stage)
        return load_file(str(self.path / f"{stage}.safetensors")), read_json(self.path / f"{stage}.json")

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path)
