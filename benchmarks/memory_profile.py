"""Where a quantization run's memory goes: `requant quantize` in this process, with the anonymous and resident
memory sampled every 20 ms and attributed to the pipeline stage running at that moment.

    python benchmarks/memory_profile.py --json-out benchmarks/results/memory-profile.json -- \
        -o /tmp/rq --base squeezellm --bits 3 --recipe requant --nsamples 16 --pqi-nsamples 8

Every argument after `--` goes to `requant quantize`. The stages are the pipeline's functions (a PQI pass inside
Algorithm 2 counts as `pqi_pass`); at the first forward of the lm_head in each stage the Python-visible tensors
are counted (bytes of distinct storages: the model's parameters, the fp32 masters, everything else by shape),
which shows what the stage holds besides the autograd activations. Run with OMP_NUM_THREADS=1 for timings that
compare.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import threading
import time
from pathlib import Path

import torch

from requant import pipeline
from requant.memory import anon_rss, peak_rss

STAGES = (
    "start_run",
    "base_sensitivity",
    "select_outliers",
    "dense_fit",
    "detach_significant",
    "pqi_pass",
    "assemble",
)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Profile:
    """Samples (seconds, stage, anonymous bytes, resident bytes) while running."""

    def __init__(self) -> None:
        self.stack: list[str] = ["load"]
        self.samples: list[tuple[float, str, int, int]] = []
        self.census: dict[str, dict] = {}
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self.masters: set[int] = set()
        self.params: set[int] = set()

    def run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((time.perf_counter() - self.t0, self.stack[-1], anon_rss(), _rss()))

    def wrap(self, name: str) -> None:
        fn = getattr(pipeline, name)

        @functools.wraps(fn)
        def inner(*a, **k):
            self.stack.append(name)
            try:
                out = fn(*a, **k)
            finally:
                self.stack.pop()
            if name == "start_run":
                self.attach(out)
            return out

        setattr(pipeline, name, inner)

    def attach(self, run) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
        self.masters = {w.untyped_storage().data_ptr() for w in run.weights.values()}
        head = run.model.get_output_embeddings()
        head.register_forward_hook(lambda *_: self.take_census())

    def take_census(self) -> None:
        stage = self.stack[-1]
        if stage in self.census:
            return
        seen: dict[int, tuple[int, tuple]] = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                s = obj.untyped_storage()
                seen.setdefault(s.data_ptr(), (s.nbytes(), tuple(obj.shape)))
        groups: dict[str, int] = {"model parameters": 0, "fp32 masters": 0, "other": 0}
        for ptr, (nbytes, _) in seen.items():
            key = "model parameters" if ptr in self.params else "fp32 masters" if ptr in self.masters else "other"
            groups[key] += nbytes
        self.census[stage] = {k: round(v / 1e9, 3) for k, v in groups.items()} | {"anon_gb": anon_rss() / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json-out", type=Path, required=True)
    ap.add_argument("quantize_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    qargs = [a for a in args.quantize_args if a != "--"]
    prof = Profile()
    for s in STAGES:
        prof.wrap(s)
    th = threading.Thread(target=prof.run, daemon=True)
    th.start()
    from requant.cli import main as cli_main

    t = time.perf_counter()
    rc = cli_main(["quantize", *qargs])
    wall = time.perf_counter() - t
    prof._stop.set()
    th.join()
    stages: dict[str, dict] = {}
    for ts, st, anon, rss in prof.samples:
        d = stages.setdefault(st, {"first_s": ts, "peak_anon_gb": 0.0, "peak_rss_gb": 0.0, "samples": 0})
        d["peak_anon_gb"] = max(d["peak_anon_gb"], anon / 1e9)
        d["peak_rss_gb"] = max(d["peak_rss_gb"], rss / 1e9)
        d["samples"] += 1
    out = {
        "argv": qargs,
        "rc": rc,
        "wall_s": wall,
        "peak_rss_gb": peak_rss() / 1e9,
        "peak_anon_gb": max((a for _, _, a, _ in prof.samples), default=0) / 1e9,
        "stages": stages,
        "census_at_lm_head": prof.census,
        "timeline": [(round(ts, 2), st, round(a / 1e9, 3), round(r / 1e9, 3)) for ts, st, a, r in prof.samples[::25]],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("wall_s", "peak_rss_gb", "peak_anon_gb", "stages", "census_at_lm_head")}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
