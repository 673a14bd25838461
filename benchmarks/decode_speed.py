"""Batch-1 decode speed on R: the fp32 model vs 3-bit checkpoints, 1 and 2 threads, side by side, in one run.

One process loads every model once; for each thread count, every variant runs in rotating order within each
repeat (prefill of a random prompt, then greedy decode), figures are medians. Variants:
- fp32 model through transformers' forward + DynamicCache (what `generate` runs; the baseline of the ratios) and
  through requant's static decoder (requant.decode; the same lean loop the checkpoints get);
- each checkpoint (3-bit SqueezeLLM D&S, 3-bit ReQuant) served as loaded by default (16-bit embeddings / lm_head)
  through the fused decoder (requant.fused: one C call per token; what `generate`/`bench` run by default), the
  static decoder, and transformers' loop; the D&S one also with the opt-in int8 lm_head and with its static
  decoder step compiled by torch.compile (compiled once, in the warm-up; `--no-compile` skips it); the fp32 model
  through the fused decoder too (what the fused step alone buys without quantization).
Then: greedy text of the fused and static decoders vs transformers' `generate` on the same loaded checkpoint (64
tokens of a fixed prompt), and the peak RSS of `requant generate` (a fresh process per model; its VmHWM, and the
same after `import requant` alone, so the model's own share is visible).

Usage (one command, prints the table):  python benchmarks/decode_speed.py
    [--dns DIR] [--requant DIR] [--threads 1,2] [--repeats 5] [--prompt-tokens 128] [--new-tokens 32] [--no-compile]
Missing checkpoints are made with `requant quantize` at demo settings (16 calibration windows).
Writes benchmarks/results/decode_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "requant" / "bench"
RECIPES = {
    "dns": ["--base", "squeezellm", "--bits", "3", "--recipe", "dns", "--nsamples", "16"],
    "requant": [
        "--base",
        "squeezellm",
        "--bits",
        "3",
        "--recipe",
        "requant",
        "--nsamples",
        "16",
        "--pqi-nsamples",
        "8",
    ],
}
PROMPT = "The history of the city begins"

RSS_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from requant.memory import anon_rss, peak_rss
import requant
base, base_anon = peak_rss(), anon_rss()
if sys.argv[1] == "-":
    print(json.dumps({"import_mib": base / 2**20, "anon_mib": base_anon / 2**20})); sys.exit()
from requant.cli import main
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    main(["generate", sys.argv[1], sys.argv[2], "--max-new-tokens", "32", *sys.argv[3:]])
print(json.dumps({"import_mib": base / 2**20, "peak_mib": peak_rss() / 2**20, "anon_mib": anon_rss() / 2**20}))
"""


def ensure(path: Path | None, recipe: str) -> Path:
    path = path or CACHE / f"sq3-{recipe}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "requant", "quantize", "-o", str(path), *RECIPES[recipe], "--json"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return path


def peak_rss(spec: str, *flags: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, spec, PROMPT, *flags], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_rss(ckpts: dict[str, Path], source: str, runs: int = 3) -> dict:
    """Peak RSS per model: the run with the median peak of `runs` fresh processes (a single run now and then peaks
    40-160 MiB higher, in its anonymous part, for reasons outside requant's allocations)."""

    def median_run(*spec: str) -> dict:
        res = sorted((peak_rss(*spec) for _ in range(runs)), key=lambda r: r.get("peak_mib", r["import_mib"]))
        return {**res[len(res) // 2], "runs": runs}

    return {
        "interpreter + import requant": median_run("-"),
        "fp32 model (generate --decoder transformers)": median_run(source, "--decoder", "transformers"),
        "3-bit D&S (generate, defaults)": median_run(str(ckpts["3-bit D&S"])),
        "3-bit ReQuant (generate, defaults)": median_run(str(ckpts["3-bit ReQuant"])),
        "3-bit D&S (generate --decoder static)": median_run(str(ckpts["3-bit D&S"]), "--decoder", "static"),
    }


def same_greedy(model, tok, decoder: str, new_tokens: int = 64) -> dict:
    from requant.decode import make_decoder

    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    eos = model.generation_config.eos_token_id
    dec = make_decoder(model, ids.shape[1] + new_tokens, decoder)
    lean = dec.generate(ids, new_tokens, eos)
    return {
        "decoder": dec.kind,
        "identical": bool(torch.equal(lean, ref)),
        "tokens": int(ref.shape[1] - ids.shape[1]),
        "text": tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dns", type=Path, default=None, help="3-bit SqueezeLLM D&S checkpoint (made when missing)")
    ap.add_argument("--requant", type=Path, default=None, help="3-bit ReQuant checkpoint (made when missing)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the D&S checkpoint's torch.compiled decoder"
    )
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the saved JSON")
    ap.add_argument("--rss-only", action="store_true", help="only re-measure the peak RSS into the saved JSON")
    args = ap.parse_args()
    if args.render:
        text = render(json.loads((RESULTS / "decode_speed.json").read_text()))
        (RESULTS / "decode_speed.md").write_text(text)
        print(text)
        return

    if args.rss_only:
        from requant.format.checkpoint import read_meta

        out = json.loads((RESULTS / "decode_speed.json").read_text())
        ckpts = {"3-bit D&S": ensure(args.dns, "dns"), "3-bit ReQuant": ensure(args.requant, "requant")}
        out["peak_rss"] = measure_rss(ckpts, read_meta(ckpts["3-bit D&S"])["metadata"]["model"])
        (RESULTS / "decode_speed.json").write_text(json.dumps(out, indent=2))
        text = render(out)
        (RESULTS / "decode_speed.md").write_text(text)
        print(text)
        return

    import requant
    from requant.decode import static_timer
    from requant.format import kernels
    from requant.format.checkpoint import read_meta
    from requant.format.speed import measure, random_prompt, time_generation

    ckpts = {"3-bit D&S": ensure(args.dns, "dns"), "3-bit ReQuant": ensure(args.requant, "requant")}
    source = read_meta(ckpts["3-bit D&S"])["metadata"]["model"]
    fp32, _ = requant.load(source)
    loaded = {name: requant.load(p) for name, p in ckpts.items()}  # (model, tokenizer)
    models = {name: m for name, (m, _) in loaded.items()}
    int8, _ = requant.load(ckpts["3-bit D&S"], lm_head="int8")
    max_len = args.prompt_tokens + args.new_tokens + 1
    t0 = time.perf_counter()
    variants = {
        "fp32, transformers loop": fp32,
        "fp32, static decoder": static_timer(fp32, max_len),
        "fp32, fused decoder": static_timer(fp32, max_len, decoder="fused"),
    }
    for name, m in models.items():
        variants[f"{name}, transformers loop"] = functools.partial(time_generation, m)
        variants[f"{name}, static decoder"] = static_timer(m, max_len)
        variants[f"{name}, fused decoder"] = static_timer(m, max_len, decoder="fused")
    variants["3-bit D&S + int8 lm_head, fused decoder"] = static_timer(int8, max_len, decoder="fused")
    compile_s = None
    if args.compile:  # one compiled variant (compiling takes minutes on a small machine)
        variants["3-bit D&S, static decoder compiled"] = static_timer(models["3-bit D&S"], max_len, compile="on")
    prompt = random_prompt(fp32.get_input_embeddings().num_embeddings, args.prompt_tokens)
    table: dict[int, dict] = {}
    for n in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(n)
        tc = time.perf_counter()
        res = measure(variants, prompt, args.new_tokens, args.repeats)
        if args.compile and compile_s is None:
            compile_s = time.perf_counter() - tc  # includes the warm-up compile
        table[n] = {k: v.to_dict() for k, v in res.items()}
        print(f"{n} thread(s) done", file=sys.stderr)
    torch.set_num_threads(1)
    greedy = {
        f"{name}, {dec} decoder": same_greedy(m, tok, dec)
        for name, (m, tok) in loaded.items()
        for dec in ("fused", "static")
    }
    rss = measure_rss(ckpts, source)
    meta = {
        "checkpoints": {k: str(v) for k, v in ckpts.items()},
        "source": source,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "kernels": kernels.status(),
        "load_average_1min": os.getloadavg()[0],
        "wall_s": time.perf_counter() - t0,
        "compile_and_first_round_s": compile_s,
    }
    RESULTS.mkdir(exist_ok=True)
    out = {"meta": meta, "speed": table, "greedy_identical": greedy, "peak_rss": rss}
    (RESULTS / "decode_speed.json").write_text(json.dumps(out, indent=2))
    text = render(out)
    (RESULTS / "decode_speed.md").write_text(text)
    print(text)


def render(out: dict) -> str:
    meta, table = out["meta"], out["speed"]
    threads = list(table)
    names = list(table[threads[0]])
    lines = [
        "# Batch-1 decode speed on R: fp32 vs 3-bit checkpoints, 1 and 2 threads side by side",
        "",
        f"SmolLM2-135M; {meta['prompt_tokens']}-token random prompt, {meta['new_tokens']} greedy tokens; medians of "
        f"{meta['repeats']} rounds, variants in rotating order within each round; kernels: {meta['kernels']}; load "
        f"average at the end {meta['load_average_1min']:.1f} (compare ratios within one thread count). "
        "Command: `python benchmarks/decode_speed.py`.",
        "",
        "| variant | "
        + " | ".join(f"{t} thr prefill tok/s | {t} thr decode tok/s | {t} thr decode × fp32" for t in threads)
        + " |",
        "|---|" + "---|---|---|" * len(threads),
    ]
    for name in names:
        cells = []
        for t in threads:
            r, base = table[t][name], table[t]["fp32, transformers loop"]
            cells.append(
                f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}×"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Decode × fp32 is against the fp32 model through transformers' loop (the issue's baseline).", ""]
    for t in threads:
        for dec in ("fused", "static"):
            f = table[t][f"fp32, {dec} decoder"]["decode_tok_s"]
            parts = [
                f"{n.removesuffix(f', {dec} decoder')} {table[t][n]['decode_tok_s'] / f:.2f}×"
                for n in names
                if n.endswith(f"{dec} decoder") and not n.startswith("fp32")
            ]
            lines.append(f"- {t} thread(s), against fp32 through the same {dec} decoder: " + ", ".join(parts))
    lines += [
        "",
        "Greedy text, requant's decoders vs transformers' generate on the same loaded checkpoint (64 tokens):",
        "",
    ]
    for name, g in out["greedy_identical"].items():
        ran = f", ran {g['decoder']}" if "decoder" in g else ""
        lines.append(f"- {name}: {'identical' if g['identical'] else 'DIFFERENT'} ({g['tokens']} tokens{ran})")
    rss = out["peak_rss"]
    base = rss["interpreter + import requant"]
    fp = rss["fp32 model (generate --decoder transformers)"]
    lines += [
        "",
        "Peak RSS counts the checkpoint's memory-mapped file pages the process touched (clean page cache the kernel "
        "can reclaim) as well as its anonymous memory; the anonymous column is what the process holds itself "
        "(measured after generating, where it peaks). Each row: the median of 3 fresh processes.",
        "",
        "| `requant generate` (32 tokens) | peak RSS MiB | above the interpreter | anonymous above the interpreter | "
        "× fp32 (peak / above / anonymous above) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rss.items():
        if "peak_mib" not in r:
            lines.append(f"| {name} | {r['import_mib']:.0f} | 0 | 0 | |")
            continue
        above, anon = r["peak_mib"] - base["import_mib"], r.get("anon_mib", float("nan")) - base.get("anon_mib", 0)
        fp_above = fp["peak_mib"] - base["import_mib"]
        fp_anon = fp.get("anon_mib", float("nan")) - base.get("anon_mib", 0)
        lines.append(
            f"| {name} | {r['peak_mib']:.0f} | {above:.0f} | {anon:.0f} | "
            f"{r['peak_mib'] / fp['peak_mib']:.2f} / {above / fp_above:.2f} / {anon / fp_anon:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
