"""Process memory as the operating system sees it: peak resident set, and its anonymous part.

Resident memory (RSS) counts the pages of memory-mapped weight files (requant.offload) that happen to be
cached; the kernel can drop those under pressure. The anonymous part (RssAnon: tensors, activations) is what
the process cannot give back, so it is what bounds the model size a machine can run. Linux /proc only;
elsewhere the values fall back to getrusage's peak RSS, or 0.
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

GIB = 2**30


def _status(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes, or None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def anon_rss() -> int:
    """Resident anonymous memory now, in bytes (0 where unknown)."""
    return _status("RssAnon") or 0


class PeakAnon:
    """Samples RssAnon every `interval` seconds in a daemon thread while active; `.peak` is the largest seen.

    Linux keeps no high-water mark of the anonymous part alone, hence sampling (a short peak can be missed)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = anon_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, anon_rss())

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())
