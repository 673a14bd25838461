"""Does a ReQuant run fit a hard memory limit? `requant quantize` on R inside a memory cgroup (Linux, root).

The kernel enforces the limit on everything the process holds, page cache of its memory-mapped files included,
reclaiming clean pages before it kills; so a run that completes inside the limit needed no more, whatever its
resident set would have grown to without one. Runs with --offload and without, each in a fresh cgroup:

    sudo python benchmarks/memory_limit.py                 # limit 1.6e9 bytes (3x the fp32 model's 0.54 GB)
    sudo python benchmarks/memory_limit.py --limit 2e9 --nsamples 16 --pqi-nsamples 8

Writes benchmarks/results/memory-limit.json and .md (rc, peak usage the cgroup saw, OOM kills, wall, and
whether the checkpoint equals the one of the same command without a limit, tensor by tensor).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compare_checkpoints import compare

RESULTS = Path(__file__).resolve().parent / "results"
V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


class Cgroup:
    """A memory cgroup with a hard limit (v2 `memory.max` or v1 `memory.limit_in_bytes`)."""

    def __init__(self, name: str, limit: int) -> None:
        self.v2 = (V2 / "cgroup.controllers").is_file()
        self.path = (V2 if self.v2 else V1) / name
        self.path.mkdir(exist_ok=True)
        (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))

    def stats(self) -> dict[str, int]:
        if self.v2:
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            peak = self.path / "memory.peak"
            return {"max_usage": int(peak.read_text()) if peak.exists() else -1, "oom_kill": int(events["oom_kill"])}
        ctl = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {
            "max_usage": int((self.path / "memory.max_usage_in_bytes").read_text()),
            "oom_kill": int(ctl.get("oom_kill", 0)),
            "limit_hits": int((self.path / "memory.failcnt").read_text()),
        }

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def run(cmd: list[str], cgroup: Cgroup | None) -> tuple[int, float, str]:
    """(exit code, wall seconds, stderr tail) of `cmd`, started inside `cgroup`."""
    procs = None if cgroup is None else str(cgroup.path / "cgroup.procs")

    def enter() -> None:  # in the child, before exec: the whole run is charged to the cgroup
        if procs is not None:
            Path(procs).write_text(str(os.getpid()))

    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, preexec_fn=enter, capture_output=True, text=True)
    return p.returncode, time.perf_counter() - t, p.stderr[-500:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=float, default=1.6e9, help="bytes (default 1.6e9)")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--pqi-nsamples", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/requant-memory-limit"))
    ap.add_argument("--reference", action="store_true", help="also run without a limit and compare checkpoints")
    ap.add_argument("--compare", type=Path, default=None, help="instead: an unlimited --offload run's checkpoint")
    args = ap.parse_args()
    if os.geteuid() != 0 or not (V1.is_dir() or (V2 / "cgroup.controllers").is_file()):
        raise SystemExit("needs root and a memory cgroup hierarchy (/sys/fs/cgroup)")
    args.work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "requant", "quantize", "--base", "squeezellm", "--bits", "3", "--recipe", "requant"]
    base += ["--nsamples", str(args.nsamples), "--pqi-nsamples", str(args.pqi_nsamples), "--json", "--force"]
    rows = []
    for mode in ("offload", "resident"):
        out = args.work / f"ck-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*base, "-o", str(out)] + (["--offload", str(args.work / "offload")] if mode == "offload" else [])
        cg = Cgroup(f"requant-{mode}", int(args.limit))
        try:
            rc, wall, err = run(cmd, cg)
            row = {"mode": mode, "rc": rc, "wall_s": wall, **cg.stats()}
        finally:
            cg.remove()
        if rc == 0 and args.reference:
            ref = args.work / f"ref-{mode}"
            shutil.rmtree(ref, ignore_errors=True)
            ref_cmd = [*base, "-o", str(ref)]
            ref_cmd += ["--offload", str(args.work / "offload-ref")] if mode == "offload" else []
            rrc, _, _ = run(ref_cmd, None)
            row["equals_unlimited_run"] = rrc == 0 and compare(out, ref)
        elif rc == 0 and args.compare is not None and mode == "offload":
            row["equals_unlimited_run"] = compare(out, args.compare)
        elif rc != 0:
            row["stderr_tail"] = err
        rows.append(row)
        print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    doc = {"limit_bytes": int(args.limit), "command": "requant " + " ".join(base[3:]), "rows": rows}
    (RESULTS / "memory-limit.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        f"# `requant quantize` on R inside a {args.limit / 1e9:.2f} GB memory cgroup",
        "",
        f"`{doc['command']}` (+ `--offload DIR` or not), OMP_NUM_THREADS=1.",
        "",
        "| mode | exit code | peak usage seen by the cgroup | OOM kills | wall | checkpoint = unlimited run's |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = {True: "yes", False: "no"}.get(r.get("equals_unlimited_run"), "")
        lines.append(
            f"| {r['mode']} | {r['rc']} | {r['max_usage'] / 1e9:.2f} GB | {r['oom_kill']} | {r['wall_s']:.0f} s | "
            f"{same} |"
        )
    (RESULTS / "memory-limit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
