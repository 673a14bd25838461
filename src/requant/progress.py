"""Progress bars at the edges: shown on a terminal, silent under --json or when quiet() is set."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from .distributed import is_main

T = TypeVar("T")
_QUIET = False


def set_quiet(value: bool) -> None:
    """Silence every progress bar (the CLI does this under --json)."""
    global _QUIET
    _QUIET = value


def is_quiet() -> bool:
    return _QUIET


def bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = False,
) -> tqdm:
    """A tqdm bar that hides itself when quiet, when stderr is not a terminal, or on ranks other than 0
    (under torchrun the ranks advance together, so rank 0's bar and ETA stand for the run)."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        disable=True if _QUIET or not is_main() else None,
        dynamic_ncols=True,
    )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' own loading bars and warnings off the user's terminal."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was:
            hf_logging.enable_progress_bar()
