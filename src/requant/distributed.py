"""Data parallelism over calibration windows with torch.distributed (launched by `torchrun`).

Every rank holds the whole model and a share of the windows; sums over windows are computed per rank and
all-reduced (fp32 tensors, fp64 scalars), so every rank ends with the same totals and makes the same
deterministic decisions. Only rank 0 writes. Without an initialized process group every helper is the
single-process identity, so library code calls them unconditionally.

The totals equal the single-process ones up to fp32 summation order (per-rank partial sums, then the
reduction), i.e. within a few ulps of the largest partial sum, not bit for bit.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError, NumericalError, RequantError

# How long a collective waits for the other ranks before failing; a rank that died leaves the others waiting
# at most this long (torchrun usually stops them sooner, when it sees the failed worker exit).
TIMEOUT_ENV = "REQUANT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0

__all__ = [
    "RankFailure",
    "all_reduce_",
    "all_reduce_max",
    "all_reduce_scalars",
    "barrier",
    "broadcast_flag",
    "check_same",
    "destroy",
    "exit_at_finish",
    "finish",
    "init_from_env",
    "is_broken",
    "is_initialized",
    "is_main",
    "local_device",
    "map_layers",
    "rank",
    "shard",
    "world_size",
]


_BROKEN = False  # a collective failed: the group is not torn down (gloo can abort the process doing so)
_EXIT_AT_FINISH = False  # set by the process entry point: `finish` may end a torchrun worker


class RankFailure(RequantError):
    """A collective failed: another rank stopped (its own error is printed by that rank) or timed out."""


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    # gloo/NCCL report a vanished peer or a timeout as a RuntimeError (DistBackendError) with a long C++
    # message; turn it into one line that says what happened and where to look.
    global _BROKEN
    try:
        yield
    except RuntimeError as e:
        _BROKEN = True
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankFailure(
            f"rank {rank()} of {world_size()} stopped during {what}: another process failed or did not answer "
            f"within {timeout().total_seconds():.0f} s ({first[:200]}); see the other ranks' errors"
        ) from None


def is_broken() -> bool:
    """Whether a collective of this process failed (its group is unusable)."""
    return _BROKEN


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be positive")
    return datetime.timedelta(seconds=seconds)


def local_device(device: str) -> str:
    """The device of this rank: a bare "cuda" becomes cuda:LOCAL_RANK so each process gets its own GPU."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1); False when single-process.

    gloo on CPU, NCCL when the device is CUDA. The group's timeout is REQUANT_DIST_TIMEOUT_S (default 1800 s).
    """
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun")
    dev = torch.device(local_device(device))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        _check_one_gpu_per_rank(device, dev)
        torch.cuda.set_device(dev)
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    try:
        dist.init_process_group(backend, timeout=timeout(), **kwargs)
    except RuntimeError as e:
        detail = " / ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise RankFailure(f"could not join the {backend} process group: {detail[:300]}") from None
    return True


def _check_one_gpu_per_rank(spec: str, dev: torch.device) -> None:
    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"); say so before it does, in our words.
    if spec != "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"--device {spec} gives every rank on this machine the same GPU; under torchrun use --device cuda "
            "(each rank takes cuda:LOCAL_RANK)"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(
            f"rank {os.environ.get('RANK', '?')} wants {dev} but {count} GPU(s) are visible; start at most "
            f"{count} processes per machine (--nproc-per-node)"
        )


def destroy() -> None:
    """Leave the process group; after a failed collective the group is left for process exit to clean up,
    since tearing down a group whose peer vanished can abort (SIGABRT) before the error is printed."""
    if is_initialized() and not _BROKEN:
        dist.destroy_process_group()


def exit_at_finish() -> None:
    """Called by the process entry point only (never by library callers): `finish` may end the process."""
    global _EXIT_AT_FINISH
    _EXIT_AT_FINISH = True


def finish(code: int) -> int:
    """Leave the process group after the last collective; returns `code`.

    A torchrun worker started from the entry point ends here instead (os._exit after flushing): gloo sometimes
    aborts a worker (SIGABRT, "terminate called without an active exception") while the group is torn down,
    and torchrun then fails the whole run although every output was already written.
    """
    if _EXIT_AT_FINISH and world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    destroy()
    return code


def barrier() -> None:
    if is_initialized():
        with _collective("a barrier"):
            dist.barrier()


def shard(n: int, *, rank_: int | None = None, world: int | None = None) -> range:
    """Indices 0..n-1 owned by this rank: strided (r, r+K, r+2K, ...), so every index has exactly one owner
    and ranks differ by at most one item. May be empty when n < K."""
    r = rank() if rank_ is None else rank_
    k = world_size() if world is None else world
    if not 0 <= r < k:
        raise ConfigError(f"rank {r} is outside a world of {k} processes")
    return range(r, n, k)


def map_layers(
    names: Sequence[str],
    fn: Callable[[str], list[float]],
    *,
    progress: Callable[[list[str]], Iterable[str]] = iter,
) -> dict[str, list[float]]:
    """{name: fn(name)} for every name, each computed by one rank (`shard`) and shared with all of them.

    Every fn(name) returns the same number of floats; the rows are summed over ranks in fp64 with one
    non-zero term each, so every rank ends with the exact values its owner computed. `progress` wraps this
    rank's share (e.g. a progress bar). Every rank must call it, also one that owns no name.
    """
    mine = [names[i] for i in shard(len(names))]
    rows = {n: fn(n) for n in progress(mine)}
    if world_size() == 1:
        return rows
    width = int(all_reduce_max(max((len(r) for r in rows.values()), default=0))[0])
    gathered = torch.zeros(len(names), width, dtype=torch.float64)
    for i, n in enumerate(names):
        if n in rows:
            gathered[i] = torch.tensor(rows[n], dtype=torch.float64)
    all_reduce_({"layer_map": gathered})
    return {n: gathered[i].tolist() for i, n in enumerate(names)}


def _reduce_device(t: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU (and CUDA) tensors.
    if is_initialized() and dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_(tensors: MutableMapping[str, torch.Tensor]) -> MutableMapping[str, torch.Tensor]:
    """Sum each tensor over all ranks, in place, in sorted key order (every rank must pass the same keys
    and shapes). A no-op without a process group."""
    if not is_initialized() or world_size() == 1:
        return tensors
    with _collective("an all-reduce of accumulated sums"):
        for key in sorted(tensors):
            t = tensors[key]
            dev = _reduce_device(t)
            if dev == t.device and t.is_contiguous():
                dist.all_reduce(t)
            else:
                buf = t.to(dev).contiguous()
                dist.all_reduce(buf)
                t.copy_(buf)
    return tensors


def _reduce_numbers(values: tuple[float, ...], op: dist.ReduceOp, what: str) -> list[float]:
    if not is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    t = t.to(_reduce_device(t))
    with _collective(what):
        dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def all_reduce_scalars(*values: float) -> list[float]:
    """Sum Python numbers over all ranks in fp64 (token counts stay exact below 2**53)."""
    return _reduce_numbers(values, dist.ReduceOp.SUM, "an all-reduce of loss sums")


def all_reduce_max(*values: float) -> list[float]:
    """The largest value of each number over all ranks (e.g. peak memory per process)."""
    return _reduce_numbers(values, dist.ReduceOp.MAX, "an all-reduce of per-process figures")


def check_same(value: float, what: str) -> None:
    """Raise on every rank if `value` (e.g. a checksum of a decision) differs between ranks.

    Ranks decide independently from identical reduced totals; this guards the assumption cheaply.
    """
    if not is_initialized() or world_size() == 1:
        return
    t = torch.tensor([value, -value], dtype=torch.float64)
    t = t.to(_reduce_device(t))
    with _collective(f"a consistency check of {what}"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, neg_lo = t.cpu().tolist()
    if not (hi == -neg_lo or (math.isnan(hi) and math.isnan(neg_lo))):
        raise NumericalError(f"ranks disagree on {what} ({-neg_lo!r} vs {hi!r}); results would be inconsistent")


def broadcast_flag(value: bool) -> bool:
    """Rank 0's value of a yes/no question, on every rank (e.g. whether a stored stage exists)."""
    if not is_initialized() or world_size() == 1:
        return value
    t = torch.tensor([1.0 if value else 0.0], dtype=torch.float64)
    t = t.to(_reduce_device(t))
    with _collective("a broadcast from rank 0"):
        dist.broadcast(t, src=0)
    return bool(t.item())
