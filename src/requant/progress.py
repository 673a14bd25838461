"""Progress at the edges: a bar with ETA on a terminal, one summary line per stage on stderr otherwise, nothing
under --json (quiet) or on ranks other than 0.

A stage is an outermost bar: bars opened while one is running (the windows of each PQI node) draw on a
terminal but add no summary line of their own.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

from .distributed import is_main

T = TypeVar("T")
_QUIET = False
_OPEN: weakref.WeakSet = weakref.WeakSet()  # summary bars not yet closed


class _Discard:
    """A file that drops what is written (the summary bar draws nothing while it runs)."""

    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass


class _Summary(std_tqdm):
    """A bar that draws nothing and, when it closes, writes one line on stderr: what, how many, seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, file=_Discard(), mininterval=3600.0, **kwargs)
        _OPEN.add(self)

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.discard(self)
            count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
            elapsed = self.format_dict["elapsed"]
            print(f"{self.desc}: {count} {self.unit} in {elapsed:.1f} s", file=sys.stderr, flush=True)
        super().close()


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


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
    """A tqdm bar with ETA on a terminal; off a terminal, a stage's one summary line on stderr when it ends;
    nothing when quiet or on ranks other than 0 (under torchrun the ranks advance together, so rank 0's bar
    and ETA stand for the run)."""
    if _QUIET or not is_main():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True)
    if _terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=False, dynamic_ncols=True)
    if len(_OPEN):  # inside a running stage: its line speaks for it
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True)
    return _Summary(iterable, desc=desc, total=total, unit=unit)


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
