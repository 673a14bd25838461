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

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors.torch import load_file, save_file

from . import distributed
from .config import QuantConfig
from .errors import InputError, OutputError
from .io import check_output, file_mode, output_lock, read_json, remove_stale, write_json_atomic, writing
from .quantizers import QuantizedTensor

CONFIG = "config.json"
MARKER = ".requant-work"  # written when requant creates a work directory: only marked directories are deleted
T = TypeVar("T")
Stored = tuple[dict[str, torch.Tensor], dict[str, Any]]  # a stage on disk: (tensors, JSON sidecar)


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How one stage's value is stored: `encode` to (tensors, JSON metadata), `decode` back, exactly."""

    encode: Callable[[T], Stored]
    decode: Callable[[dict[str, torch.Tensor], dict[str, Any]], T]


# Tensors by name (the Fisher, per-layer PQI tables).
TENSORS: Codec[dict[str, torch.Tensor]] = Codec(lambda t: (dict(t), {}), lambda t, _m: t)
# JSON only (Algorithm 1's counts and report).
META: Codec[dict[str, Any]] = Codec(lambda m: ({}, dict(m)), lambda _t, m: m)


def _encode_dense(dense: Mapping[str, QuantizedTensor]) -> Stored:
    tensors, meta = {}, {}
    for n, q in dense.items():
        m, ts = q.to_state()
        meta[n] = m
        tensors.update({f"{n}.{k}": t for k, t in ts.items()})
    return tensors, meta


def _decode_dense(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, QuantizedTensor]:
    out = {}
    for n, m in meta.items():
        own = {k[len(n) + 1 :]: v for k, v in tensors.items() if k.startswith(n + ".")}
        out[n] = QuantizedTensor.from_state(m, own)
    return out


# Fitted quantized tensors by layer name (the dense fit).
DENSE: Codec[dict[str, QuantizedTensor]] = Codec(_encode_dense, _decode_dense)


def encode_masks(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean masks as the flat indices of their True entries (int64), `NAME.index`."""
    return {f"{n}.index": m.flatten().nonzero().squeeze(1) for n, m in masks.items()}


def decode_masks(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The masks `encode_masks` stored, given each layer's (rows, columns)."""
    out = {}
    for n, shape in shapes.items():
        m = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
        m[tensors[f"{n}.index"]] = True
        out[n] = m.view(shape)
    return out


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
            if distributed.is_main():
                # It holds this run's own record, so it is requant's (one made before markers existed gets one).
                mark_work_dir(self.path)
                self._remove_partial_files()
            return
        if not distributed.is_main():
            return
        remove_work_dir(self.path)
        with writing(self.path):
            make_work_dir(self.path)
            write_json_atomic(self.path / CONFIG, record)

    def _remove_partial_files(self) -> None:
        """Temporaries of a killed stage write (ours `.STAGE.*`, safetensors' `.tmp*`): every dot file but the
        marker; a stage is only ever read through its complete files."""
        assert self.path is not None
        for p in self.path.iterdir():
            if p.name.startswith(".") and p.name != MARKER and p.is_file():
                p.unlink(missing_ok=True)

    def _not_shared(self) -> str:
        return (
            f"work directory {str(self.path)!r} is not visible on rank {distributed.rank()}; with several "
            "machines put --output on a filesystem that all of them share"
        )

    def cached(self, stage: str, compute: Callable[[], T], codec: Codec[T]) -> T:
        """The stage's stored value when there is one (a resume), else `compute()`, stored before it is returned."""
        stored = self.stored(stage)
        if stored is not None:
            return codec.decode(*stored)
        value = compute()
        self.save(stage, *codec.encode(value))
        return value

    def stored(self, stage: str) -> Stored | None:
        """The stage as stored (tensors, metadata), or None when it is not (yet) stored."""
        return self.load(stage) if self.has(stage) else None

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
        hint = f"the stages finished before {stage!r} are kept: make room and run again with --resume"
        try:
            with writing(self.path / f"{stage}.safetensors", hint):
                # A stage saved again (the detach steps) is invalid until both files are new: sidecar off first.
                sidecar.unlink(missing_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{stage}.", suffix=".safetensors", dir=self.path)
                os.close(fd)
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
                os.chmod(tmp, file_mode())  # mkstemp and safetensors make it private
                os.replace(tmp, self.path / f"{stage}.safetensors")
                tmp = None
                write_json_atomic(sidecar, meta or {})
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
        if self.path is not None and distributed.is_main():
            remove_work_dir(self.path)


# ----------------------------------------------------------------------------------------------------------
# Ownership and one writer per output


def work_dir_for(out: str | os.PathLike) -> Path:
    """The work directory of output `out`: OUTPUT.work beside it."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".work")


def make_work_dir(path: Path) -> None:
    """Create a work directory and its ownership marker."""
    path.mkdir(parents=True)
    mark_work_dir(path)


def mark_work_dir(path: Path) -> None:
    with open(path / MARKER, "w") as f:
        json.dump({"created_by": "requant", "pid": os.getpid()}, f)
        f.write("\n")


def is_work_dir(path: Path) -> bool:
    """Whether `path` is a directory that requant made (it holds the marker)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def check_work_dir(path: str | os.PathLike, *, resume: bool = False) -> None:
    """Refuse a work-directory path that requant may not write or delete: a file, a link, or a non-empty
    directory without requant's marker (a user's files). With `resume`, an unmarked directory holding a run
    record (made before markers existed) is accepted: resuming only reads it, and marks it when it matches."""
    path = Path(path)
    if resume and _has_run_record(path):
        return
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(
            f"work directory {str(path)!r} exists and is not a directory; move it away or choose another output"
        )
    if path.is_dir() and not is_work_dir(path) and any(path.iterdir()):
        raise OutputError(
            f"work directory {str(path)!r} holds files that requant did not create (no {MARKER} marker); "
            "move them away or choose another output"
        )


def _has_run_record(path: Path) -> bool:
    try:
        record = read_json(path / CONFIG)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"config", "fingerprint"} <= set(record)


def remove_work_dir(path: str | os.PathLike) -> None:
    """Delete a work directory, but only one that requant made (or an empty one); otherwise refuse."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    check_work_dir(path)
    shutil.rmtree(path)


@contextlib.contextmanager
def claim_output(
    out: str | os.PathLike, *, source: str | os.PathLike | None = None, resume: bool = False
) -> Iterator[Path]:
    """Check output `out` and hold its lock (which also covers OUTPUT.work) for the block; yields the work dir.

    Refuses up front what would fail or destroy something later: an output that is the current directory or
    the source model, a work directory that is a file or holds a user's files, an output another run is
    writing ("another requant run (pid N) is writing OUT"). Stale temporaries of dead runs are removed. Under
    torchrun rank 0 checks and locks; every rank raises when it fails."""
    check_output(out, source=source)
    work = work_dir_for(out)
    error: OutputError | None = None
    with contextlib.ExitStack() as stack:
        if distributed.is_main():
            try:
                with writing(out):
                    Path(os.path.abspath(out)).parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(output_lock(out))
                check_work_dir(work, resume=resume)
                remove_stale(out)
            except OutputError as e:
                error = e
        if not distributed.broadcast_flag(error is None):
            raise error or OutputError(f"rank 0 cannot write output {str(out)!r}; see its error")
        yield work
