"""requant.io and the work directory's ownership: atomic writes, the output lock, stale temporaries, file modes,
one-line write errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from requant import distributed, io, workdir
from requant.errors import OutputError


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_dir_files_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    out = tmp_path / "ckpt"
    with io.atomic_dir(out) as tmp:
        save_file({"a": torch.zeros(3)}, str(tmp / "model.safetensors"))  # safetensors itself writes 0600
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.json").write_text("{}")
        io.write_json_atomic(tmp / "meta.json", {"a": 1})
    modes = _modes(out)
    assert modes == {
        ".": dir_mode,
        "model.safetensors": file_mode,
        "sub": dir_mode,
        "sub/x.json": file_mode,
        "meta.json": file_mode,
    }
    assert not (tmp_path / ".ckpt.lock").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(("mask", "file_mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_quantized_checkpoint_and_stages_follow_the_umask(tmp_path, umask, model_dir, text_file, mask, file_mode):
    from requant.cli import main

    umask(mask)
    out = tmp_path / "q"
    argv = ["quantize", str(model_dir), "-o", str(out), "--base", "rtn", "--calib", str(text_file)]
    assert main([*argv, "--nsamples", "2", "--seqlen", "32", "--keep-work", "--json"]) == 0
    for root in (out, tmp_path / "q.work"):
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files and {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: file_mode for p in files}


def test_atomic_dir_failure_leaves_nothing_and_translates_a_full_disk(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(OutputError, match=r"^no space left on .+ while writing '.*ckpt'$"), io.atomic_dir(out) as tmp:
        (tmp / "a").write_text("x")
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')
    assert list(tmp_path.iterdir()) == []
    # A read error inside the block is not a write failure: it passes unchanged.
    with pytest.raises(FileNotFoundError), io.atomic_dir(out):
        open(tmp_path / "missing")  # noqa: SIM115
    assert list(tmp_path.iterdir()) == []


def test_write_error_messages():
    full = io.write_error(OSError(errno.ENOSPC, "No space left on device"), "/x/y")
    assert str(full).startswith("no space left on ") and str(full).endswith("while writing '/x/y'")
    quota = io.write_error(SafetensorError("I/O error: Disk quota exceeded (os error 122)"), "/x/y")
    assert "no space left" in str(quota)
    assert "read-only" in str(io.write_error(OSError(errno.EROFS, "Read-only file system"), "/x"))
    assert "permission denied" in str(io.write_error(PermissionError(errno.EACCES, "Permission denied"), "/x"))
    assert io.write_error(PermissionError(errno.EACCES, "Permission denied"), "/x", any_errno=False) is None
    assert io.write_error(SafetensorError("header too large"), "/x") is None
    tokenizers_style = io.write_error(Exception("No space left on device (os error 28)"), "/x")
    assert "no space left" in str(tokenizers_style)
    assert io.write_error(ValueError("no"), "/x") is None
    with pytest.raises(OutputError, match=r"no space left .*; keep calm"), io.writing("/x/y", "keep calm"):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_device_of_names_the_mount_table_entry(tmp_path):
    dev = io.device_of(tmp_path / "not" / "yet")
    assert "mounted at /" in dev


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
sys.stdin.readline()
"""


def _hold(lock: Path) -> subprocess.Popen:
    """Another process holding `lock` until a line arrives on its stdin."""
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_output_lock_excludes_another_process_and_is_reentrant(tmp_path):
    out = tmp_path / "o"
    with io.output_lock(out):
        assert io.lock_path(out).read_text().strip() == str(os.getpid())
        with io.output_lock(out):  # the same process again: fine
            pass
        assert io.lock_path(out).exists()
        # Another process is refused while we hold it.
        probe = (
            f"import sys; sys.path[:0] = {sys.path!r}\n"
            f"from requant import io\nwith io.output_lock({str(out)!r}):\n pass"
        )
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert proc.returncode != 0 and f"another requant run (pid {os.getpid()}) is writing" in proc.stderr
    assert not io.lock_path(out).exists()  # released and removed

    holder = _hold(io.lock_path(out))
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = rf"another requant run \(pid {holder.pid}\) is writing '.*o'"
        with pytest.raises(OutputError, match=busy), io.output_lock(out):
            pass
    finally:
        holder.communicate("\n")
    with io.output_lock(out):  # free again once the holder is gone
        pass


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_removes_dead_runs_only(tmp_path):
    out = tmp_path / "o"
    dead, live = _dead_pid(), os.getppid()
    names = [f".o.tmp-{dead}-x1", f".o.old-{dead}", ".o.tmp-legacy", f".o.tmp-{live}-x2", ".other.tmp-1-x", "o"]
    for n in names:
        (tmp_path / n).mkdir()
    removed = io.remove_stale(out)
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])


def test_atomic_dir_names_its_pid_and_cleans_up_a_killed_writer(tmp_path):
    out = tmp_path / "o"
    script = (
        f"import os, sys; sys.path[:0] = {sys.path!r}\nfrom requant import io\n"
        f"with io.atomic_dir(__import__('pathlib').Path({str(out)!r})) as tmp:\n"
        "    (tmp / 'half').write_text('x')\n    os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9  # killed mid-write
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.tmp-")]
    assert len(left) == 1
    with io.atomic_dir(out) as tmp:
        (tmp / "whole").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and (out / "whole").is_file()


def test_check_output_refuses_dangerous_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "afile").write_text("x")
    for bad, msg in [
        (".", "is the current directory"),
        ("..", "above the current one"),
        ("/", "filesystem root"),
        ("afile/o", "is a file"),
        ("model", "being read"),
    ]:
        with pytest.raises(OutputError, match=msg):
            io.check_output(bad, source="model")
    assert io.check_output("new/out", source="model") == tmp_path / "new" / "out"


def test_work_dir_marker_guards_deletion(tmp_path):
    work = tmp_path / "o.work"
    work.mkdir()
    (work / "mine.txt").write_text("user data")
    with pytest.raises(OutputError, match="did not create"):
        workdir.remove_work_dir(work)
    assert (work / "mine.txt").read_text() == "user data"
    (work / "mine.txt").unlink()
    workdir.remove_work_dir(work)  # an empty directory holds nothing of the user's
    assert not work.exists()
    workdir.make_work_dir(work)
    (work / "dense.json").write_text("{}")
    assert workdir.is_work_dir(work)
    workdir.remove_work_dir(work)
    assert not work.exists()
    work.write_text("a file")
    with pytest.raises(OutputError, match="not a directory"):
        workdir.remove_work_dir(work)


def test_workdir_resume_marks_an_old_unmarked_run(tmp_path, text_file):
    from helpers import requant_config

    cfg = requant_config(text_file)
    wd = workdir.WorkDir(tmp_path / "w", cfg)
    (tmp_path / "w" / workdir.MARKER).unlink()  # as made before markers existed
    with pytest.raises(OutputError):
        workdir.check_work_dir(tmp_path / "w")
    workdir.check_work_dir(tmp_path / "w", resume=True)
    (tmp_path / "w" / ".dense.abc.safetensors").write_bytes(b"half")  # a killed stage write
    (tmp_path / "w" / ".tmpXyZ").write_bytes(b"half")  # safetensors' own temporary
    workdir.WorkDir(tmp_path / "w", cfg, resume=True)
    assert workdir.is_work_dir(wd.path)
    assert sorted(p.name for p in wd.path.iterdir()) == [workdir.MARKER, workdir.CONFIG]


def test_claim_output_under_a_fake_group(tmp_path, monkeypatch):
    # Rank 1 of 2 whose rank 0 failed: it takes no lock, writes nothing and fails too.
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_flag", lambda value: False)
    with pytest.raises(OutputError, match="rank 0 cannot write"), workdir.claim_output(tmp_path / "o"):
        pass
    assert list(tmp_path.iterdir()) == []
    # Rank 0 whose lock is held elsewhere: its own message, after telling the others.
    told = []
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    monkeypatch.setattr(distributed, "broadcast_flag", lambda value: told.append(value) or value)
    holder = _hold(io.lock_path(tmp_path / "o"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match="another requant run"), workdir.claim_output(tmp_path / "o"):
            pass
    finally:
        holder.communicate("\n")
    assert told == [False]
