"""QTIP base method (issue 8): trellis MSE on Gaussian data, and proxy error / time on real layers of R.

Part 1 (synthetic): tail-biting TCQ of N(0, 1) sequences for L, K, V, code, T and the scale factor, against
the Lloyd–Max scalar optimum and the distortion-rate bound 2^(−2K).
Part 2 (real layers): layer Hessians H = Σ x xᵀ from `--nsamples` wiki:train windows (requant.calibration),
then the proxy error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of QTIP, RTN (per row, g64) and SqueezeLLM (per-row LUT,
k-means weighted by diag(H), the proxy's diagonal) at 2 and 3 bits, with bits/weight and wall time, and QTIP
variants (L, V, tile, no Hessian).

Part 3 (scaling): one layer's 2-bit fit time vs L = 8, 10, 12 (interleaved repeats, medians).

Usage: python benchmarks/qtip.py [--nsamples 4] [--layers NAME ...]
                                 [--skip-synthetic] [--skip-layers] [--skip-scaling] [--scaling-layer NAME]
(a part that is skipped keeps its previous results in benchmarks/results/<tag>.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from requant.calibration import layer_inputs
from requant.data import text_windows
from requant.io import write_json_atomic
from requant.loading import load_model
from requant.progress import quiet_transformers
from requant.quantizers import LayerInputs, QuantizedTensor, make_quantizer
from requant.quantizers.qtip import QTIPQuantizer
from requant.quantizers.qtip.trellis import Trellis, quantize_sequences
from requant.quantizers.squeezellm import SqueezeLLMQuantizer

RESULTS = Path(__file__).parent / "results"
LLOYD_MAX = {2: 0.1175, 3: 0.03454, 4: 0.009497}  # MSE of the optimal scalar quantizer of N(0, 1)
DEFAULT_LAYERS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.15.self_attn.v_proj",
    "model.layers.15.mlp.down_proj",
    "model.layers.29.mlp.gate_proj",
]


def synthetic(seqs: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """MSE per weight of tail-biting TCQ on i.i.d. N(0, 1) sequences of 256, and µs per weight."""
    x = torch.randn(seqs, 256, generator=torch.Generator().manual_seed(seed))
    runs = [(L, K, 1, "1mad", 1.0, 256) for K in (2, 3, 4) for L in (8, 10, 12)]
    runs += [(12, 2, 2, "1mad", 1.0, 256), (10, 2, 1, "3inst", 1.0, 256), (12, 2, 1, "3inst", 1.0, 256)]
    runs += [(10, 2, 1, "1mad", 1.0, T) for T in (32, 64, 128)]
    runs += [(10, K, 1, "1mad", f, 256) for K in (2, 3, 4) for f in (0.9, 1.05, 1.1, 1.15, 1.2)]
    rows = []
    for L, K, V, code, factor, T in runs:
        tr = Trellis(L, K, V, code)
        t = time.perf_counter()
        res = quantize_sequences(x.reshape(-1, T) / factor, tr)
        dt = time.perf_counter() - t
        mse = float((res.recon.reshape(x.shape) * factor - x).square().mean())
        row = {"L": L, "K": K, "V": V, "code": code, "scale_factor": factor, "T": T, "mse": mse}
        row |= {
            "lloyd_max": LLOYD_MAX[K],
            "shannon_bound": 2.0 ** (-2 * K),
            "us_per_weight": dt / x.numel() * 1e6,
        }
        rows.append(row)
        print("synthetic", row, flush=True)
    return rows


def layer_hessians(names: list[str], nsamples: int) -> tuple[dict[str, torch.Tensor], dict[str, LayerInputs]]:
    """Weights and input statistics (Σ x xᵀ) of the named layers over `nsamples` calibration windows."""
    with quiet_transformers():
        model, tok = load_model()
    windows = text_windows(tok, "wiki:train", 512, nsamples=nsamples, seed=0)
    inputs = layer_inputs(model, names, windows)
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}, inputs


def proxy_error(w: torch.Tensor, q: QuantizedTensor, h: torch.Tensor) -> float:
    d = (q.dequantize() - w).double()
    hd = h.double()
    return float(torch.trace(d @ hd @ d.T) / torch.trace(w.double() @ hd @ w.double().T))


def fit_timed(quantizer: Any, w: torch.Tensor, inputs: LayerInputs) -> tuple[QuantizedTensor, float]:
    t = time.perf_counter()
    if isinstance(quantizer, SqueezeLLMQuantizer):
        q = quantizer.fit(w, importance=inputs.hessian.diagonal()[None, :].expand_as(w).clamp_min(0))
    else:
        q = quantizer.fit(w, inputs=inputs)
    return q, time.perf_counter() - t


def real_layers(names: list[str], nsamples: int, l_sweep: list[int]) -> list[dict[str, Any]]:
    t = time.perf_counter()
    weights, inputs = layer_hessians(names, nsamples)
    print(
        f"hessians of {len(names)} layers from {nsamples} windows: {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    methods: dict[str, Any] = {}
    for bits in (2, 3):
        methods[f"qtip-{bits}bit"] = QTIPQuantizer(bits)
        methods[f"rtn-{bits}bit-row"] = make_quantizer("rtn", bits)
        methods[f"rtn-{bits}bit-g64"] = make_quantizer("rtn", bits, 64)
        methods[f"squeezellm-{bits}bit-row"] = make_quantizer("squeezellm", bits)
    for L in l_sweep:
        methods[f"qtip-2bit-L{L}"] = QTIPQuantizer(2, L=L)
    methods["qtip-2bit-L12-V2"] = QTIPQuantizer(2, L=12, V=2)
    methods["qtip-2bit-tile16x16"] = QTIPQuantizer(2, tile=(16, 16))
    methods["qtip-2bit-noH"] = QTIPQuantizer(2)  # fitted without the Hessian: H = I, no feedback
    rows = []
    for name in names:
        w, inp = weights[name], inputs[name]
        for method, quantizer in methods.items():
            q, dt = fit_timed(quantizer, w, LayerInputs() if method.endswith("noH") else inp)
            row = {"layer": name, "shape": list(w.shape), "method": method, "bits": quantizer.bits}
            row |= {
                "bits_per_weight": q.bit_count().bits_per_weight,
                "proxy_error": proxy_error(w, q, inp.hessian),
            }
            row |= {"seconds": dt, "us_per_weight": dt / w.numel() * 1e6, "tokens": inp.tokens}
            t = time.perf_counter()
            q.dequantize()
            row["dequantize_s"] = time.perf_counter() - t
            rows.append(row)
            print(row, flush=True)
    return rows


def l_scaling(name: str, nsamples: int, repeats: int = 3) -> list[dict[str, Any]]:
    """Wall time of one 2-bit QTIP fit vs L (interleaved repeats, medians) and the per-step Viterbi cost."""
    weights, inputs = layer_hessians([name], nsamples)
    w, inp = weights[name], inputs[name]
    times: dict[int, list[float]] = {L: [] for L in (8, 10, 12)}
    errs: dict[int, float] = {}
    for _ in range(repeats):
        for L in times:
            q, dt = fit_timed(QTIPQuantizer(2, L=L), w, inp)
            times[L].append(dt)
            errs[L] = proxy_error(w, q, inp.hessian)
    rows = []
    for L, ts in times.items():
        med = statistics.median(ts)
        row = {"layer": name, "shape": list(w.shape), "L": L, "median_s": med, "all_s": ts}
        row |= {"us_per_weight": med / w.numel() * 1e6, "ns_per_weight_state": med / w.numel() / 2**L * 1e9}
        row["proxy_error"] = errs[L]
        rows.append(row)
        print("scaling", row, flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    out = ["# QTIP base method (issue 8)", ""]
    syn = result.get("synthetic")
    if syn:
        out += [
            "## Tail-biting TCQ of 64 × 256 N(0, 1) values in sequences of T",
            "",
            "| L | K | V | code | T | scale factor | MSE | Lloyd–Max scalar | bound 2^(−2K) | µs/weight |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in syn:
            out.append(
                f"| {r['L']} | {r['K']} | {r['V']} | {r['code']} | {r['T']} | {r['scale_factor']} | "
                f"{r['mse']:.4f} | {r['lloyd_max']:.4f} | {r['shannon_bound']:.4f} | "
                f"{r['us_per_weight']:.1f} |"
            )
        out.append("")
    rows = result.get("layers")
    if rows:
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        short = [n.removeprefix("model.layers.") for n in layers]
        shapes = {r["layer"]: tuple(r["shape"]) for r in rows}
        out += [
            f"## Proxy error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on layers of R (H from {result['nsamples']} × 512 "
            "wiki:train tokens)",
            "",
            "| method | bits/weight (mean) | "
            + " | ".join(short)
            + " | median s/layer | µs/weight (median) | dequantize ms (median) |",
            "|---|---|" + "---|" * len(layers) + "---|---|---|",
        ]
        for m in methods:
            mr = {r["layer"]: r for r in rows if r["method"] == m}
            bpw = statistics.mean(r["bits_per_weight"] for r in mr.values())
            errs = " | ".join(f"{mr[n]['proxy_error']:.4f}" if n in mr else "" for n in layers)
            secs = statistics.median(r["seconds"] for r in mr.values())
            usw = statistics.median(r["us_per_weight"] for r in mr.values())
            deq = statistics.median(r.get("dequantize_s", float("nan")) for r in mr.values()) * 1e3
            out.append(f"| {m} | {bpw:.3f} | {errs} | {secs:.2f} | {usw:.2f} | {deq:.1f} |")
        out += [
            "",
            "Shapes: " + ", ".join(f"{n.removeprefix('model.layers.')} {shapes[n]}" for n in layers),
            "",
            "QTIP (default: L = 10, V = 1, 1MAD code, 16 × 4 tiles): RHT on both sides, BlockLDLQ "
            "(damp 0.01) over column blocks of the tile's width, each tile one tail-biting stream, one fp16 "
            "scale per matrix, no fine-tuning; noH = fitted with H = I. SqueezeLLM: k-means weighted by "
            "diag(H). Wall times on the shared 2-core CPU (noisy; compare within one run).",
        ]
    sc = result.get("scaling")
    if sc:
        out += [
            "",
            f"## QTIP 2-bit fit time vs L on {sc[0]['layer']} {tuple(sc[0]['shape'])}, median of "
            f"{len(sc[0]['all_s'])} interleaved runs",
            "",
            "| L | states 2^L | median s | µs/weight | ns per weight·state | proxy error |",
            "|---|---|---|---|---|---|",
        ]
        for r in sc:
            out.append(
                f"| {r['L']} | {2 ** r['L']} | {r['median_s']:.2f} | {r['us_per_weight']:.1f} | "
                f"{r['ns_per_weight_state']:.2f} | {r['proxy_error']:.5f} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=4, help="calibration windows for the Hessians (default 4)")
    p.add_argument("--layers", nargs="*", default=DEFAULT_LAYERS)
    p.add_argument("--l-sweep", type=int, nargs="*", default=[8, 10, 12], help="state bits L for QTIP 2-bit")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--scaling-layer", default="model.layers.0.self_attn.q_proj")
    p.add_argument("--tag", default="qtip")
    args = p.parse_args()
    path = RESULTS / f"{args.tag}.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}  # keep the parts not rerun
    result |= {"nsamples": args.nsamples, "torch_threads": torch.get_num_threads()}
    if not args.skip_synthetic:
        result["synthetic"] = synthetic()
        write_json_atomic(path, result)
    if not args.skip_layers:
        result["layers"] = real_layers(args.layers, args.nsamples, args.l_sweep)
        write_json_atomic(path, result)
    if not args.skip_scaling:
        result["scaling"] = l_scaling(args.scaling_layer, args.nsamples)
        write_json_atomic(path, result)
    md = markdown(result)
    (RESULTS / f"{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
