"""The fault table: every bad input and fault a user can cause at the command line, and what requant promises.

Each case sets up its fault in a fresh directory (the working directory while it runs), runs `requant` in this
process and checks its promise (exit code, one line naming the problem, what is left on disk). tests/test_faults.py
runs every case and compares its message with docs/faults.md; `python benchmarks/faults_table.py` runs them
and writes that file, so the document says what the code does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

FAST = ["--nsamples", "2", "--seqlen", "32"]


@dataclasses.dataclass
class Env:
    """Shared inputs of all cases: a tiny model directory, a text file and a requant checkpoint of the model."""

    root: Path
    model: Path
    text: Path
    checkpoint: Path


@dataclasses.dataclass
class Ctx:
    """One case's run: its directory (the working directory), the shared inputs, a monkeypatch, a cleanup stack."""

    dir: Path
    env: Env
    mp: pytest.MonkeyPatch
    stack: contextlib.ExitStack


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    case: str  # what the user did
    setup: Callable[[Ctx], list[str]]  # prepares the fault, returns the argv
    code: int  # the promised exit code
    must: str  # a fragment the message must hold (checked even when the document is stale)
    promise: str  # what is (not) left behind
    check: Callable[[Ctx], None] | None = None  # the promise about the disk


def make_env(root: Path) -> Env:
    """Write the tiny model, a text and a 3-bit RTN checkpoint of the model under `root`."""
    from helpers import byte_tokenizer, tiny_llama
    from requant.cli import main

    root.mkdir(parents=True, exist_ok=True)
    model = root / "tiny"
    tiny_llama().save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    text = root / "text.txt"
    words = ["alpha", "beta", "gamma", "delta", "quant", "weight", "loss", "model", "token", "layer"]
    text.write_text(" ".join(words[(i * 7 + i // 3) % len(words)] for i in range(3000)), encoding="utf-8")
    ckpt = root / "ckpt"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["quantize", str(model), "-o", str(ckpt), "--base", "rtn", "--calib", str(text), *FAST, "--json"])
    assert code == 0
    return Env(root, model, text, ckpt)


def run_case(case: Case, env: Env, case_dir: Path) -> tuple[int, str]:
    """Run one case in `case_dir`; its exit code and its normalized stderr (checked: the promise holds)."""
    from requant.cli import main

    case_dir.mkdir(parents=True)
    err = io.StringIO()
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        mp.chdir(case_dir)
        ctx = Ctx(case_dir, env, mp, stack)
        argv = case.setup(ctx)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = int(e.code or 0)
        if case.check is not None:
            case.check(ctx)
    return code, normalize(err.getvalue(), case_dir, env)


def normalize(text: str, case_dir: Path, env: Env) -> str:
    """Stderr without what differs between machines and runs: directories, device names, pids."""
    from requant.io import device_of

    text = text.replace(str(case_dir) + "/", "").replace(str(case_dir), ".")
    text = text.replace(str(env.root), "…")
    text = text.replace(device_of(case_dir), "DEVICE")
    return re.sub(r"\bpid \d+", "pid N", text)


PROGRESS_LINE = re.compile(r"[^:\n]+: \d+(/\d+)? \S+ in \d+\.\d s")  # a stage's summary line (requant.progress)


def error_lines(stderr: str) -> list[str]:
    """What stderr says besides the stages' progress summaries (printed when stderr is not a terminal)."""
    return [x for x in stderr.strip().splitlines() if x.strip() and not PROGRESS_LINE.fullmatch(x)]


def message(stderr: str) -> str:
    """The line a user reads: the last one (argparse prints its usage block above it), progress summaries aside."""
    lines = error_lines(stderr)
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------------------------------
# Set-ups and checks


def _quantize(ctx: Ctx, *extra: str, model: str | None = None) -> list[str]:
    return ["quantize", model or str(ctx.env.model), "--base", "rtn", "--calib", str(ctx.env.text), *FAST, *extra]


def _nothing_at(*names: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        for name in names:
            assert not (ctx.dir / name).exists(), f"{name} was left behind"
        assert not list(ctx.dir.glob(".*.tmp-*")), "a temporary was left behind"

    return check


def _bad_gguf(data: Callable[[Ctx], bytes]) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        (ctx.dir / "m.gguf").write_bytes(data(ctx))
        ctx.mp.setenv("REQUANT_CACHE", str(ctx.dir / "cache"))  # where a conversion would be cached
        return ["quantize", "m.gguf", "-o", "o"]

    return setup


def _nothing_cached(ctx: Ctx) -> None:
    _nothing_at("o", "o.work")(ctx)
    models = ctx.dir / "cache" / "models"
    assert not models.exists() or not any(models.iterdir()), "a conversion was left in the cache"


def _truncated_gguf(ctx: Ctx) -> bytes:
    from requant.assets import default_gguf

    with open(default_gguf(), "rb") as f:
        return f.read(4096)  # the header and part of the metadata


class Payload:
    """An object torch's weights-only unpickler refuses (it would need to import this class)."""

    def __init__(self) -> None:
        self.note = "harmless"


def _pickled_model(ctx: Ctx) -> list[str]:
    import torch

    from helpers import byte_tokenizer, tiny_llama

    model = tiny_llama()
    d = ctx.dir / "pickled"
    model.config.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    state = dict(model.state_dict())
    state["extra"] = Payload()
    torch.save(state, d / "pytorch_model.bin")
    return _quantize(ctx, "-o", "o", model=str(d))


def _read_only_parent(ctx: Ctx) -> list[str]:
    ro = ctx.dir / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        ctx.stack.callback(ro.chmod, 0o755)
    else:  # root writes anywhere: make the directory refuse like a read-only one would
        real_open = os.open

        def refusing_open(path, flags, *a, **k):
            if str(path).startswith(str(ro) + os.sep) and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)

        ctx.mp.setattr(os, "open", refusing_open)
    return _quantize(ctx, "-o", "ro/o")


def _work_file(ctx: Ctx) -> list[str]:
    (ctx.dir / "o.work").write_text("my notes\n")
    return _quantize(ctx, "-o", "o")


def _work_user_files(ctx: Ctx) -> list[str]:
    (ctx.dir / "o.work").mkdir()
    (ctx.dir / "o.work" / "notes.txt").write_text("my notes\n")
    return _quantize(ctx, "-o", "o")


def _offload_user_files(ctx: Ctx) -> list[str]:
    (ctx.dir / "mine").mkdir()
    (ctx.dir / "mine" / "notes.txt").write_text("my notes\n")
    return _quantize(ctx, "-o", "o", "--offload", "mine")


def _user_files_kept(name: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        p = ctx.dir / name
        assert p.read_text() == "my notes\n"
        assert not (ctx.dir / "o").exists()

    return check


_SQ = ("--base", "squeezellm", "--outliers", "0.5")  # stages: fisher, dense


def _full_disk(where: str) -> Callable[[Ctx], list[str]]:
    """Make the first safetensors write into `where` ("stage dense" or "checkpoint") fail with ENOSPC, as
    safetensors reports it (a SafetensorError, not an OSError)."""

    def setup(ctx: Ctx) -> list[str]:
        import safetensors.torch
        from safetensors import SafetensorError

        real = safetensors.torch.serialize_file

        def full(tensors, filename, metadata=None):
            name = str(filename)
            hit = ".o.tmp-" in name if where == "checkpoint" else ("o.work" in name and ".dense." in name)
            if hit:
                raise SafetensorError(
                    f'Error while serializing: I/O error: No space left on device (os error 28) at path "{name}"'
                )
            return real(tensors, filename, metadata=metadata)

        ctx.mp.setattr(safetensors.torch, "serialize_file", full)
        return _quantize(ctx, "-o", "o", *_SQ)

    return setup


def _stages_kept_and_resumable(*stages: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        from requant.cli import main

        work = ctx.dir / "o.work"
        for stage in stages:
            assert (work / f"{stage}.json").is_file(), f"stage {stage} was lost"
        assert not (ctx.dir / "o").exists() and not list(ctx.dir.glob(".o.tmp-*"))
        ctx.mp.undo()  # the disk has room again
        ctx.mp.chdir(ctx.dir)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(_quantize(ctx, "-o", "o", *_SQ, "--resume")) == 0
        assert (ctx.dir / "o" / "model.safetensors").is_file() and not work.exists()

    return check


def _hold_lock(ctx: Ctx) -> list[str]:
    from requant.io import lock_path

    lock = lock_path(ctx.dir / "o")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    ctx.stack.callback(holder.wait)
    ctx.stack.callback(holder.kill)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return _quantize(ctx, "-o", "o")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel reuses it)


def _stale_temporaries(ctx: Ctx) -> list[str]:
    for name in (f".o.tmp-{_dead_pid()}-abc123", ".o.tmp-legacy1", f".o.old-{_dead_pid()}"):
        (ctx.dir / name).mkdir()
        (ctx.dir / name / "model.safetensors").write_bytes(b"x" * 1000)
    return _quantize(ctx, "-o", "o")


def _stale_removed(ctx: Ctx) -> None:
    assert not list(ctx.dir.glob(".o.*")), "stale temporaries were not removed"
    assert (ctx.dir / "o" / "model.safetensors").is_file()


def _not_a_checkpoint(ctx: Ctx) -> list[str]:
    (ctx.dir / "o").mkdir()
    (ctx.dir / "o" / "notes.txt").write_text("my notes\n")
    return _quantize(ctx, "-o", "o")


def _file_parent(ctx: Ctx) -> list[str]:
    (ctx.dir / "afile").write_text("my notes\n")
    return _quantize(ctx, "-o", "afile/o")


def _tampered(edit: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    """A copy of the checkpoint with one edit, evaluated."""

    def setup(ctx: Ctx) -> list[str]:
        import shutil

        ckpt = ctx.dir / "ckpt"
        shutil.copytree(ctx.env.checkpoint, ckpt)
        edit(ckpt)
        return ["eval", str(ckpt), "--data", str(ctx.env.text), "--seqlen", "32"]

    return setup


def _flip_code_byte(ckpt: Path) -> None:
    import json

    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8 : 8 + n])["model.layers.0.self_attn.q_proj.weight"]["data_offsets"][0]
    data[8 + n + begin] ^= 0x01
    f.write_bytes(bytes(data))


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        import json

        cfg = json.loads((ckpt / "config.json").read_text())
        change(cfg["quantization_config"])
        (ckpt / "config.json").write_text(json.dumps(cfg))

    return edit


def _generate(*flags: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["generate", str(ctx.env.checkpoint), "hello", "--max-new-tokens", "2", *flags]


CASES: list[Case] = [
    Case(
        "bits-not-allowed",
        "`quantize --bits 5`",
        lambda ctx: _quantize(ctx, "-o", "o", "--bits", "5"),
        2,
        "bits 5 is not allowed",
        "nothing written",
        _nothing_at("o", "o.work"),
    ),
    Case(
        "argparse-type",
        "`quantize --bits abc` (a flag's type is wrong)",
        lambda ctx: _quantize(ctx, "-o", "o", "--bits", "abc"),
        2,
        "invalid int value: 'abc'",
        "argparse's usage block above the line (the convention); nothing written",
        _nothing_at("o", "o.work"),
    ),
    Case(
        "gguf-not-gguf",
        "a `.gguf` file of random bytes",
        _bad_gguf(lambda ctx: os.urandom(4096)),
        2,
        "is not a GGUF file",
        "nothing written, nothing cached",
        _nothing_cached,
    ),
    Case(
        "gguf-truncated",
        "a truncated `.gguf` file (its first 4 KiB)",
        _bad_gguf(_truncated_gguf),
        2,
        "is not a readable GGUF model",
        "nothing written, nothing cached",
        _nothing_cached,
    ),
    Case(
        "pickle-refused",
        "a model directory whose `pytorch_model.bin` pickles an object (not plain tensors)",
        _pickled_model,
        2,
        "weights-only loader refuses its pickled weights",
        "the pickle's code never runs; nothing written",
        _nothing_at("o", "o.work"),
    ),
    Case(
        "output-read-only",
        "`-o` inside a read-only directory",
        _read_only_parent,
        2,
        "permission denied",
        "refused before any work; nothing written",
    ),
    Case(
        "output-dot",
        "`-o .` (the current directory)",
        lambda ctx: _quantize(ctx, "-o", "."),
        2,
        "is the current directory",
        "refused before any work; the directory is untouched",
    ),
    Case(
        "output-is-model",
        "`-o` naming the model being quantized",
        lambda ctx: _quantize(ctx, "-o", str(ctx.env.model), "--force"),
        2,
        "being read",
        "refused even with `--force`; the model is untouched",
        lambda ctx: (ctx.env.model / "config.json").is_file() or pytest.fail("model lost"),
    ),
    Case(
        "output-under-file",
        "`-o afile/o` where `afile` is a file",
        _file_parent,
        2,
        "is a file, not a directory",
        "refused before any work",
        _user_files_kept("afile"),
    ),
    Case(
        "output-not-checkpoint",
        "`-o` naming a directory of other files",
        _not_a_checkpoint,
        2,
        "is not a requant checkpoint",
        "refused before any work unless `--force`; the files are kept",
        lambda ctx: (ctx.dir / "o" / "notes.txt").is_file() or pytest.fail("user file lost"),
    ),
    Case(
        "work-is-file",
        "`OUTPUT.work` exists and is a file",
        _work_file,
        2,
        "is not a directory",
        "refused before any work; the file is kept",
        _user_files_kept("o.work"),
    ),
    Case(
        "work-user-files",
        "`OUTPUT.work` is a directory of the user's files",
        _work_user_files,
        2,
        "did not create",
        "refused; requant only ever deletes work directories it made (they hold a `.requant-work` marker)",
        _user_files_kept("o.work/notes.txt"),
    ),
    Case(
        "offload-user-files",
        "`--offload DIR` naming a directory of the user's files",
        _offload_user_files,
        2,
        "did not create",
        "refused; requant only replaces or deletes offload folders it made (they hold a `.requant-offload` marker)",
        _user_files_kept("mine/notes.txt"),
    ),
    Case(
        "disk-full-stage",
        "the disk fills while a stage is stored in `OUTPUT.work`",
        _full_disk("stage"),
        2,
        "no space left on DEVICE while writing",
        "the finished stages are kept; `--resume` continues from them",
        _stages_kept_and_resumable("fisher"),
    ),
    Case(
        "disk-full-checkpoint",
        "the disk fills while the checkpoint is written",
        _full_disk("checkpoint"),
        2,
        "no space left on DEVICE while writing",
        "no partial checkpoint, no temporary; every stage is kept; `--resume` writes the checkpoint",
        _stages_kept_and_resumable("fisher", "dense"),
    ),
    Case(
        "requantize-checkpoint",
        "`quantize CHECKPOINT` (a requant checkpoint as the model)",
        lambda ctx: _quantize(ctx, "-o", "o", model=str(ctx.env.checkpoint)),
        2,
        "is a requant checkpoint (already quantized)",
        "refused: its quantized layers would load as random weights",
        _nothing_at("o", "o.work"),
    ),
    Case(
        "output-locked",
        "a second run writing the same `-o` while the first runs",
        _hold_lock,
        2,
        "another requant run (pid N) is writing",
        "refused before any work; the first run is not disturbed",
        _nothing_at("o", "o.work"),
    ),
    Case(
        "stale-temporaries",
        "`.OUTPUT.tmp-*` / `.OUTPUT.old-*` left by a killed run",
        _stale_temporaries,
        0,
        "",
        "the next run writing OUTPUT removes those of dead processes",
        _stale_removed,
    ),
    Case(
        "seqlen-quantize",
        "`quantize --seqlen` longer than the model's context",
        lambda ctx: [*_quantize(ctx, "-o", "o"), "--seqlen", "100000"],
        2,
        "longer than the model's context of 256 tokens",
        "refused before loading the model",
        _nothing_at("o", "o.work"),
    ),
    Case(
        "seqlen-eval",
        "`eval --seqlen` longer than the model's context",
        lambda ctx: ["eval", str(ctx.env.checkpoint), "--data", str(ctx.env.text), "--seqlen", "4096"],
        2,
        "longer than the model's context of 256 tokens",
        "refused before loading the model",
    ),
    Case(
        "seqlen-sensitivity",
        "`sensitivity --seqlen` longer than the model's context",
        lambda ctx: ["sensitivity", str(ctx.env.model), "--report", "blocks", "--seqlen", "4096"],
        2,
        "longer than the model's context of 256 tokens",
        "refused before loading the model",
    ),
    Case(
        "temperature-nan",
        "`generate --temperature nan`",
        _generate("--temperature", "nan"),
        2,
        "--temperature nan is not allowed",
        "refused (it used to decode greedily)",
    ),
    Case(
        "temperature-inf",
        "`generate --temperature inf`",
        _generate("--temperature", "inf"),
        2,
        "--temperature inf is not allowed",
        "refused",
    ),
    Case(
        "temperature-negative",
        "`generate --temperature -1`",
        _generate("--temperature", "-1"),
        2,
        "--temperature -1.0 is not allowed",
        "refused",
    ),
    Case(
        "top-p-outside",
        "`generate --top-p 1.5` (or 0, nan)",
        _generate("--temperature", "0.7", "--top-p", "1.5"),
        2,
        "--top-p 1.5 is not allowed",
        "refused",
    ),
    Case(
        "tampered-codes",
        "one flipped byte in a checkpoint's packed codes",
        _tampered(_flip_code_byte),
        2,
        "does not match its recorded sha256",
        "refused (`--no-verify` loads it anyway)",
    ),
    Case(
        "tampered-bits",
        "`config.json` edited from 3 to 2 bits",
        _tampered(_edit_config(lambda qc: qc.update(bits=2))),
        2,
        "quantization_config.bits = 2, but layer",
        "refused",
    ),
    Case(
        "tampered-table",
        "a layer's entry in `config.json` edited (a setting no tensor shape shows)",
        _tampered(_edit_config(lambda qc: qc["layers"][next(iter(qc["layers"]))].update(kind_in_block="x"))),
        2,
        "written with another layer table than config.json",
        "refused",
    ),
    Case(
        "missing-model",
        "a model path that does not exist",
        lambda ctx: ["eval", "missing/x.gguf"],
        2,
        "does not exist",
        "nothing written",
    ),
]


# Promises about the disk that are no command-line case: the tests that keep them.
LIBRARY_PROMISES: list[tuple[str, str, str]] = [
    (
        "checkpoint and work-directory files",
        "written with the modes of a plain `open` under the process umask (0644 under 022, 0600 under 077)",
        "tests/test_io.py::test_atomic_dir_files_follow_the_umask",
    ),
    (
        "kernel cache (`$REQUANT_CACHE/kernels`) not owned by you or writable by others",
        "not used: C kernels are built in a private directory of the process, with a warning",
        "tests/test_native.py::test_unsafe_cache_is_not_used",
    ),
    (
        "a library at the kernel cache's predictable name that is not yours or others can write",
        "never loaded: replaced by a fresh build",
        "tests/test_native.py::test_planted_library_is_replaced_not_loaded",
    ),
    (
        "two writers of one output in one process tree under torchrun",
        "only rank 0 takes the output's lock; every rank fails when rank 0 cannot",
        "tests/test_io.py::test_claim_output_under_a_fake_group",
    ),
]


def render(rows: list[tuple[Case, int, str]]) -> str:
    """docs/faults.md from each case and its observed exit code and message."""
    out = [
        "# Faults: what requant promises",
        "",
        "<!-- Generated by `python benchmarks/faults_table.py` from tests/faults_cases.py; tests/test_faults.py fails",
        "     when this file and the code disagree. Do not edit by hand. -->",
        "",
        "Every fault a user can cause ends in **one line** `requant: error: ...` on stderr that names the bad value",
        "and what is allowed, exit code **2**, and no half-written output; a real bug still shows its traceback.",
        "Paths below are relative to the run's directory (`…` is the test's model folder); DEVICE is the device",
        "and mount point of the full filesystem, N a process id.",
        "",
        "| case | exit | message | promise |",
        "|---|---|---|---|",
    ]
    for case, code, msg in rows:
        shown = ("`" + msg.replace("|", "\\|") + "`") if msg else "(none)"
        out.append(f"| {case.case} | {code} | {shown} | {case.promise} |")
    out += [
        "",
        "Promises about written files and loaded code (no command-line case; the named test keeps each):",
        "",
        "| what | promise | test |",
        "|---|---|---|",
    ]
    out += [f"| {what} | {promise} | `{test}` |" for what, promise, test in LIBRARY_PROMISES]
    return "\n".join(out) + "\n"


def doc_rows(text: str) -> dict[str, tuple[int, str]]:
    """The case column → (exit code, message) of a rendered docs/faults.md."""
    rows = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| (.+?) \| (\d+) \| (`(.*)`|\(none\)) \| .* \|", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), (m.group(4) or "").replace("\\|", "|"))
    return rows
