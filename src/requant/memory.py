"""Process memory as the operating system sees it: peak resident set, and its anonymous part.

Resident memory (RSS) counts the pages of memory-mapped weight files (requant.offload) that happen to be
cached; the kernel can drop those under pressure. The anonymous part (RssAnon: tensors, activations) is what
the process cannot give back, so it is what bounds the model size a machine can run. Linux /proc only;
elsewhere the values fall back to getrusage's peak RSS, or 0. `tune_allocator` makes glibc return freed large
tensors to the system (the quantize and sensitivity commands call it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

GIB = 2**30
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (file pages are dropped, re-read on the next access)


def _status(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes, or None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _file_mapping(addr: int) -> tuple[int, int] | None:
    """(start, end) of the file-backed mapping of this process that holds `addr`, or None."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= addr < hi:
            file_backed = len(parts) >= 6 and parts[5].startswith("/") and parts[4] != "0"
            return (lo, hi) if file_backed else None
    return None


def release_file_pages(addr: int, nbytes: int) -> bool:
    """Drop from this process's resident set the whole pages of [addr, addr + nbytes) when they belong to a file
    mapping (a checkpoint's tensors loaded zero-copy), e.g. after a faster copy of them was made: they are clean
    page cache, read back from the file if ever touched again. Anonymous memory is never touched. True when the
    kernel took the hint (Linux 5.4+)."""
    span = _file_mapping(addr)
    if span is None or nbytes <= 0:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    lo = max(-(-addr // page) * page, span[0])
    hi = min((addr + nbytes) // page * page, span[1])
    if hi <= lo:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_PAGEOUT) == 0


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


# glibc's mallopt parameters (malloc.h); setting any of them turns off the dynamic mmap threshold.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # bytes: blocks this large get their own mapping, returned to the system when freed
TRIM_THRESHOLD = 64 << 20  # bytes of free memory at the heap's top before glibc gives it back
TRANSIENT_THRESHOLD = 32 << 20  # bytes: glibc's own ceiling for its dynamic threshold


def _libc() -> ctypes.CDLL | None:
    """This process's glibc, or None elsewhere (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # noqa: B018  (only glibc has all three)
    except (OSError, AttributeError):
        return None
    return libc


_tuned: bool | None = None


def tune_allocator() -> bool:
    """Pin glibc's mmap threshold at `MMAP_THRESHOLD` bytes (and the trim threshold), once per process; True
    where applied (glibc), False elsewhere.

    glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MiB), so after
    the first layer-sized tensor is freed every later one comes from the heap, whose freed holes the process
    keeps: the resident memory then stays at the largest set of tensors ever alive at once, plus
    fragmentation. With the threshold pinned, every tensor of a megabyte or more is its own mapping and its
    memory goes back to the system when it is freed. A threshold the user set (MALLOC_MMAP_THRESHOLD_) is kept."""
    global _tuned
    if _tuned is None:
        libc = None if "MALLOC_MMAP_THRESHOLD_" in os.environ else _libc()
        _tuned = bool(
            libc is not None
            and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    return _tuned


@contextlib.contextmanager
def transient_allocations() -> Iterator[None]:
    """Inside, work whose tensors die young and that is not where a run peaks (Algorithm 1's candidate fits, the
    dense fit, the Fisher pass) reuses the heap: with the pinned threshold every megabyte-sized temporary is a
    fresh mapping, page-faulted and zeroed anew (on R: 22 M page faults, 5× the system time of the run without
    the pin). After, the pinned threshold again, and the heap's free pages go back to the system. A no-op where
    `tune_allocator` did not apply."""
    libc = _libc() if _tuned else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, TRANSIENT_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.malloc_trim(0)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
