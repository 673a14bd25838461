"""Optional C sources built on first use with the system compiler and loaded with ctypes.

Nothing here is needed to import requant: without a compiler, when a build fails, or with REQUANT_KERNELS=0,
`NativeLibrary.get()` returns None and says why in `reason`, and callers use their pure-PyTorch path.
A built library is cached under <requant cache>/kernels, keyed by a hash of the source, the compiler (path,
size, mtime), the flags, the CPU's feature flags and the ABI version, so each source is compiled once per
machine; it is written under a temporary name and renamed, so concurrent builders never load a half file.
Only a cache directory and libraries owned by the current user and not writable by others are used (as ssh and
pip require): with a shared or loose cache, libraries are built in a private directory of the process instead,
with a warning, and a library at the predictable name that fails the check is replaced, never loaded.
Every source exports `int rq_abi_version(void)`; `const char *rq_isa(void)`, when present, names the
instruction set it was compiled for.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "ENV_SWITCH",
    "FLAG_SETS",
    "NativeLibrary",
    "build",
    "compiler",
    "cpu_key",
    "enabled",
    "load",
    "safe_cache_dir",
    "unsafe_reason",
]

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
    out_dir = safe_cache_dir(Path(out_dir) if out_dir is not None else cache_dir() / "kernels")
    stem = Path(source).stem
    ident = f"{_compiler_id(cc)}|{cpu_key()}|abi={abi_version}"
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(text + f"|{ident}|{' '.join(flags)}".encode()).hexdigest()[:16]
        target = out_dir / f"{stem}-{key}.so"
        if target.is_file() or target.is_symlink():
            if unsafe_reason(target, directory=False) is None:
                return target
            target.unlink()  # not ours, or others can change it: never load it; build our own in its place
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            cmd = [cc, *flags, "-std=gnu11", "-shared", "-fPIC", "-o", tmp, str(source), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.chmod(tmp, 0o755)  # never writable by others, whatever the umask
                os.replace(tmp, target)  # atomic: a concurrent builder sees no file or a whole one
                return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        errors.append(f"{' '.join(flags)}: {last[0]}")
    raise RuntimeError("; ".join(errors))


def unsafe_reason(path: Path, *, directory: bool = True) -> str | None:
    """Why code at `path` must not be loaded, or None: it (a directory or a library) must be owned by the current
    user and not writable by group or others, and every directory above it owned by the user or root and not
    writable by others unless sticky (like /tmp). The rules ssh applies to its key files."""
    uid = os.getuid()
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path} cannot be inspected: {e.strerror or e}"
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind:
        return f"{path} is not a {'directory' if directory else 'regular file'}"
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    for parent in Path(os.path.abspath(path)).parents:
        pst = os.stat(parent)
        if pst.st_uid not in (uid, 0):
            return f"{parent} is owned by uid {pst.st_uid}, neither you nor root"
        if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
            return f"{parent} is writable by others"
    return None


_PRIVATE: list[Path] = []  # this process's fallback build directory, made on first need


def safe_cache_dir(wanted: Path) -> Path:
    """`wanted` (created 0700 when missing) if libraries may be loaded from it; else a private directory of this
    process, with a warning: another user could place a library under a predictable name in a shared cache."""
    with contextlib.suppress(OSError):
        wanted.mkdir(parents=True, exist_ok=True, mode=0o700)  # an existing one keeps its owner's choice of mode
    reason = unsafe_reason(wanted)
    if reason is None:
        return wanted
    if not _PRIVATE:
        private = Path(tempfile.mkdtemp(prefix="requant-kernels-"))
        atexit.register(shutil.rmtree, private, ignore_errors=True)  # loaded libraries stay mapped
        _PRIVATE.append(private)
        warnings.warn(
            f"requant: not using the kernel cache {wanted} ({reason}); C kernels are built in the private "
            f"directory {private} for this process instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return _PRIVATE[0]


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
