"""requant.native: building, caching and loading optional C sources, and every way it declines."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from requant import native

CC = native.compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")

SOURCE = """
int rq_abi_version(void) { return %d; }
const char *rq_isa(void) { return "test-isa"; }
int add3(int a) { return a + 3; }
"""


@pytest.fixture
def src(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("REQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    p = tmp_path / "tiny.c"
    p.write_text(SOURCE % 7)
    return p


def _declare(lib: ctypes.CDLL) -> None:
    lib.add3.argtypes = [ctypes.c_int]
    lib.add3.restype = ctypes.c_int


@needs_cc
def test_builds_loads_and_caches(src: Path, monkeypatch):
    lib_dir = Path(os.environ["REQUANT_CACHE"]) / "kernels"
    nl = native.NativeLibrary(src, 7, _declare)
    lib = nl.get()
    assert lib is not None and lib.add3(4) == 7 and nl.reason == "loaded (test-isa)"
    assert nl.get() is lib  # loaded once per process
    built = sorted(p.name for p in lib_dir.iterdir())
    assert len(built) == 1 and built[0].startswith("tiny-") and built[0].endswith(".so")  # no temp files left

    # A second build of the same source, compiler, flags, CPU and ABI is the cached file: no compiler run.
    def no_compiler(*a, **k):
        raise AssertionError("compiler ran for a cached build")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.build(src, CC, abi_version=7) == lib_dir / built[0]


@needs_cc
def test_cache_key_covers_source_flags_and_abi(src: Path):
    base = native.build(src, CC, abi_version=7)
    assert native.build(src, CC, abi_version=8) != base
    assert native.build(src, CC, abi_version=7, flag_sets=[["-O1", "-pthread"]]) != base
    src.write_text(SOURCE % 7 + "\nint unused(void) { return 0; }\n")
    assert native.build(src, CC, abi_version=7) != base


@needs_cc
def test_falls_back_to_the_next_flag_set(src: Path):
    path = native.build(src, CC, abi_version=7, flag_sets=[["-fno-such-flag-at-all"], ["-O2"]])
    assert ctypes.CDLL(str(path)).add3(1) == 4


@needs_cc
def test_failed_build_says_why(src: Path):
    src.write_text("this is not C")
    with pytest.raises(RuntimeError, match="-O3"):
        native.build(src, CC, abi_version=7)
    nl = native.NativeLibrary(src, 7)
    assert nl.get() is None and nl.reason.startswith("build or load of tiny.c failed")
    assert not any(p.name.startswith(".") for p in (Path(os.environ["REQUANT_CACHE"]) / "kernels").iterdir())


@needs_cc
def test_abi_mismatch_is_refused(src: Path):
    nl = native.NativeLibrary(src, 6)
    assert nl.get() is None and "ABI version 7 != 6" in nl.reason


def test_missing_compiler_and_switch(src: Path, monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    nl = native.NativeLibrary(src, 7)
    assert nl.get() is None and nl.reason == "no C compiler found (set CC)"
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.enabled()
    assert nl.get() is None and nl.reason == f"disabled by {native.ENV_SWITCH}=0"
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    assert native.enabled()


def test_unrunnable_compiler(src: Path, monkeypatch):
    monkeypatch.setenv("CC", str(src.parent / "no-such-cc"))
    nl = native.NativeLibrary(src, 7)
    assert nl.get() is None and "failed" in nl.reason


def test_requant_works_without_a_compiler(tmp_path: Path):
    """Importing requant never compiles; k-means falls back to the PyTorch reference with a reason."""
    code = textwrap.dedent(
        """
        import torch, requant
        from requant.quantizers.kmeans import backend, weighted_kmeans_1d
        res = weighted_kmeans_1d(torch.randn(3, 20), None, 4)
        print(backend(), float(res.objective.sum()) >= 0)
        """
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "REQUANT_CACHE": str(tmp_path / "cache")}
    env.pop(native.ENV_SWITCH, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch (build or load of kmeans1d.c failed") and out.stdout.strip().endswith("True")
    assert not (tmp_path / "cache" / "kernels").exists() or not any((tmp_path / "cache" / "kernels").iterdir())


@needs_cc
def test_unsafe_cache_is_not_used(src: Path):
    cache = Path(os.environ["REQUANT_CACHE"])
    (cache / "kernels").mkdir(parents=True)
    (cache / "kernels").chmod(0o777)  # a shared, world-writable cache
    native._PRIVATE.clear()
    with pytest.warns(RuntimeWarning, match="not using the kernel cache .* writable by group or others"):
        built = native.build(src, CC, abi_version=7)
    assert cache not in built.parents and native.unsafe_reason(built.parent) is None
    assert list((cache / "kernels").iterdir()) == []
    assert native.load(built, 7).rq_abi_version() == 7
    native._PRIVATE.clear()


@needs_cc
def test_planted_library_is_replaced_not_loaded(src: Path):
    honest = native.build(src, CC, abi_version=7)
    evil_src = src.with_name("evil.c")
    evil_src.write_text(SOURCE % 99)
    evil = native.build(evil_src, CC, abi_version=99, out_dir=src.parent / "evil")
    for make_unsafe in ("others-writable", "foreign-owner"):
        honest.unlink()
        honest.write_bytes(evil.read_bytes())  # a library at the predictable name
        if make_unsafe == "others-writable":
            honest.chmod(0o777)
        elif os.geteuid() == 0:
            os.chown(honest, 12345, -1)
        else:
            continue  # only root can give a file away
        assert native.unsafe_reason(honest, directory=False) is not None
        again = native.build(src, CC, abi_version=7)
        assert again == honest and native.unsafe_reason(again, directory=False) is None
        assert native.load(again, 7).rq_abi_version() == 7  # the rebuilt one, not the planted one
