"""The tested architecture matrix: tiny random models of each family × base method, and what each must satisfy.

One table of families (`ARCHS`: a transformers model_type and tiny dimensions, nothing else) and one of base
methods (`BASES`: QuantConfig settings as a user would give them, recipes included). `run_case` quantizes one
family with one base, saves the checkpoint (format v2) and reloads it twice (requant.load and plain
`AutoModelForCausalLM.from_pretrained`); each function in `CHECKS` raises AssertionError when a promise is
broken. tests/test_architectures.py asserts every check per (family, base); benchmarks/arch_matrix.py runs the
same cases and checks and writes the table benchmarks/results/arch_matrix.md. Nothing here names a module of
any architecture: families differ only by their config dicts.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Tiny dimensions shared by every family: 2 blocks of width 64, 4 heads of 16, GQA where the family has it,
# positions up to 128 (windows are 32 tokens). Special-token ids are the embedded tokenizer's.
SEQLEN = 32
NSAMPLES = 4
_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}
_GQA = {"num_key_value_heads": 2, "intermediate_size": 96}


@dataclass(frozen=True)
class Arch:
    """One family: its transformers model_type, the config fields that make it tiny (and exercise what the family
    is known for), and the regexes of ≥2-D block parameters that stay unquantized by design (MoE routers)."""

    model_type: str
    config: dict[str, Any]
    kept: tuple[str, ...] = ()
    xfail: str | None = None  # why the family is expected to fail today (the lead removes it when fixed)
    note: str = ""


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", _GQA, note="GQA, RMSNorm, SwiGLU"),
    "qwen2": Arch("qwen2", _GQA, note="biased q/k/v projections"),
    # sliding windows shorter than the windows: the mask differs from a causal one
    "mistral": Arch("mistral", {**_GQA, "sliding_window": 16}, note="sliding-window attention"),
    "gemma2": Arch(
        "gemma2",
        {**_GQA, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16},
        note="tied embeddings, logit soft-capping, alternating sliding/full attention layers",
    ),
    "gpt_neox": Arch("gpt_neox", {"intermediate_size": 96}, note="fused biased query_key_value, parallel residual"),
    "opt": Arch(
        "opt",
        {"ffn_dim": 96, "word_embed_proj_dim": 32},
        note="learned positions, project_in/out around the blocks, biases",
    ),
    "phi3": Arch("phi3", _GQA, note="fused qkv_proj and gate_up_proj"),
    "mixtral": Arch(
        "mixtral",
        {**_GQA, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
        kept=(r"\.mlp\.gate\.weight$",),
        note="fused 3-D experts, top-2 router",
    ),
    "qwen3_moe": Arch(
        "qwen3_moe",
        {
            **_GQA,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        kept=(r"\.mlp\.gate\.weight$",),
        note="fused 3-D experts, q/k norms",
    ),
}

# Base methods as a user runs them: plain RTN/GPTQ/AWQ at group size 32 (g128 divides no width here), and the
# two recipes over SqueezeLLM (`--recipe dns`, `--recipe requant`). 3 bits, 4 windows of 32 tokens.
BASES: dict[str, dict[str, Any]] = {
    "rtn": {"base": "rtn", "group_size": 32},
    "squeezellm-dns": {"base": "squeezellm", "recipe": "dns"},
    "requant": {"base": "squeezellm", "recipe": "requant"},
    "gptq": {"base": "gptq", "group_size": 32},
    "awq": {"base": "awq", "group_size": 32},
}
BASE_NOTES = {
    "rtn": "RTN g32",
    "squeezellm-dns": "SqueezeLLM D&S (0.45% IQR + 0.05% Fisher)",
    "requant": "ReQuant over SqueezeLLM (Algorithm 1 + PQI detach)",
    "gptq": "GPTQ g32 (sequential)",
    "awq": "AWQ g32",
}


def quant_config(base: str, calib: Path, *, bits: int = 3, **overrides: Any):
    """The QuantConfig of one base-method row: its recipe's settings, then the row's and `overrides`."""
    from requant.config import QuantConfig
    from requant.recipes import recipe_settings

    row = dict(BASES[base])
    recipe = row.pop("recipe", None)
    settings = recipe_settings(recipe, row["base"], bits) if recipe else {}
    return QuantConfig(
        **{**settings, **row, "bits": bits, "calib": str(calib), "nsamples": NSAMPLES, "seqlen": SEQLEN, **overrides}
    )


@cache
def tokenizer():
    """The embedded model's tokenizer (SmolLM2's, 49,152 tokens; it adds no BOS)."""
    from transformers import AutoTokenizer

    from requant.loading import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def build_model(arch: str, *, vocab: int | None = None, seed: int = 0) -> nn.Module:
    """A random tiny model of the family, in fp32 and eval mode, built offline from its config dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    a = ARCHS[arch]
    cfg = AutoConfig.for_model(a.model_type, **{**_COMMON, "vocab_size": vocab or len(tokenizer()), **a.config})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def write_texts(directory: Path) -> tuple[Path, Path]:
    """(calibration, evaluation) text files: the start of the embedded wiki train and test splits (small, so a
    run tokenizes a few thousand tokens, not the corpus)."""
    from requant.data import load_text

    directory.mkdir(parents=True, exist_ok=True)
    calib, evaluation = directory / "calib.txt", directory / "eval.txt"
    calib.write_text(load_text("wiki:train")[:20_000], encoding="utf-8")
    evaluation.write_text(load_text("wiki:test")[:4_000], encoding="utf-8")
    return calib, evaluation


# ----------------------------------------------------------------------------------------------------------
# One case


@dataclass
class Case:
    """One family quantized with one base method, saved and loaded back."""

    arch: str
    base: str
    fp: nn.Module  # the model before quantization
    model: nn.Module  # quantized in memory (nn.Linear layers holding ŵ)
    result: Any  # QuantizationResult
    ckpt: Path
    eval_windows: torch.Tensor
    loaded: dict[str, nn.Module] = field(default_factory=dict)  # "requant.load", "from_pretrained"

    @property
    def stored(self) -> nn.Module:
        """The in-memory quantized model with its unquantized tensors rounded as the checkpoint stores them
        (16-bit by default): what a reload must reproduce bit for bit."""
        if "_stored" not in self.__dict__:
            params = {q.info.parameter for q in self.result.layers.values()}
            self.__dict__["_stored"] = rounded_dense(self.model, params, self.dense_dtype)
        return self.__dict__["_stored"]

    @property
    def dense_dtype(self) -> torch.dtype:
        import json

        qc = json.loads((self.ckpt / "config.json").read_text())["quantization_config"]
        return getattr(torch, qc["dense_dtype"])


def rounded_dense(model: nn.Module, quantized: set[str], dtype: torch.dtype) -> nn.Module:
    """A copy of `model` whose stored floating tensors other than the quantized parameters (full names: a linear's
    `<module>.weight`, a fused expert parameter's own name) are rounded to `dtype`."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.state_dict(keep_vars=True).items():
            if name in quantized or not p.is_floating_point():
                continue
            p.copy_(p.to(dtype).to(p.dtype))
    return m


def run_case(arch: str, base: str, directory: Path, *, calib: Path, evaluation: Path) -> Case:
    """Quantize the family's tiny model with the base method, save it to `directory` and load it back twice.

    RequantError from quantize (a refusal) propagates: the caller reports it."""
    from transformers import AutoModelForCausalLM

    import requant
    from requant.data import text_windows
    from requant.format import save_checkpoint

    tok = tokenizer()
    model = build_model(arch)
    fp = copy.deepcopy(model)
    result = requant.quantize(model, tok, quant_config(base, calib))
    ckpt = save_checkpoint(directory / f"{arch}-{base}", model, tok, result)
    loaded = {
        "requant.load": requant.load(ckpt)[0],
        "from_pretrained": AutoModelForCausalLM.from_pretrained(ckpt).eval(),
    }
    windows = text_windows(tok, str(evaluation), SEQLEN, limit=4)
    return Case(arch, base, fp, model, result, ckpt, windows, loaded)


# ----------------------------------------------------------------------------------------------------------
# What every case must satisfy (each raises AssertionError naming what broke)


def blocks_prefix(model: nn.Module) -> str:
    from requant.model import find_blocks

    return find_blocks(model)[0]


def _in_blocks(name: str, prefix: str) -> bool:
    return re.match(re.escape(prefix) + r"\.\d+\.", name) is not None


def check_complete(case: Case) -> None:
    """Every ≥2-D parameter inside the decoder blocks is quantized, except the family's stated `kept` ones (which
    stay in 16 bits): in the reloaded model no such parameter is left as a floating matrix."""
    kept = [re.compile(p) for p in ARCHS[case.arch].kept]
    prefix = blocks_prefix(case.fp)  # a loaded model's blocks hold packed layers, no nn.Linear to find them by
    for how, m in case.loaded.items():
        left = {n for n, p in m.named_parameters() if p.dim() >= 2 and _in_blocks(n, prefix) and p.is_floating_point()}
        unexpected = sorted(n for n in left if not any(k.search(n) for k in kept))
        if unexpected:
            total = sum(p.numel() for n, p in case.fp.named_parameters() if p.dim() >= 2 and _in_blocks(n, prefix))
            done = sum(q.info.numel for q in case.result.layers.values())
            raise AssertionError(
                f"{how}: {done:,} of {total:,} block weights quantized ({100 * done / total:.0f}%); left in "
                f"floating point: {', '.join(unexpected[:4])}" + (", ..." if len(unexpected) > 4 else "")
            )


def check_units(case: Case) -> None:
    """The quantized units are exactly the model's block matrices (minus `kept`): same total weights as the fp
    model's ≥2-D block parameters, each unit's shape its weight's, biases kept where the layer has one."""
    from requant.format import quant_linears
    from requant.model import unit_weight

    kept = [re.compile(p) for p in ARCHS[case.arch].kept]
    prefix = blocks_prefix(case.fp)
    expected = sum(
        p.numel()
        for n, p in case.fp.named_parameters()
        if p.dim() >= 2 and _in_blocks(n, prefix) and not any(k.search(n) for k in kept)
    )
    got = sum(q.info.numel for q in case.result.layers.values())
    assert got == expected, f"{got} weights quantized, the blocks hold {expected}"
    for name, q in case.result.layers.items():
        w = unit_weight(case.fp, name)
        assert tuple(q.dense.shape) == tuple(w.shape), f"{name}: unit {tuple(q.dense.shape)}, weight {w.shape}"
    assert case.result.report["layers"] == len(case.result.layers)
    for how, m in case.loaded.items():
        packed = dict(quant_linears(m))
        assert set(packed) == set(case.result.layers), f"{how}: packed layers differ from the quantized units"
        for name, mod in packed.items():
            orig = case.fp.get_submodule(name) if case.result.layers[name].info.expert is None else None
            assert (mod.bias is None) == (getattr(orig, "bias", None) is None), f"{how}: {name} lost/gained a bias"
            if mod.bias is not None:
                want = orig.bias.detach().to(case.dense_dtype).float()
                assert torch.equal(mod.bias.detach(), want), f"{how}: {name}'s bias differs from the original"


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def check_reload(case: Case) -> None:
    """Both reloads give exactly the logits of the in-memory quantized model (dense tensors rounded as stored),
    on the packed layers' reference path and on their default path (prefill: decode Ŵ once + BLAS)."""
    from requant.format import set_kernel_mode

    ids = case.eval_windows[:2]
    expected = _logits(case.stored, ids)
    assert torch.isfinite(expected).all(), "the quantized model's logits are not finite"
    for how, m in case.loaded.items():
        for mode in ("reference", "auto"):
            set_kernel_mode(m, mode)
            got = _logits(m, ids)
            diff = (got - expected).abs().max().item()
            assert torch.equal(got, expected), f"{how} ({mode} path): logits differ by up to {diff:.3g}"
        set_kernel_mode(m, "auto")
        # One row (a decode step) runs the packed kernels, which sum in their own order: equal within fp32
        # reassociation error, not bit for bit (format.qlinear.FAST_PATH_RTOL).
        step = _logits(m, ids[:1, :1])
        torch.testing.assert_close(step, expected[:1, :1], rtol=0, atol=1e-4, msg=f"{how}: one-row step")


def check_perplexity(case: Case) -> None:
    """Perplexity on held-out windows is finite, identical for the reloads, and within 1.5× the fp model's (a
    random model is near-uniform over the vocabulary; a broken layer moves it far)."""
    from requant import evaluate

    fp = evaluate(case.fp, case.eval_windows).perplexity
    mine = evaluate(case.stored, case.eval_windows).perplexity
    assert math.isfinite(mine) and mine <= 1.5 * fp, f"perplexity {mine:.6g} (fp {fp:.6g})"
    for how, m in case.loaded.items():
        got = evaluate(m, case.eval_windows).perplexity
        assert got == mine, f"{how}: perplexity {got!r} != in-memory {mine!r}"


GEN_TOKENS = 4


def check_generate(case: Case) -> None:
    """Greedy generation of a few tokens (KV cache, one-row decode steps on the packed kernels) gives the same
    tokens in memory and after each reload."""
    prompt = case.eval_windows[:1, :8]
    kw = {"max_new_tokens": GEN_TOKENS, "min_new_tokens": GEN_TOKENS, "do_sample": False, "pad_token_id": 2}
    with torch.no_grad():
        want = case.stored.generate(prompt, **kw)
        assert want.shape == (1, 8 + GEN_TOKENS), f"generated {want.shape[1] - 8} tokens, asked {GEN_TOKENS}"
        for how, m in case.loaded.items():
            got = m.generate(prompt, **kw)
            assert torch.equal(got, want), f"{how}: greedy tokens {got[0, 8:].tolist()} != {want[0, 8:].tolist()}"


def check_checkpoint(case: Case) -> None:
    """The checkpoint verifies (layer table against the headers, every tensor's sha256) and states the bits the
    run counted."""
    from requant.cli.inspect import describe

    d = describe(case.ckpt, verify=True)
    assert {row["name"] for row in d["layers"]} == set(case.result.layers)
    bits = case.result.bit_count()
    assert sum(row["nnz"] for row in d["layers"]) == bits.sparse_entries
    assert math.isclose(d["bits_per_weight"], bits.bits_per_weight), (d["bits_per_weight"], bits.bits_per_weight)


def check_sequential_inputs(case: Case) -> None:
    """For sequential methods (GPTQ): replaying the blocks one by one gives each layer the inputs the model itself
    gives it. With every layer "fitted" to its own weight the replayed statistics must equal one ordinary pass
    (a block called with another block's mask, e.g. a sliding-window one, would see other inputs)."""
    from requant.calibration import layer_inputs, sequential_fit
    from requant.data import text_windows
    from requant.model import unit_weight

    if case.result.report.get("calibration_inputs") != "sequential":
        return  # one pass over the fp model: nothing is replayed
    model = copy.deepcopy(case.fp)
    names = list(case.result.layers)
    windows = text_windows(tokenizer(), case.result.config.calib, SEQLEN, nsamples=2, seed=1)
    once = layer_inputs(model, names, windows)
    replayed = {}

    def fit(name: str, inputs: Any) -> torch.Tensor:
        replayed[name] = inputs
        return unit_weight(model, name).detach().clone()

    sequential_fit(model, names, windows, fit)
    for n in names:
        a, b = replayed[n].hessian, once[n].hessian
        err = float((a - b).abs().max() / b.abs().max())
        assert err <= 1e-5, f"{n}: replayed block inputs differ from the model's (Σxxᵀ off by {err:.3g} relative)"


CHECKS: dict[str, Callable[[Case], None]] = {
    "complete": check_complete,
    "units": check_units,
    "reload": check_reload,
    "perplexity": check_perplexity,
    "generate": check_generate,
    "checkpoint": check_checkpoint,
    "sequential-inputs": check_sequential_inputs,
}
