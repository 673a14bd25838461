"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def percent(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number (percent of quantized weights)") from None


def add_calib(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default="wiki:train", help="calibration text (default: wiki:train)")
    g.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: 32)")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    g.add_argument("--seed", type=int, default=0, help="seed of the window sampling (default: 0)")


def add_offload(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--offload",
        metavar="DIR",
        default=None,
        help="keep the model's weights in memory-mapped files under DIR (rebuilt at start; one subfolder per "
        "torchrun rank) and recompute each block in backward: for models larger than memory, CPU only",
    )


def offload_folder(args: argparse.Namespace) -> str | None:
    """This process's offload folder (ranks must not share one: the PQI path writes into the files)."""
    from .. import distributed

    if args.offload is None:
        return None
    return str(Path(args.offload) / f"rank-{distributed.rank()}") if distributed.world_size() > 1 else args.offload


def emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    """Print `obj` as JSON under --json, else the human-readable `text`."""
    print(json.dumps(obj, indent=2) if args.json else text)


def add_verify_flag(p: argparse.ArgumentParser) -> None:
    """--no-verify: load a checkpoint without checking its files' recorded sha256s."""
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the checkpoint files' sha256 check (faster)"
    )
