"""Run every fault case of tests/faults_cases.py and write docs/faults.md (case → exit code → message → promise).

Usage: python benchmarks/faults_table.py [--check]   (--check: only say whether docs/faults.md is current)
Runs on the tiny test model in a temporary directory, offline, in about a minute on one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from faults_cases import CASES, make_env, message, render, run_case  # noqa: E402

DOC = ROOT / "docs" / "faults.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/faults.md differs, write nothing")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="requant-faults-") as tmp:
        env = make_env(Path(tmp) / "env")
        rows = []
        for case in CASES:
            code, stderr = run_case(case, env, Path(tmp) / case.id)
            line = message(stderr)
            if code != case.code or (case.code and case.must not in line):
                print(f"{case.id}: promise broken: exit {code}, {stderr.strip()!r}", file=sys.stderr)
                return 1
            rows.append((case, code, line))
            print(f"{case.id:24s} {code}  {line}")
    text = render(rows)
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
        print("docs/faults.md is current" if current == text else "docs/faults.md is stale")
        return 0 if current == text else 1
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
