"""The architecture matrix as a table: each tested family × base method → ok, refused (why) or failed (why).

Usage: python benchmarks/arch_matrix.py [--only ARCH ...] [--bases BASE ...]
Runs the cases of tests/arch_cases.py (the same tiny configs, settings and checks as tests/test_architectures.py)
offline in a temporary directory, and writes benchmarks/results/arch_matrix.{md,json}; about a minute on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from arch_cases import (  # noqa: E402
    ARCHS,
    BASE_NOTES,
    BASES,
    CHECKS,
    NSAMPLES,
    SEQLEN,
    run_case,
    write_texts,
)

RESULTS = ROOT / "benchmarks" / "results"


def one(arch: str, base: str, tmp: Path, calib: Path, evaluation: Path) -> dict[str, object]:
    """Run one case and its checks: {"status": ok | refused | failed, "reason", "check", "seconds"}."""
    from requant.errors import RequantError
    from requant.progress import quiet_transformers

    t = time.perf_counter()
    try:
        with quiet_transformers():
            case = run_case(arch, base, tmp, calib=calib, evaluation=evaluation)
    except RequantError as e:  # requant said no, in one line: a refusal, not a failure
        return {"status": "refused", "reason": str(e), "seconds": time.perf_counter() - t}
    except Exception as e:  # any crash is a row of the table
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        return {"status": "failed", "check": "quantize", "reason": reason, "seconds": time.perf_counter() - t}
    try:
        for name, check in CHECKS.items():
            try:
                check(case)
            except Exception as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                return {"status": "failed", "check": name, "reason": reason, "seconds": time.perf_counter() - t}
        return {"status": "ok", "seconds": time.perf_counter() - t}
    finally:
        del case


def render(rows: dict[str, dict[str, dict[str, object]]], bases: list[str]) -> str:
    notes: list[str] = []  # one per distinct reason, numbered in the table
    lines = [
        "# Architecture matrix",
        "",
        "Written by `python benchmarks/arch_matrix.py`; the same cases and checks run in "
        "`tests/test_architectures.py`.",
        "",
        f"Tiny random models built offline with `AutoConfig.for_model` (2 blocks, width 64, 4 heads; config dicts in "
        f"`tests/arch_cases.py`) and the embedded SmolLM2 tokenizer; 3 bits, {NSAMPLES} calibration windows of "
        f"{SEQLEN} tokens from the embedded wiki text. A case is **ok** when quantize → save (format v2) → reload "
        "(`requant.load` and `AutoModelForCausalLM.from_pretrained`) passes every check: "
        + ", ".join(f"`{c}`" for c in CHECKS)
        + " (see `tests/arch_cases.py`). **refused**: requant stopped with one error line; **failed**: the named "
        "check broke.",
        "",
        "| family | " + " | ".join(BASE_NOTES[b] for b in bases) + " | what it exercises |",
        "|---|" + "---|" * (len(bases) + 1),
    ]
    for arch, per_base in rows.items():
        cells = []
        for b in bases:
            r = per_base[b]
            if r["status"] == "ok":
                cells.append(f"ok ({r['seconds']:.1f} s)")
            else:
                why = f"{r['status']} (`{r.get('check', 'quantize')}`): {r['reason']}"
                if why not in notes:
                    notes.append(why)
                cells.append(f"{r['status']}: `{r.get('check', 'quantize')}` [{notes.index(why) + 1}]")
        lines.append(f"| {arch} | " + " | ".join(cells) + f" | {ARCHS[arch].note} |")
    if notes:
        lines += ["", "Reasons:", ""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(ARCHS), choices=list(ARCHS), help="families to run")
    ap.add_argument("--bases", nargs="*", default=list(BASES), choices=list(BASES), help="base methods to run")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rows: dict[str, dict[str, dict[str, object]]] = {}
    with tempfile.TemporaryDirectory(prefix="requant-archs-") as tmp:
        calib, evaluation = write_texts(Path(tmp) / "texts")
        for arch in args.only:
            rows[arch] = {}
            for base in args.bases:
                d = Path(tmp) / f"{arch}-{base}"
                d.mkdir()
                rows[arch][base] = r = one(arch, base, d, calib, evaluation)
                shutil.rmtree(d)  # each checkpoint holds the 49k-token embeddings
                print(f"{arch:10s} {base:15s} {r['status']:8s} {r.get('reason', '')}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "arch_matrix.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (RESULTS / "arch_matrix.md").write_text(render(rows, args.bases), encoding="utf-8")
    return 0 if all(r["status"] != "failed" or ARCHS[a].xfail for a, rs in rows.items() for r in rs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
