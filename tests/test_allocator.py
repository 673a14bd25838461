"""requant.memory.tune_allocator: freed large tensors go back to the system (glibc only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from requant import memory

# A fresh process per case: the mmap threshold is process-wide state that other tests would disturb.
PROBE = """
import json, sys, torch
from requant import memory
if sys.argv[1] == "tuned":
    assert memory.tune_allocator()
big = torch.ones(6 << 20)  # 24 MiB: mapped under glibc's defaults; freeing it raises the dynamic threshold
del big
x = torch.ones(4 << 20)  # 16 MiB: from the heap unless the threshold is pinned
before = memory.anon_rss()
del x
print(json.dumps({"returned": before - memory.anon_rss(), "tuned_again": memory.tune_allocator()}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


glibc = pytest.mark.skipif(memory._libc() is None or memory.anon_rss() == 0, reason="glibc on Linux only")


@glibc
def test_tuned_allocator_returns_freed_tensors():
    tuned, default = _probe("tuned"), _probe("default")
    assert tuned["returned"] >= 15 << 20  # the 16 MiB block was unmapped at once
    assert default["returned"] < 4 << 20  # the defaults keep it in the heap (the reason for the setting)
    assert tuned["tuned_again"] is True  # idempotent


def test_tune_allocator_reports_where_applied(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.tune_allocator() is (memory._libc() is not None)
    memory.release_free_memory()  # never fails, also where it is a no-op


def test_quantize_and_sensitivity_tune_the_allocator(monkeypatch, tmp_path):
    from requant import cli, pipeline

    calls = []
    monkeypatch.setattr(memory, "tune_allocator", lambda: calls.append("cli"))  # the commands import it late
    monkeypatch.setattr(pipeline, "tune_allocator", lambda: calls.append("pipeline"))
    assert cli.main(["quantize", "-o", str(tmp_path / "q"), "--nsamples", "0"]) == 2  # fails after tuning
    assert cli.main(["sensitivity", "--report", "layers", "--batch-size", "0"]) == 2
    assert calls == ["cli", "cli"]
    monkeypatch.setattr(pipeline, "start_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        pipeline.quantize(None, None, None)  # type: ignore[arg-type]
    assert calls == ["cli", "cli", "pipeline"]


FAULTS = """
import json, resource, torch
from requant import memory
assert memory.tune_allocator()

def faults(n=40):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(1 << 20).fill_(1.0)  # a 4 MiB temporary, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

pinned = faults()
with memory.transient_allocations():
    faults(1)  # the first one grows the heap
    transient = faults()
x = torch.ones(4 << 20)  # 16 MiB after the block: a mapping of its own again, returned when freed
before = memory.anon_rss()
del x
print(json.dumps({"pinned": pinned, "transient": transient, "returned": before - memory.anon_rss()}))
"""


@glibc
def test_transient_allocations_reuse_the_heap_and_restore_the_pinned_threshold():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = json.loads(
        subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, env=env).stdout
    )
    assert r["pinned"] >= 40 * 1000  # every 4 MiB temporary is a fresh mapping: ~1024 page faults each
    assert r["transient"] < r["pinned"] / 10  # inside: the same heap pages, reused
    assert r["returned"] >= 15 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise")
def test_release_file_pages_drops_a_file_mappings_pages_and_never_anonymous_memory(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    def rss_file() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
        return 0

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(8 << 20, dtype=torch.int32)}, str(path))  # 32 MiB
    w = load_file(str(path))["w"]  # zero-copy: a view of the file mapping
    if memory._file_mapping(w.data_ptr()) is None:
        pytest.skip("safetensors copied the tensor instead of mapping the file")
    assert int(w.sum()) == (8 << 20) * ((8 << 20) - 1) // 2  # every page touched
    before = rss_file()
    if not memory.release_file_pages(w.data_ptr(), w.numel() * 4):
        pytest.skip("the kernel has no MADV_PAGEOUT")
    assert rss_file() < before - (24 << 20)  # most of the 32 MiB left the resident set
    assert int(w.sum()) == (8 << 20) * ((8 << 20) - 1) // 2  # and read back from the file, unchanged
    anon = torch.arange(1 << 20, dtype=torch.int32)
    assert not memory.release_file_pages(anon.data_ptr(), anon.numel() * 4)  # anonymous: untouched
    assert int(anon[-1]) == (1 << 20) - 1
