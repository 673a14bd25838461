"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..decode import COMPILE_CHOICES, DECODER_CHOICES


def percent(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number (percent of quantized weights)") from None


# Settings given in percent of the quantized weights (parsed with `percent` for a clearer error).
PERCENT_SETTINGS = ("outliers", "significant", "step")


def _parser_of(name: str, annotation: str) -> Callable[[str], Any]:
    if name in PERCENT_SETTINGS:
        return percent
    kinds = {k.strip() for k in str(annotation).split("|")} - {"None"}
    if "int" in kinds:
        return int
    if "float" in kinds:
        return float
    return str


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Iterable[str],
    *,
    defaults: Mapping[str, Any] | None = None,
    unset: Iterable[str] = (),
    flags: Mapping[str, str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """One flag per QuantConfig setting, generated from its field: --NAME-WITH-DASHES (or `flags[name]`), the
    type, the default (the config's or `defaults[name]`), the help text and the allowed values.

    Settings in `unset` default to None (a --recipe may fill them); `notes` add a command's own words to the help.
    """
    from ..config import QuantConfig

    unset = set(unset)
    for name in names:
        f = QuantConfig.field_info(name)
        default = (defaults or {}).get(name, f.default)
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        choices = f.metadata.get("choices")  # shown by the metavar {a,b,c}; checked by QuantConfig
        text = f.metadata["help"]
        if notes and name in notes:
            text += f" ({notes[name]})"
        elif name in unset:
            text += " (or the recipe's)" if default is None else f" (default: {default}, or the recipe's)"
        elif default not in (None, (), False):
            text += f" (default: {default})"
        text = text.replace("%", "%%")  # argparse formats help with %
        if f.type == "bool":
            parser.add_argument(
                flag, dest=name, action="store_true", default=None if name in unset else False, help=text
            )
        elif str(f.type).startswith("tuple"):
            parser.add_argument(flag, dest=name, action="append", default=[], help=text)
        else:
            parser.add_argument(
                flag,
                dest=name,
                type=_parser_of(name, str(f.type)),
                default=None if name in unset else default,
                metavar="{" + ",".join(map(str, choices)) + "}" if choices else None,
                help=text,
            )


def build_config(args: argparse.Namespace, settings: Mapping[str, Any] | None = None) -> Any:
    """The QuantConfig of the parsed flags: its defaults, then `settings` (e.g. a recipe's), then every setting
    the command has a flag for and the user gave (or whose flag has its own default)."""
    from ..config import QuantConfig

    values = dict(settings or {})
    for f in dataclasses.fields(QuantConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if str(f.type).startswith("tuple") else v
    return QuantConfig(**values)


CALIBRATION = ("calib", "nsamples", "seqlen", "seed", "bos")


def add_calib(p: argparse.ArgumentParser, **kw: Any) -> None:
    """The calibration flags (--calib, --nsamples, --seqlen, --seed, --bos); keywords as add_config_options."""
    add_config_options(p.add_argument_group("calibration"), CALIBRATION, **kw)


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


def add_lm_head_flag(p: argparse.ArgumentParser) -> None:
    """--lm-head: how the output projection (and the embeddings) are served (format.serving)."""
    p.add_argument(
        "--lm-head",
        choices=("auto", "16bit", "int8", "fp32"),
        default="auto",
        help="output projection and embeddings: auto (default; a checkpoint's stored 16 bits, fp32 compute), 16bit, "
        "int8 (output projection only, per-row scales: lossy, opt-in) or fp32",
    )


def add_decoder_flags(p: argparse.ArgumentParser, decoder_help: str) -> None:
    """--decoder and --compile: which greedy decode loop runs on CPU (requant.decode), and whether its step is
    compiled."""
    p.add_argument("--decoder", choices=(*DECODER_CHOICES, "transformers"), default="auto", help=decoder_help)
    p.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="off",
        help="torch.compile the static decoder's step (needs a C++ compiler; a one-off compile of a minute or "
        "more, done during the warm-up)",
    )


def add_verify_flag(p: argparse.ArgumentParser) -> None:
    """--no-verify: load a checkpoint without checking its files' recorded sha256s."""
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the checkpoint files' sha256 check (faster)"
    )
