"""Optional C sources built on first use with the system compiler and loaded with ctypes.

Nothing here is needed to import requant: without a compiler, when a build fails, or with REQUANT_KERNELS=0,
`NativeLibrary.get()` returns None and says why in `reason`, and callers use their pure-PyTorch path.
A built library is cached under <requant cache>/kernels, keyed by a hash of the source, the compiler (path,
size, mtime), the flags, the CPU's feature flags and the ABI version, so each source is compiled once per
machine; it is written under a temporary name and renamed, so concurrent builders never load a half file.
Every source exports `int rq_abi_version(void)`; `const char *rq_isa(void)`, when present, names the
instruction set it was compiled for.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["ENV_SWITCH", "FLAG_SETS", "NativeLibrary", "build", "compiler", "cpu_key", "enabled", "load"]

ENV_SWITCH = "REQUANT_KERNELS"  # "0" / "off" / "false" / "no" disables every native library

# -ffp-contract=off: no fused multiply-add where a PyTorch reference rounds twice; the second set is for
# compilers or CPUs without -march=native.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-ffp-contract=off", "-pthread"),
    ("-O3", "-ffp-contract=off", "-pthread"),
)


def enabled() -> bool:
    """False when the environment switch turns native code off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def cpu_key() -> str:
    """Machine architecture and CPU feature flags: a -march=native build is only valid on the same ones."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}:{flags.strip()}"


def compiler() -> str | None:
    """The C compiler: $CC, else cc, gcc or clang on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compiler_id(cc: str) -> str:
    """The compiler's path plus its resolved file's size and mtime, so an upgraded compiler rebuilds."""
    path = shutil.which(cc) or cc
    try:
        st = os.stat(os.path.realpath(path))
        return f"{cc}:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return cc


def build(
    source: Path,
    cc: str,
    *,
    abi_version: int,
    flag_sets: Sequence[Sequence[str]] = FLAG_SETS,
    out_dir: Path | None = None,
) -> Path:
    """Compile `source` into a shared library with the first flag set that works (cached); its path.

    Raises RuntimeError naming each flag set's last compiler error line when none works, OSError when the
    compiler cannot be run.
    """
    from .assets import cache_dir

    text = Path(source).read_bytes()
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / "kernels"
    stem = Path(source).stem
    ident = f"{_compiler_id(cc)}|{cpu_key()}|abi={abi_version}"
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(text + f"|{ident}|{' '.join(flags)}".encode()).hexdigest()[:16]
        target = out_dir / f"{stem}-{key}.so"
        if target.is_file():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            cmd = [cc, *flags, "-std=gnu11", "-shared", "-fPIC", "-o", tmp, str(source), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: a concurrent builder sees no file or a whole one
                return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        errors.append(f"{' '.join(flags)}: {last[0]}")
    raise RuntimeError("; ".join(errors))


def load(path: Path, abi_version: int) -> ctypes.CDLL:
    """Load a built library and check that it exports the expected `rq_abi_version()`."""
    lib = ctypes.CDLL(str(path))
    lib.rq_abi_version.restype = ctypes.c_int
    found = lib.rq_abi_version()
    if found != abi_version:
        raise RuntimeError(f"{path}: ABI version {found} != {abi_version}")
    return lib


class NativeLibrary:
    """One optional C source, compiled and loaded on the first `get()`; None (with `reason`) when unavailable.

    `declare(lib)` sets the argtypes/restype of the library's functions once after loading. A failed build
    is not retried in the same process; the environment switch is read on every `get()`.
    """

    def __init__(
        self,
        source: Path,
        abi_version: int,
        declare: Callable[[ctypes.CDLL], None] | None = None,
        *,
        flag_sets: Sequence[Sequence[str]] = FLAG_SETS,
    ) -> None:
        self.source, self.abi_version, self.declare, self.flag_sets = Path(source), abi_version, declare, flag_sets
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._reason = "not built yet"
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, building it on first use; None when disabled or unavailable."""
        if not enabled():
            return None
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                self._lib, self._reason = self._open()
                self._tried = True
        return self._lib

    @property
    def reason(self) -> str:
        """Why the library is (not) in use: 'loaded (<isa>)', 'disabled by …', or the build error."""
        if not enabled():
            return f"disabled by {ENV_SWITCH}=0"
        self.get()
        return self._reason

    def _open(self) -> tuple[ctypes.CDLL | None, str]:
        cc = compiler()
        if cc is None:
            return None, "no C compiler found (set CC)"
        try:
            lib = load(build(self.source, cc, abi_version=self.abi_version, flag_sets=self.flag_sets), self.abi_version)
            if self.declare is not None:
                self.declare(lib)
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
            return None, f"build or load of {self.source.name} failed: {e}"
        isa = "unknown ISA"
        if hasattr(lib, "rq_isa"):
            lib.rq_isa.restype = ctypes.c_char_p
            isa = lib.rq_isa().decode()
        return lib, f"loaded ({isa})"
