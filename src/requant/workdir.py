"""A run's work directory: each finished pipeline stage is stored there so `--resume` can skip it.

Stages are safetensors (+ a JSON sidecar) written atomically; the run's config is stored first and a
resume with a different config is refused, naming the settings that differ.

Under torchrun only rank 0 writes; every rank reads on resume, so with several machines the directory must be
on a filesystem they share. Whether a stage exists is rank 0's answer, broadcast, so all ranks take the same
path through the pipeline. Stages hold all-reduced totals, which do not depend on the number of processes:
a resume with another world size is accepted (the windows are re-split) and recorded in `world_size_change`;
its results equal the uninterrupted run's within fp32 summation order, not bit for bit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import distributed
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
        self.world_size_change: tuple[int, int] | None = None  # (stored, current) when a resume re-shards
        if self.path is None:
            return
        try:
            self._open(config, resume, fingerprint or {})
        finally:
            # Rank 0 may have just (re)created the directory: nobody goes on before it is there.
            distributed.barrier()

    def _open(self, config: QuantConfig, resume: bool, fingerprint: dict[str, Any]) -> None:
        assert self.path is not None
        world = distributed.world_size()
        record = {"config": config.to_dict(), "fingerprint": fingerprint, "world_size": world}
        if distributed.broadcast_flag(resume and (self.path / CONFIG).is_file()):
            if not (self.path / CONFIG).is_file():
                raise InputError(self._not_shared())
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
            stored = int(old.get("world_size", 1))
            if stored != world:
                self.world_size_change = (stored, world)
            return
        if not distributed.is_main():
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        write_json_atomic(self.path / CONFIG, record)

    def _not_shared(self) -> str:
        return (
            f"work directory {str(self.path)!r} is not visible on rank {distributed.rank()}; with several "
            "machines put --output on a filesystem that all of them share"
        )

    def has(self, stage: str) -> bool:
        """Whether the stage is stored (rank 0's answer on every rank)."""
        return self.path is not None and distributed.broadcast_flag((self.path / f"{stage}.json").is_file())

    def save(self, stage: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        """Store a stage; the JSON sidecar is written last, so a stage exists only once complete.

        Rank 0 only: every rank holds the same all-reduced result."""
        if self.path is None or not distributed.is_main():
            return
        sidecar = self.path / f"{stage}.json"
        tmp = None
        try:
            # A stage saved again (the detach steps) is invalid until both files are new: sidecar off first.
            sidecar.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{stage}.", suffix=".safetensors", dir=self.path)
            os.close(fd)
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.path / f"{stage}.safetensors")
            tmp = None
            write_json_atomic(sidecar, meta or {})
        except OSError as e:
            raise InputError(
                f"cannot store stage {stage!r} in {str(self.path)!r}: {e.strerror or e}; the stages finished "
                "before it are kept: make room and run again with --resume"
            ) from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def load(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.path is not None
        if not (self.path / f"{stage}.json").is_file():
            raise InputError(self._not_shared())
        self.resumed.append(stage)
        return load_file(str(self.path / f"{stage}.safetensors")), read_json(self.path / f"{stage}.json")

    def remove(self) -> None:
        if self.path is not None and distributed.is_main() and self.path.exists():
            shutil.rmtree(self.path)
