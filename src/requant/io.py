"""Safe writes of outputs: atomic files and directories, one writer per output, one-line write errors.

A killed process never leaves a half-written result in place. Each output has an exclusive lock beside it
(`.NAME.lock`, holding the writer's pid), so two runs never write the same output; a writer's temporaries
carry its pid (`.NAME.tmp-PID-*`), and the next writer of the same output removes those of dead processes.
Written files get the modes a plain `open` would give under the process umask. A failed write (out of space,
a read-only filesystem, no permission; safetensors reports these as a SafetensorError, not an OSError) becomes
one OutputError line naming the device and the path; so does a Rust-backed writer's error
(safetensors' SafetensorError, tokenizers' Exception) that carries an OS error code.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError, RequantError

__all__ = [
    "atomic_dir",
    "check_output",
    "device_of",
    "file_mode",
    "fix_modes",
    "lock_path",
    "output_lock",
    "read_json",
    "remove_stale",
    "write_error",
    "write_json_atomic",
    "writing",
]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")

# Locks this process holds: lock file → (fd, depth). A lock is re-entrant within the process, so a command that
# holds its output's lock for the whole run can call writers that take the same lock.
_HELD: dict[str, list[int]] = {}


# ----------------------------------------------------------------------------------------------------------
# Errors


def device_of(path: str | os.PathLike) -> str:
    """The device holding `path` and its mount point, e.g. "/dev/sda1 (mounted at /home)", from the mount table."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    mount = p
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == mount:
                return f"{fields[0]} (mounted at {mount})"
    return f"the device mounted at {mount}"


def _errno_of(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    # Rust-backed writers (safetensors' SafetensorError, tokenizers' plain Exception) end an I/O error's
    # message with "(os error N)".
    m = _OS_ERROR_CODE.search(str(e))
    return int(m.group(1)) if m else None


def write_error(e: BaseException, what: str | os.PathLike, *, any_errno: bool = True) -> OutputError | None:
    """The one-line error for a failed write of `what` (a path), or None when `e` is no I/O failure.

    With `any_errno` False only failures that can only come from writing (no space, read-only filesystem, file
    too large) are translated: the caller's block may also read, and a read error must not say "writing"."""
    code = _errno_of(e)
    if code is None:
        return None
    where = repr(str(what))
    if code in _NO_SPACE:
        return OutputError(f"no space left on {device_of(what)} while writing {where}")
    if code == errno.EROFS:
        return OutputError(f"cannot write {where}: {device_of(what)} is read-only")
    if not any_errno:
        return None
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {where}: permission denied ({getattr(e, 'filename', None) or what})")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else os.strerror(code)
    return OutputError(f"cannot write {where}: {reason}")


@contextlib.contextmanager
def writing(what: str | os.PathLike, hint: str = "", *, any_errno: bool = True) -> Iterator[None]:
    """Turn an I/O failure (OSError or SafetensorError) inside the block into one OutputError line about `what`,
    followed by `hint` (what was kept, what to do)."""
    try:
        yield
    except RequantError as e:
        if hint and isinstance(e, OutputError) and hint not in str(e):
            raise OutputError(f"{e}; {hint}") from None
        raise
    except Exception as e:
        err = write_error(e, what, any_errno=any_errno)
        if err is None:
            raise
        raise OutputError(f"{err}; {hint}" if hint else str(err)) from None


# ----------------------------------------------------------------------------------------------------------
# One writer per output


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of an output: `.NAME.lock` beside it."""
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, *, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of output `target` (flock on `.NAME.lock`, which holds our pid) for the block.

    Another process holding it makes this raise OutputError "another requant run (pid N) is writing TARGET",
    or, with `wait`, wait for it. Re-entrant within a process. The lock file is removed on release."""
    lp = str(lock_path(target))
    held = _HELD.get(lp)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    fd = _acquire(lp, str(target), wait)
    _HELD[lp] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[lp]
        # Unlink before closing: a process blocked on this inode re-checks the path after it wakes (_acquire).
        with contextlib.suppress(OSError):
            os.unlink(lp)
        os.close(fd)


def _acquire(lp: str, target: str, wait: bool) -> int:
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            err = write_error(e, target)
            raise (err or e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"another requant run (pid {pid}) is writing {target!r}; wait for it to finish or choose another output"
            ) from None
        # The previous holder may have unlinked the file between our open and our lock: then lock the new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lp))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of output `target` (`.NAME.tmp-*`, `.NAME.old-*`) that dead processes left;
    the removed paths. Call it with the output's lock held: then no live writer of `target` owns them.

    A temporary names its writer's pid; one of a live process (pid reuse) is left alone. One without a pid
    (written before temporaries carried it) cannot belong to a writer, since we hold the lock."""
    target = Path(os.path.abspath(target))
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(?:(\d+)(?:-|$))?")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m is None:
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def check_output(out: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Refuse an output path that a writer must never replace: the current directory or one above it, the
    filesystem root, the model being read (`source`) or a directory above it; a path under a file. Returns it."""
    given = str(out)
    p = Path(os.path.abspath(out))
    cwd = Path(os.getcwd())
    if p == Path(p.anchor):
        raise OutputError(f"output {given!r} is the filesystem root; name a new directory, e.g. -o ./out")
    if p == cwd or p in cwd.parents:
        what = "the current directory" if p == cwd else "a directory above the current one"
        raise OutputError(f"output {given!r} is {what}; name a new directory, e.g. -o ./out")
    if source is not None and os.path.exists(source):
        src = Path(os.path.abspath(source))
        if p == src or p in src.parents:
            raise OutputError(f"output {given!r} is (or contains) the model {str(source)!r} being read; choose another")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {given!r}: {str(parent)!r} is a file, not a directory")
            break
    return p


# ----------------------------------------------------------------------------------------------------------
# Atomic writes


def fix_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes a plain mkdir/open would under the umask (some writers,
    safetensors among them, create private 0600 temporaries and rename them into place)."""
    mask = _umask()
    for d, _dirs, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for name in files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(target: Path, *, replace: bool = False, wait: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; rename it to `target` when the block succeeds.

    The output's lock is held throughout (another writer: OutputError, or with `wait` wait for it) and stale
    temporaries of dead writers are removed first. On any exception the temporary directory is removed and
    `target` is untouched; an I/O failure becomes one OutputError line ("no space left on DEVICE while writing
    TARGET"). With `replace`, an existing `target` is swapped out only after the new one is complete. Files
    get the umask's modes."""
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target, wait=wait):
        remove_stale(target)
        with writing(target):
            tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
        try:
            # Errors of the caller's block: only unmistakable write failures are rephrased (it may also read).
            with writing(target, any_errno=False):
                yield tmp
            with writing(target):
                fix_modes(tmp)
                if target.exists() or target.is_symlink():
                    if not replace:
                        raise FileExistsError(target)
                    old = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.replace(target, old)
                    os.replace(tmp, target)
                    if old.is_dir() and not old.is_symlink():
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        old.unlink()
                else:
                    os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        os.chmod(tmp, file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_mode() -> int:
    """The mode a plain open() gives a new file under the process umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # Read it without changing it where Linux allows (os.umask would briefly set it for every thread).
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)
