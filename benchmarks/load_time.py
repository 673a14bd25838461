"""Checkpoint load time and peak memory: transformers' from_pretrained vs requant.load, with and without the
sha256 verification. Each load runs in a fresh process (so the peak RSS is the load's own); methods alternate,
repeats give medians. Writes benchmarks/results/load_time.{json,md}.

    python benchmarks/load_time.py "v2 from_pretrained=from_pretrained:out/rq3" "v2 no verify=no-verify:out/rq3" \\
        "v1 requant.load (0.1)=requant.load:out/rq3-v1:/path/to/requant-0.1/src" [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CODE = """
import json, resource, sys, time
t0 = time.perf_counter()
method, path = sys.argv[1], sys.argv[2]
import torch
import requant
t1 = time.perf_counter()
if method == "from_pretrained":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
elif method == "requant.load":
    model, _ = requant.load(path)
elif method == "no-verify":
    model, _ = requant.load(path, verify=False)
else:
    raise SystemExit(f"unknown method {method}")
t2 = time.perf_counter()
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "peak_rss_gb": rss}))
"""


def run_once(method: str, path: str, src: str | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if src:
        env["PYTHONPATH"] = src
    out = subprocess.run(
        [sys.executable, "-c", CODE, method, path], capture_output=True, text=True, env=env, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "case",
        nargs="+",
        help="LABEL=METHOD:CHECKPOINT[:SRC]; METHOD from_pretrained | requant.load | no-verify; SRC: PYTHONPATH of "
        "another requant source tree (e.g. an older commit)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "load_time.json"))
    args = p.parse_args()
    cases = {}
    for c in args.case:
        label, _, rest = c.partition("=")
        method, path, *src = rest.split(":")
        cases[label] = (method, path, src[0] if src else None)
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for label, (method, path, src) in cases.items():  # interleaved: drift in machine load hits all alike
            runs[label].append(run_once(method, path, src))
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.is_file() else {}
    for label, rs in runs.items():
        method, path, src = cases[label]
        table[label] = {
            "method": method,
            "checkpoint": path,
            "src": src,
            "repeats": args.repeats,
            "load_s": statistics.median(r["load_s"] for r in rs),
            "load_s_runs": [round(r["load_s"], 3) for r in rs],
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in rs),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    lines = ["| case | load s (median) | peak RSS GB (median) |", "|---|---|---|"]
    lines += [f"| {k} | {v['load_s']:.2f} | {v['peak_rss_gb']:.2f} |" for k, v in table.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
